"""``padlm profile show|export|choose|rate|from-history|reset|delete``: users' profiles in a
store, the same store ``padlm serve --profiles`` learns into."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from padlm.cli.options import (
    DEFAULT_PROFILE_AXES,
    DeviceOption,
    DtypeOption,
    ProfileAxesOption,
)

app = typer.Typer(help="Users' profiles: what padlm learned from their choices and history.",
                  no_args_is_help=True)

UserOption = Annotated[str, typer.Option(help="The user (the OpenAI API's `user` field).")]
ProfilesOption = Annotated[str, typer.Option(
    help="The store: sqlite:///PATH or postgresql://...; default: profiles.db under "
         "$PADLM_HOME.")]
TenantOption = Annotated[str, typer.Option(
    help="The namespace: 'local' (this CLI and the Python API), 'public' (a server without "
         "API keys) or a server key's 'key-...' id.")]


def _service(profiles: str, profile_axes: str = DEFAULT_PROFILE_AXES):
    from padlm.errors import PadlmError
    from padlm.profiles.features import parse_axes
    from padlm.profiles.service import ProfileService, open_profiles

    axes = parse_axes(profile_axes)
    store = open_profiles(profiles)
    if store is None:
        raise PadlmError("--profiles none: there is no store to read", param="profiles")
    return ProfileService(store, axes=axes)


def _ref(spec: str, param: str):
    """``chatcmpl-abc`` or ``chatcmpl-abc:1`` (a choice index)."""
    from padlm.errors import PadlmError
    from padlm.profiles.service import ResponseRef

    rid, _, index = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "",
                                                                                    "0")
    if not rid:
        raise PadlmError(f"--{param} must be RESPONSE_ID or RESPONSE_ID:INDEX, got {spec!r}",
                         param=param)
    return ResponseRef(rid, int(index))


def _print(body: dict) -> None:
    print(json.dumps(body, indent=2, ensure_ascii=False))


@app.command()
def show(user: UserOption, profiles: ProfilesOption = "default",
         tenant: TenantOption = "local",
         profile_axes: ProfileAxesOption = DEFAULT_PROFILE_AXES) -> None:
    """The profile: learned weight and certainty per axis, the text, the preference it
    decodes with."""
    _print(_service(profiles, profile_axes).show(tenant, user))


@app.command()
def export(user: UserOption, profiles: ProfilesOption = "default",
           tenant: TenantOption = "local",
           profile_axes: ProfileAxesOption = DEFAULT_PROFILE_AXES) -> None:
    """The profile and every choice it learned from, as JSON."""
    _print(_service(profiles, profile_axes).export(tenant, user))


@app.command()
def choose(user: UserOption, chosen: Annotated[str, typer.Option(
        help="The preferred answer: RESPONSE_ID[:INDEX].")],
        rejected: Annotated[str, typer.Option(help="The other: RESPONSE_ID[:INDEX].")],
        profiles: ProfilesOption = "default", tenant: TenantOption = "local",
        profile_axes: ProfileAxesOption = DEFAULT_PROFILE_AXES) -> None:
    """Learn that the user preferred one remembered answer to another."""
    service = _service(profiles, profile_axes)
    _print(service.choose(tenant, user, _ref(chosen, "chosen"), _ref(rejected, "rejected")))


@app.command()
def rate(user: UserOption, response: Annotated[str, typer.Option(
        help="The answer: RESPONSE_ID[:INDEX].")],
        up: Annotated[bool, typer.Option("--up/--down", help="Thumbs up or down.")],
        profiles: ProfilesOption = "default", tenant: TenantOption = "local",
        profile_axes: ProfileAxesOption = DEFAULT_PROFILE_AXES) -> None:
    """Learn from a thumb on one remembered answer."""
    _print(_service(profiles, profile_axes).rate(tenant, user, _ref(response, "response"), up))


@app.command("from-history")
def from_history(
    user: UserOption,
    messages: Annotated[Path, typer.Option(
        help="The user's past messages: JSON (a list of strings or {role, content}), JSON "
             "lines, or one message per line.")],
    model: Annotated[str, typer.Option(help="The local model that writes the profile.")
                     ] = "qwen2.5-coder-1.5b-instruct",
    dtype: DtypeOption = None, device: DeviceOption = "auto",
    profiles: ProfilesOption = "default", tenant: TenantOption = "local",
    profile_axes: ProfileAxesOption = DEFAULT_PROFILE_AXES,
) -> None:
    """Write the user's profile text from their past messages, with a local model."""
    from padlm.core.engine import Personalizer
    from padlm.profiles.history import profile_text, read_messages

    texts = read_messages(messages)
    service = _service(profiles, profile_axes)  # a bad store is refused before the model loads
    engine = Personalizer(model, persrm=None, dtype=dtype, device=device)
    _print(service.set_text(tenant, user, profile_text(engine, texts)))


@app.command()
def reset(user: UserOption, profiles: ProfilesOption = "default",
          tenant: TenantOption = "local",
          profile_axes: ProfileAxesOption = DEFAULT_PROFILE_AXES) -> None:
    """Forget what was learned from choices (the profile text stays)."""
    _print(_service(profiles, profile_axes).reset(tenant, user))


@app.command()
def delete(user: UserOption, profiles: ProfilesOption = "default",
           tenant: TenantOption = "local") -> None:
    """Forget the user entirely: profile, choices and remembered answers."""
    _print({"user": user, "deleted": _service(profiles).delete(tenant, user)})
