"""The online preference model of a profile: Bayesian logistic regression, one Laplace step
per observed choice.

A user's taste is a weight vector ``theta`` over a few preference axes. Choosing response A
over B, with per-axis features ``phi(A)``, ``phi(B)``, is observed with likelihood
``sigmoid(theta . z)``, ``z = phi(A) - phi(B)`` (Bradley-Terry); the caller builds ``z``
(a thumbs-up on one response is ``phi(y) - center``, a thumbs-down its negation).

The posterior is kept as a Gaussian ``N(m, S)`` and updated one observation at a time by an
exact Laplace step (assumed-density filtering): a profile learns from each click as it comes,
without replaying its history, and the state stays a few dozen numbers that fit in a row.

Why the step is exact and cheap: the MAP of ``log sigmoid(theta.z) - 1/2 (theta-m)^T S^-1
(theta-m)`` lies on the line ``theta = m + alpha S z`` (stationarity), so the d-dimensional
optimisation is one monotone scalar equation; the new covariance is the inverse Hessian at
the MAP, a rank-one Sherman-Morrison downdate of ``S``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import torch

# v0 of the prior theta ~ N(0, v0 I). Features are of order 1, so a weight of order 1 turns a
# one-unit feature difference into odds of e:1; v0 = 1 puts such weights at one standard
# deviation: a strong taste is plausible a priori, yet a single click cannot drive the win
# probability to certainty (after one observation with |z| = 1 the margin is about 0.4).
PRIOR_VARIANCE: float = 1.0

_DTYPE = torch.float64
_SYMMETRY_TOLERANCE = 1e-9  # relative to the largest |entry|: JSON-rounded floats still pass
_NEWTON_TOLERANCE = 1e-12
_NEWTON_MAX_STEPS = 200
MAX_EXPLORE_DIMS = 10  # 3^10 / 2 candidate contrasts, scored in one tensor op


@dataclass(frozen=True)
class Posterior:
    """The Gaussian ``N(mean, cov)`` over a profile's preference weights.

    Immutable tuples rather than tensors: a posterior is stored, compared and serialised far
    more often than it is updated, and every instance is checked valid on construction, so a
    corrupt row cannot reach the math."""

    mean: tuple[float, ...]
    cov: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        _check_gaussian(self.mean, self.cov)

    @classmethod
    def prior(cls, dims: int, variance: float = PRIOR_VARIANCE) -> Posterior:
        """The belief before any choice: ``N(0, variance I)``."""
        if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
            raise ValueError(f"dims must be a positive integer, got {dims!r}")
        if not (math.isfinite(variance) and variance > 0):
            raise ValueError(f"prior variance must be finite and > 0, got {variance!r}")
        cov = tuple(tuple(float(variance) if i == j else 0.0 for j in range(dims))
                    for i in range(dims))
        return cls((0.0,) * dims, cov)

    @property
    def dims(self) -> int:
        return len(self.mean)

    def to_json(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "cov": [list(row) for row in self.cov]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Posterior:
        """Inverse of ``to_json``; raises ValueError naming the problem (a stored row is
        untrusted input: a hand-edited or truncated profile must not poison later updates)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"posterior must be an object, got {type(data).__name__}")
        for key in ("mean", "cov"):
            if key not in data:
                raise ValueError(f"posterior is missing {key!r}")
        mean, cov = data["mean"], data["cov"]
        if not _is_list(mean):
            raise ValueError("posterior mean must be a list of numbers")
        if not _is_list(cov) or not all(_is_list(row) for row in cov):
            raise ValueError("posterior cov must be a list of lists of numbers")
        return cls(tuple(_number(x, "mean") for x in mean),
                   tuple(tuple(_number(x, "cov") for x in row) for row in cov))

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.mean, dtype=_DTYPE), torch.tensor(self.cov, dtype=_DTYPE)


def update(posterior: Posterior, z: Sequence[float]) -> Posterior:
    """The posterior after one observation with likelihood ``sigmoid(theta . z)``.

    ``z`` points to the chosen side: choosing A over B is ``phi(A) - phi(B)``."""
    m, cov = posterior._tensors()
    zt = _vector(z, posterior.dims)
    u = cov @ zt  # S z
    s = float(m @ zt)
    q = float(zt @ u)  # z^T S z >= 0
    if q <= 0.0:  # z = 0 (or below resolution): the observation says nothing about theta
        return posterior
    margin = map_margin(s, q)
    alpha = _sigmoid(-margin)
    new_mean = m + alpha * u
    lam = _sigmoid(margin) * _sigmoid(-margin)  # curvature of -log sigmoid at the MAP
    new_cov = _downdate(cov, zt, lam)
    return Posterior(tuple(new_mean.tolist()), tuple(tuple(row) for row in new_cov.tolist()))


def update_all(posterior: Posterior, zs: Sequence[Sequence[float]]) -> Posterior:
    """One ``update`` per observation, in the given order (the filter is order-dependent
    only slightly; see the tests for how much)."""
    for z in zs:
        posterior = update(posterior, z)
    return posterior


def win_probability(posterior: Posterior, z: Sequence[float]) -> float:
    """Predictive ``P(A beats B)``, ``theta`` integrated out, by the probit approximation
    ``sigmoid(m.z / sqrt(1 + pi z^T S z / 8))``.

    Why not ``sigmoid(m.z)``: an uncertain profile should not be confident; the predictive
    shrinks towards 1/2 as the variance along ``z`` grows."""
    m, cov = posterior._tensors()
    zt = _vector(z, posterior.dims)
    s, q = float(m @ zt), float(zt @ cov @ zt)
    return _sigmoid(s / math.sqrt(1.0 + math.pi * max(q, 0.0) / 8.0))


def positive_probability(posterior: Posterior) -> tuple[float, ...]:
    """``P(theta_a > 0)`` per axis under the Gaussian: ``Phi(m_a / sqrt(S_aa))``."""
    return tuple(_normal_cdf(mean / math.sqrt(posterior.cov[a][a]))
                 for a, mean in enumerate(posterior.mean))


def explore_contrast(posterior: Posterior) -> tuple[int, ...]:
    """The A/B contrast one choice teaches the most from: ``x`` in ``{-1, 0, 1}^d``, where
    ``x_a = +1`` gives the first answer side A of axis ``a`` and the second side B, ``-1``
    the reverse, ``0`` both the same side.

    Taken as the pair's feature difference ``z = x`` (one unit of lean per contrasted axis),
    a choice's Laplace step downdates the covariance by rank one with curvature
    ``p (1 - p)``, removing ``1/2 log(1 + p (1 - p) x^T S x)`` nats of entropy; ``x`` maximises
    that at the predictive ``p`` (:func:`win_probability`). Why not one axis at a time: a
    user's choice weighs every axis the two answers differ on, so a pair that differs on all
    the uncertain axes teaches each of them from every choice, while one contrasted axis
    teaches that axis only and leaves the others' differences to chance. An axis the
    profile is sure of drops out by itself (contrasting it drives ``p`` from 1/2), and a
    direction already tested has a smaller ``x^T S x``, so successive pairs turn to the
    contrasts not yet asked. Ties go to more contrasted axes, then the first in order."""
    contrasts = _contrasts(posterior.dims)
    m, cov = posterior._tensors()
    s = contrasts @ m
    q = ((contrasts @ cov) * contrasts).sum(dim=1).clamp(min=0.0)
    p = torch.sigmoid(s / torch.sqrt(1.0 + math.pi * q / 8.0))
    gain = torch.log1p(p * (1.0 - p) * q)
    # round off float noise so symmetric candidates tie exactly and the order decides
    best = int(torch.argmax(torch.round(gain * 1e12)))  # the first of the maxima
    return tuple(int(v) for v in contrasts[best].tolist())


def _contrasts(dims: int) -> torch.Tensor:
    """Every nonzero ``x`` in ``{-1, 0, 1}^dims`` up to sign (``x`` and ``-x`` are the same
    pair shown the other way round), most contrasted axes first."""
    if dims > MAX_EXPLORE_DIMS:
        raise ValueError(f"explore enumerates 3^d contrasts; {dims} axes is more than "
                         f"{MAX_EXPLORE_DIMS}")
    rows = [x for x in product((1, -1, 0), repeat=dims)
            if any(x) and next(v for v in x if v) == 1]
    rows.sort(key=lambda x: -sum(map(abs, x)))  # stable: keeps the product's order within
    return torch.tensor(rows, dtype=_DTYPE)


def map_margin(s: float, q: float) -> float:
    """The margin ``t = theta_map . z`` of the Laplace step, given ``s = m.z``, ``q = z^T S z``.

    On the line ``theta = m + alpha S z``, stationarity is ``alpha = sigmoid(-(s + alpha q))``;
    written in the margin ``t = s + alpha q`` it is ``g(t) = t - s - q sigmoid(-t) = 0``, the
    same equation, but resolved to 1e-12 relative in ``t`` rather than in ``alpha`` (a tiny
    ``alpha`` times a huge ``q`` would otherwise lose the margin's digits). ``g`` is strictly
    increasing (``g' = 1 + q p (1-p)``) with ``g(s) <= 0 <= g(s + q)``, so Newton's method
    kept inside that bracket (bisecting when a step leaves it) always converges."""
    if q <= 0.0:
        return s
    lo, hi = s, s + q
    t = s + q * _sigmoid(-s) / (1.0 + q * 0.25)  # one Newton step from s with the max slope
    for _ in range(_NEWTON_MAX_STEPS):
        p, not_p = _sigmoid(t), _sigmoid(-t)  # both from the stable form: no 1 - p
        g = t - s - q * not_p
        if g > 0:
            hi = t
        elif g < 0:
            lo = t
        else:
            return t
        step = g / (1.0 + q * p * not_p)
        candidate = t - step
        if not lo < candidate < hi:
            candidate = 0.5 * (lo + hi)
        scale = _NEWTON_TOLERANCE * max(1.0, abs(candidate))
        if abs(candidate - t) <= scale or hi - lo <= scale:
            return candidate
        t = candidate
    return t


def _downdate(cov: torch.Tensor, z: torch.Tensor, lam: float) -> torch.Tensor:
    """``S - lam S z z^T S / (1 + lam z^T S z)``, computed in square-root form.

    Why square-root form: with ``S = L L^T`` and ``w = L^T z`` the update is ``L (I - c w w^T)
    L^T``, and ``I - c w w^T = B^2`` with ``B = I + (r - 1) w w^T / |w|^2``, ``r = 1 / sqrt(1 +
    lam |w|^2)``. Then ``S' = (L B)(L B)^T`` is positive semidefinite by construction, whereas
    the plain subtraction cancels along ``z`` when ``lam z^T S z`` is large (200 clicks with
    ``|z| = 1e6``: smallest eigenvalue 5e-10 relative off, this form 3e-13), and its rounding
    is not guaranteed to stay above zero."""
    chol = _cholesky(cov)
    w = chol.T @ z
    q = float(w @ w)
    if lam <= 0.0 or q <= 0.0:
        return cov
    r = 1.0 / math.sqrt(1.0 + lam * q)
    root = chol + ((r - 1.0) / q) * torch.outer(chol @ w, w)
    new = root @ root.T
    new = 0.5 * (new + new.T)
    return _ensure_positive_definite(new)


def _ensure_positive_definite(cov: torch.Tensor) -> torch.Tensor:
    """Safety net for a covariance whose conditioning has run past float64: add the smallest
    relative jitter that lets Cholesky succeed. Not reached in ordinary use; it keeps a
    pathological click stream from bricking a profile."""
    if int(torch.linalg.cholesky_ex(cov).info) == 0:
        return cov
    identity = torch.eye(len(cov), dtype=_DTYPE) * float(torch.diagonal(cov).abs().max())
    for exponent in range(-15, -3):
        candidate = cov + 10.0**exponent * identity
        if int(torch.linalg.cholesky_ex(candidate).info) == 0:
            return candidate
    raise ValueError("covariance lost positive definiteness beyond repair")


def _cholesky(cov: torch.Tensor) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0:
        raise ValueError("posterior covariance is not positive definite")
    return factor


def _check_gaussian(mean: Sequence[float], cov: Sequence[Sequence[float]]) -> None:
    """Shapes, finiteness, symmetry and positive definiteness, each with its own message."""
    d = len(mean)
    if d < 1:
        raise ValueError("posterior mean must have at least one axis")
    if len(cov) != d or any(len(row) != d for row in cov):
        raise ValueError(f"posterior cov must be {d} x {d} to match the mean's {d} axes")
    if not all(math.isfinite(x) for x in mean):
        raise ValueError("posterior mean has a non-finite value")
    if not all(math.isfinite(x) for row in cov for x in row):
        raise ValueError("posterior cov has a non-finite value")
    matrix = torch.tensor([list(row) for row in cov], dtype=_DTYPE)
    largest = float(matrix.abs().max())
    if float((matrix - matrix.T).abs().max()) > _SYMMETRY_TOLERANCE * max(largest, 1e-300):
        raise ValueError("posterior cov is not symmetric")
    if int(torch.linalg.cholesky_ex(0.5 * (matrix + matrix.T)).info) != 0:
        raise ValueError("posterior cov is not positive definite")


def _vector(z: Sequence[float], dims: int) -> torch.Tensor:
    try:
        values = [float(x) for x in z]
    except (TypeError, ValueError) as error:
        raise ValueError(f"z must be a sequence of numbers: {error}") from None
    if len(values) != dims:
        raise ValueError(f"z has {len(values)} values, the posterior has {dims} axes")
    if not all(math.isfinite(x) for x in values):
        raise ValueError("z has a non-finite value")
    return torch.tensor(values, dtype=_DTYPE)


def _is_list(value: object) -> bool:
    return isinstance(value, list | tuple)


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"posterior {field} holds a non-number: {value!r}")
    return float(value)


def _sigmoid(x: float) -> float:
    """Overflow-free logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))
