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

from collections.abc import Sequence
from dataclasses import dataclass

from padlm.core.preferences import Preference, parse_preference
from padlm.data.axes import Axis
from padlm.profiles.features import AXES
from padlm.profiles.learning import Posterior, positive_probability

SIDE_DIGITS = 3  # rounding of the probabilities a response reports


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
    def from_json(cls, data: dict | None) -> ProfileState:
        """A stored state, or a new one for a profile that has none (text only)."""
        if not data:
            return cls.new()
        axes = tuple(data["axes"])
        if axes != tuple(axis.name for axis in AXES):
            raise ValueError(f"a profile over axes {axes} cannot be read by this padlm (it "
                             f"learns over {', '.join(axis.name for axis in AXES)})")
        return cls(axes, Posterior.from_json(data["posterior"]),
                   tuple(float(c) for c in data["center"]), int(data["rated"]))

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
                  skip: int | None = None) -> list[str]:
    """The side of each axis the posterior leans to: side A where ``P(theta_a > 0) > 1/2``,
    B where it is below (the Bayes decision when a wrong side costs what a right one gains);
    an axis the posterior has no lean on (no choice yet) gets no side, and ``skip`` none."""
    sides = []
    for index, (axis, p) in enumerate(zip(axes, positive_probability(posterior), strict=True)):
        if index != skip and p != 0.5:
            sides.append(axis.a.id if p > 0.5 else axis.b.id)
    return sides


def compose(sides: Sequence[str], text: str | None) -> Preference:
    """The preference a profile decodes with: its sides' preset texts (ids kept, so the
    experts and the dimension rewards read them), then its own text (free text: ids then
    None, and ``mix`` picks experts by the text)."""
    preset = parse_preference("+".join(sides)) if sides else Preference()
    if not text:
        return preset
    return Preference(f"{preset.text} {text}".strip())


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
