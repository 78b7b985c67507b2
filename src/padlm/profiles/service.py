"""Profiles as the server, the CLI and the Python API use them: learn from a choice or a
thumb, compose the preference a user's requests decode with, forget a user.

Every change to a profile is one store transaction (:meth:`ProfileStore.update`): the choice
is read, the posterior stepped and written with the choice's event in one go, so two
replicas learning from two choices of one user at once lose neither, and a crash in between
loses nothing that was acknowledged. Responses are remembered per tenant (the API key's
namespace) and user with their features only, for ``ttl_s`` and at most ``keep_per_user``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from padlm.core.preferences import Preference
from padlm.data.axes import Axis
from padlm.profiles.features import AXES, AxisFeatures
from padlm.profiles.learning import explore_contrast, update
from padlm.profiles.profile import (
    ProfileError,
    ProfileState,
    compose,
    contrasted_sides,
    explore_sides,
    learned_sides,
    summary,
)
from padlm.profiles.store import (
    ProfileRecord,
    ProfileStore,
    ResponseRecord,
    default_store_url,
    open_store,
)

DEFAULT_TTL_S = 24 * 3600.0  # a choice usually follows its responses within minutes
DEFAULT_KEEP_PER_USER = 256  # responses remembered per user, newest first
MAX_USER_CHARS = 256
LOCAL_TENANT = "local"  # the CLI's and the Python API's namespace


def open_profiles(spec: str) -> ProfileStore | None:
    """``--profiles``: ``none`` (no profiles), ``default`` (SQLite under ``$PADLM_HOME``)
    or a store URL."""
    if spec == "none":
        return None
    return open_store(default_store_url() if spec == "default" else spec)


@dataclass(frozen=True)
class ResponseRef:
    """One choice of one response: what a user picks or rates."""

    response_id: str
    index: int = 0

    def __str__(self) -> str:
        return f"{self.response_id}[{self.index}]"


def check_user(user: str, param: str = "user") -> str:
    """A user name as profiles key it: refused when empty, over-long or not printable (it
    reaches logs and exports)."""
    if not isinstance(user, str) or not user.strip():
        raise ProfileError("user must be a non-empty string", param)
    if len(user) > MAX_USER_CHARS or not user.isprintable():
        raise ProfileError(f"user must be at most {MAX_USER_CHARS} printable characters",
                           param)
    return user


@dataclass(frozen=True)
class TenantProfiles:
    """One tenant's profiles as the kernel asks for them
    (:class:`~padlm.core.preferences.PreferenceSource`): ``Personalizer(profiles=...)``."""

    service: ProfileService
    tenant: str = LOCAL_TENANT

    def preference_for(self, user: str) -> Preference:
        return self.service.decoding(self.tenant, user)[0]


class ProfileService:
    """Profiles over one store, with the reward models that give responses features."""

    def __init__(self, store: ProfileStore, features: AxisFeatures | None = None,
                 ttl_s: float = DEFAULT_TTL_S,
                 keep_per_user: int = DEFAULT_KEEP_PER_USER,
                 axes: Sequence[Axis] = AXES) -> None:
        self.store = store
        self.axes = tuple(axes)
        self.features = features or AxisFeatures(self.axes)
        self.ttl_s = ttl_s
        self.keep_per_user = keep_per_user

    def _state(self, record: ProfileRecord | None) -> ProfileState:
        return ProfileState.from_json(record.state if record else None, self.axes)

    def _current(self, tenant: str, user: str, record: ProfileRecord | None = None
                 ) -> tuple[ProfileRecord | None, ProfileState, Preference, dict]:
        """What every read of a profile starts from: the stored record (``record`` when the
        caller holds it), its learned state, the preference it decodes with and the
        summary a response or ``show`` reports."""
        record = record or self.store.get(tenant, check_user(user))
        state = self._state(record)
        text = record.text if record else None
        preference = compose(learned_sides(state.posterior, self.axes), text)
        body = {"user": user, **summary(state, record.choices if record else 0,
                                        record.version if record else 0, text, preference,
                                        self.axes)}
        return record, state, preference, body

    def decoding(self, tenant: str, user: str) -> tuple[Preference, dict]:
        """The preference a request of ``user`` with none of its own decodes with, and the
        response's ``padlm.profile`` (which state it was)."""
        _, _, preference, body = self._current(tenant, user)
        return preference, body

    def exploring(self, tenant: str, user: str) -> tuple[list[Preference], dict]:
        """Two preferences that differ where one choice teaches the profile the most (every
        axis it is unsure of: :func:`~padlm.profiles.learning.explore_contrast`) and agree
        on the rest, for an A/B choice."""
        record, state, _, body = self._current(tenant, user)
        contrast = explore_contrast(state.posterior)
        sides = explore_sides(state.posterior, contrast, self.axes)
        text = record.text if record else None
        pair = [compose(answer, text, instructed=True) for answer in sides]
        body["explore"] = {
            "axes": [axis.name for axis, x in zip(self.axes, contrast, strict=True) if x],
            "sides": list(contrasted_sides(contrast, self.axes)),
            "preferences": [choice.text for choice in pair]}
        return pair, body

    def remember(self, tenant: str, user: str, response_id: str, prompts: Sequence,
                 texts: Sequence[str]) -> None:
        """Keep each choice's features (not its text) for feedback within ``ttl_s``;
        ``prompts[i]`` is what choice ``i`` answered."""
        check_user(user)
        features = self.features(prompts, texts)
        now = time.time()
        self.store.remember([ResponseRecord(tenant, user, response_id, index, vector, now,
                                            now + self.ttl_s)
                             for index, vector in enumerate(features)], self.keep_per_user)

    def _recall(self, tenant: str, user: str, ref: ResponseRef, param: str) -> list[float]:
        found = self.store.recall(tenant, ref.response_id, ref.index)
        if found is None:
            raise ProfileError(
                f"no response {ref} to learn from: unknown, expired (responses are kept "
                f"{self.ttl_s:g} s) or sent without a user", param, 404, "response_not_found")
        if found.user != user:
            raise ProfileError(f"response {ref} was given to another user", param, 403,
                               "permission_denied")
        if len(found.features) != len(self.axes):
            raise ProfileError(f"response {ref} was remembered under other profile axes "
                               f"(before the server's --profile-axes changed)", param, 409,
                               "profile_axes")
        return list(found.features)

    def choose(self, tenant: str, user: str, chosen: ResponseRef, rejected: ResponseRef
               ) -> dict:
        """Learn from ``user`` preferring ``chosen`` to ``rejected`` (remembered answers)."""
        check_user(user)
        if chosen == rejected:
            raise ProfileError("chosen and rejected are the same response", "rejected")
        good = self._recall(tenant, user, chosen, "chosen")
        bad = self._recall(tenant, user, rejected, "rejected")
        return self._pair(tenant, user, good, bad,
                          {"chosen": str(chosen), "rejected": str(rejected)})

    def choose_texts(self, tenant: str, user: str, prompt, chosen: str, rejected: str
                     ) -> dict:
        """Learn from ``user`` preferring the answer ``chosen`` to ``rejected`` (texts the
        caller holds: the Python API's and the feedback simulation's form)."""
        check_user(user)
        good, bad = self.features([prompt, prompt], [chosen, rejected])
        return self._pair(tenant, user, good, bad, {})

    def _pair(self, tenant: str, user: str, good: Sequence[float], bad: Sequence[float],
              described: dict) -> dict:
        z = [g - b for g, b in zip(good, bad, strict=True)]
        event = {"kind": "choice", **described, "z": z, "time": time.time()}
        return self._learn(tenant, user, lambda state: (state, z), event)

    def rate(self, tenant: str, user: str, response: ResponseRef, up: bool) -> dict:
        """Learn from a thumb: the response against the mean of those rated before."""
        check_user(user)
        features = self._recall(tenant, user, response, "response")

        def step(state: ProfileState) -> tuple[ProfileState, list[float]]:
            state, z = state.rated_center(features)
            return state, z if up else [-v for v in z]

        event = {"kind": "rating", "response": str(response), "up": up, "time": time.time()}
        return self._learn(tenant, user, step, event)

    def _learn(self, tenant: str, user: str, step, event: dict) -> dict:
        def change(record: ProfileRecord | None) -> ProfileRecord:
            state, z = step(self._state(record))
            state = replace(state, posterior=update(state.posterior, z))
            return self._written(tenant, user, record, state.to_json(), 1)

        record = self.store.update(tenant, user, change, event)
        return self.show(tenant, user, record)

    @staticmethod
    def _written(tenant: str, user: str, record: ProfileRecord | None, state: dict,
                 choices: int, text: str | None = None, keep_text: bool = True
                 ) -> ProfileRecord:
        now = time.time()
        if record is None:
            return ProfileRecord(tenant, user, state, choices, text, now, now, 1)
        return replace(record, state=state, choices=record.choices + choices,
                       text=record.text if keep_text and text is None else text, updated=now)

    def set_text(self, tenant: str, user: str, text: str | None) -> dict:
        """Store a natural-language profile (from the user's history), or clear it."""
        check_user(user)
        record = self.store.update(tenant, user, lambda record: self._written(
            tenant, user, record, record.state if record else ProfileState.new(self.axes).to_json(),
            0, text, keep_text=False), {"kind": "text", "time": time.time()})
        return self.show(tenant, user, record)

    def reset(self, tenant: str, user: str) -> dict:
        """Forget what was learned from choices (the text stays; :meth:`delete` forgets all)."""
        check_user(user)

        def change(record: ProfileRecord | None) -> ProfileRecord:
            fresh = self._written(tenant, user, record, ProfileState.new(self.axes).to_json(), 0)
            return replace(fresh, choices=0)

        record = self.store.update(tenant, user, change, {"kind": "reset", "time": time.time()})
        return self.show(tenant, user, record)

    def delete(self, tenant: str, user: str) -> bool:
        """Every trace of ``user``: profile, events, remembered responses."""
        return self.store.delete(tenant, check_user(user))

    def show(self, tenant: str, user: str, record: ProfileRecord | None = None) -> dict:
        """The profile as ``padlm profile show`` and ``GET /v1/profiles/{user}`` give it."""
        record, _, _, body = self._current(tenant, user, record)
        if record is not None:
            body.update(created=record.created, updated=record.updated)
        return body

    def export(self, tenant: str, user: str) -> dict:
        """The profile and every event it learned from (a user's data, whole)."""
        return {**self.show(tenant, user), "events": self.store.events(tenant, user)}
