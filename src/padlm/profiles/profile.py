"""A profile's learned state, and the preference it decodes with.

The state is what the store keeps as opaque JSON: the posterior over the per-axis weights
(:mod:`padlm.profiles.learning`), and the mean features of the responses the user rated with
a thumb (a thumb says "better or worse than what I usually get", so it is compared with that
mean). What a profile decodes with is a :class:`~padlm.core.preferences.Preference` composed
of the side of every axis the posterior leans to, plus the profile's own text (from the
user's history), so every strategy that reads preferences (``pad``, ``prompt``,
``linear-alignment``, ``mix``) reads a profile the same way.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from padlm.core.preferences import PRESETS, Preference, parse_preference
from padlm.data.axes import SIDES, Axis, generation_text
from padlm.errors import PadlmError
from padlm.profiles.features import AXES
from padlm.profiles.learning import Posterior, positive_probability

SIDE_DIGITS = 3  # rounding of the probabilities a response reports


class ProfileError(PadlmError):
    """A refusal the server answers with ``status`` (404: no such response; 403: another
    user's response; 409: a profile over other axes)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ProfileState:
    """The learner's state of one profile (the store's ``state`` JSON)."""

    axes: tuple[str, ...]
    posterior: Posterior
    center: tuple[float, ...]  # mean features of the thumb-rated responses
    rated: int  # how many responses the center averages

    @classmethod
    def new(cls, axes: Sequence[Axis] = AXES) -> ProfileState:
        dims = len(axes)
        return cls(tuple(axis.name for axis in axes), Posterior.prior(dims), (0.0,) * dims, 0)

    def to_json(self) -> dict:
        return {"axes": list(self.axes), "posterior": self.posterior.to_json(),
                "center": list(self.center), "rated": self.rated}

    @classmethod
    def from_json(cls, data: dict | None, axes: Sequence[Axis] = AXES) -> ProfileState:
        """A stored state over ``axes`` (a new one for a profile that has none: text only).

        A state learned over fewer axes (a server since started with more
        ``--profile-axes``) gains the new ones at the prior, uncorrelated with what was
        learned, which is exactly the belief of a learner that never saw them; one learned
        over an axis not in ``axes`` is refused rather than dropped, so no server started
        with fewer axes loses what another learned."""
        if not data:
            return cls.new(axes)
        stored = tuple(data["axes"])
        names = tuple(axis.name for axis in axes)
        missing = [name for name in stored if name not in names]
        if missing:
            raise ProfileError(
                f"this profile has learned axes {', '.join(missing)} that this padlm does not "
                f"learn (its profile axes: {', '.join(names)}); start it with --profile-axes "
                f"{','.join((*names, *missing))}", "profile_axes", 409, "profile_axes")
        state = cls(stored, Posterior.from_json(data["posterior"]),
                    tuple(float(c) for c in data["center"]), int(data["rated"]))
        return state if stored == names else state._over(names)

    def _over(self, names: tuple[str, ...]) -> ProfileState:
        """The state re-indexed to ``names`` (a superset of its axes), new axes at the prior."""
        prior = Posterior.prior(len(names))
        where = {name: self.axes.index(name) for name in names if name in self.axes}

        def cov(i: str, j: str, fresh: float) -> float:
            return self.posterior.cov[where[i]][where[j]] if i in where and j in where \
                else fresh

        mean = tuple(self.posterior.mean[where[n]] if n in where else 0.0 for n in names)
        covariance = tuple(tuple(cov(i, j, prior.cov[a][b]) for b, j in enumerate(names))
                           for a, i in enumerate(names))
        center = tuple(self.center[where[n]] if n in where else 0.0 for n in names)
        return ProfileState(names, Posterior(mean, covariance), center, self.rated)

    def rated_center(self, features: Sequence[float]) -> tuple[ProfileState, list[float]]:
        """A thumb's comparison vector ``phi(y) - center`` (center: the mean of the rated
        responses BEFORE this one; the first thumb compares with nothing, so it teaches
        nothing), and the state with this response in the mean."""
        z = [f - c for f, c in zip(features, self.center, strict=True)]
        if self.rated == 0:
            z = [0.0] * len(z)
        count = self.rated + 1
        center = tuple(c + (f - c) / count for f, c in zip(features, self.center, strict=True))
        return ProfileState(self.axes, self.posterior, center, count), z


def learned_sides(posterior: Posterior, axes: Sequence[Axis] = AXES,
                  skip: Collection[int] = ()) -> list[str]:
    """The side of each axis the posterior leans to: side A where ``P(theta_a > 0) > 1/2``,
    B where it is below (the Bayes decision when a wrong side costs what a right one gains);
    an axis the posterior has no lean on (no choice yet) gets no side, nor do those in
    ``skip``."""
    sides = []
    for index, (axis, p) in enumerate(zip(axes, positive_probability(posterior), strict=True)):
        if index not in skip and p != 0.5:
            sides.append(axis.a.id if p > 0.5 else axis.b.id)
    return sides


def contrasted_sides(contrast: Sequence[int], axes: Sequence[Axis] = AXES
                     ) -> tuple[list[str], list[str]]:
    """Each explore answer's sides on the axes ``contrast`` moves, in axis order
    (``x_a = +1``: the first answer takes side A)."""
    moved = [(axis, x) for axis, x in zip(axes, contrast, strict=True) if x]
    return ([(axis.a if x > 0 else axis.b).id for axis, x in moved],
            [(axis.b if x > 0 else axis.a).id for axis, x in moved])


def explore_sides(posterior: Posterior, contrast: Sequence[int],
                  axes: Sequence[Axis] = AXES) -> tuple[list[str], list[str]]:
    """The sides of an explore pair's two answers for ``contrast``
    (:func:`~padlm.profiles.learning.explore_contrast`): opposite sides on every contrasted
    axis, and the profile's own lean (if any) on both for the rest, so neither answer gives
    up what the profile already knows."""
    kept = learned_sides(posterior, axes, skip=[a for a, x in enumerate(contrast) if x])
    first, second = contrasted_sides(contrast, axes)
    return sorted([*kept, *first]), sorted([*kept, *second])


def compose(sides: Sequence[str], text: str | None, instructed: bool = False) -> Preference:
    """The preference a profile decodes with: its sides' preset texts (ids kept, so the
    experts and the dimension rewards read them), then its own text (free text: ids then
    None, and ``mix`` picks experts by the text).

    ``instructed`` (explore pairs): each side's text followed by the stronger instruction
    the data sampler uses (:func:`~padlm.data.axes.generation_text`). Why: a choice teaches
    only as much as the two answers really differ, and a small model follows a mild
    preference loosely; on 40 training-pool prompts (SmolLM2, ``pad``, 64 tokens;
    ``scripts/explore_instruction_check.py``) the all-A/all-B pair moved the simulated
    user's judges the intended way 0.90 / 0.775 / 0.95 of the time (P1 / P2 / P3) with the
    instructions, 0.825 / 0.75 / 0.85 without."""
    if not sides:
        preset = Preference()
    elif instructed:
        preset = Preference(" ".join(generation_text(side) for side in sides), _ids(sides))
    elif _ids(sides):
        preset = parse_preference("+".join(sides))
    else:
        preset = Preference(" ".join(SIDES[side].text for side in sides))
    if not text:
        return preset
    return Preference(f"{preset.text} {text}".strip())


def _ids(sides: Sequence[str]) -> tuple[str, ...] | None:
    """The sides as preset ids when all are (what the experts and dimension rewards act
    on); a free-text side makes the preference free text."""
    return tuple(sides) if all(side in PRESETS for side in sides) else None


def summary(state: ProfileState, choices: int, version: int, text: str | None,
            preference: Preference, axes: Sequence[Axis] = AXES) -> dict:
    """What a response's ``padlm.profile`` says of the profile state it was decoded with."""
    posterior = state.posterior
    variances = [posterior.cov[i][i] for i in range(posterior.dims)]
    return {
        "version": version, "choices": choices,
        "axes": {axis.name: {"sides": [axis.a.id, axis.b.id], "weight": round(mean, 4),
                             "sd": round(variance ** 0.5, 4),
                             "p_side_a": round(p, SIDE_DIGITS)}
                 for axis, mean, variance, p in zip(axes, posterior.mean, variances,
                                                    positive_probability(posterior),
                                                    strict=True)},
        "text": text, "preference": preference.text or None,
    }
