"""The online preference model against brute-force references: grid search, gradient ascent,
finite-difference Hessians, a batch Newton fit and Monte Carlo, all written plainly here."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from padlm.profiles import learning
from padlm.profiles.learning import Posterior

F64 = torch.float64


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def log_posterior(theta: torch.Tensor, m: torch.Tensor, cov: torch.Tensor,
                  z: torch.Tensor) -> float:
    """log sigmoid(theta.z) - 1/2 (theta-m)^T S^-1 (theta-m), up to a constant."""
    d = theta - m
    return float(torch.nn.functional.logsigmoid(theta @ z) - 0.5 * d @ torch.linalg.solve(cov, d))


def finite_difference_hessian(f, x: torch.Tensor, h: float = 1e-4) -> torch.Tensor:
    """Central differences, one entry at a time."""
    n = len(x)
    hessian = torch.zeros(n, n, dtype=F64)
    eye = torch.eye(n, dtype=F64) * h
    for i in range(n):
        for j in range(n):
            hessian[i, j] = (f(x + eye[i] + eye[j]) - f(x + eye[i] - eye[j])
                             - f(x - eye[i] + eye[j]) + f(x - eye[i] - eye[j])) / (4 * h * h)
    return hessian


def assert_valid_gaussian(posterior: Posterior) -> None:
    cov = tensor(posterior.cov)
    assert torch.equal(cov, cov.T)
    assert torch.linalg.eigvalsh(cov).min() > 0
    assert torch.linalg.cholesky_ex(cov).info == 0
    assert all(math.isfinite(x) for x in posterior.mean)


# 1. One update against brute force


@pytest.mark.parametrize(("m", "var", "z"), [
    (0.0, 1.0, 1.0),
    (0.4, 2.0, -1.3),
    (-1.0, 0.5, 4.0),
    (3.0, 1.0, 2.0),  # already confident: a small step
    (-2.0, 3.0, 2.5),  # a surprise: a big step
])
def test_one_update_1d_equals_grid_search_and_inverse_hessian(m, var, z):
    post = learning.update(Posterior((m,), ((var,),)), [z])
    mt, cov, zt = tensor([m]), tensor([[var]]), tensor([z])

    # Dense grid over +-10 sd, then a second grid around the best point.
    sd = math.sqrt(var)
    grid = torch.linspace(m - 10 * sd, m + 10 * sd, 200_001, dtype=F64)
    values = torch.nn.functional.logsigmoid(grid * z) - 0.5 * (grid - m) ** 2 / var
    best = float(grid[values.argmax()])
    step = float(grid[1] - grid[0])
    fine = torch.linspace(best - 2 * step, best + 2 * step, 100_001, dtype=F64)
    values = torch.nn.functional.logsigmoid(fine * z) - 0.5 * (fine - m) ** 2 / var
    theta_map = float(fine[values.argmax()])
    assert post.mean[0] == pytest.approx(theta_map, abs=1e-6)

    hessian = finite_difference_hessian(lambda t: log_posterior(t, mt, cov, zt),
                                        tensor([post.mean[0]]))
    assert post.cov[0][0] == pytest.approx(float(-1 / hessian[0, 0]), rel=1e-5)


@pytest.mark.parametrize(("m", "cov", "z"), [
    ([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]], [1.0, 0.5]),
    ([0.3, -0.5], [[1.0, 0.4], [0.4, 0.5]], [1.2, -0.7]),
    ([1.5, 1.0], [[0.3, -0.1], [-0.1, 2.0]], [-2.0, -1.0]),
])
def test_one_update_2d_equals_gradient_ascent_and_inverse_hessian(m, cov, z):
    post = learning.update(Posterior(tuple(m), tuple(map(tuple, cov))), z)
    mt, ct, zt = tensor(m), tensor(cov), tensor(z)

    # Plain gradient ascent with a step below 1 / (largest curvature): it cannot overshoot.
    precision = torch.linalg.inv(ct)
    step = 1.0 / (float(torch.linalg.eigvalsh(precision).max()) + 0.25 * float(zt @ zt))
    theta = mt.clone()
    for _ in range(20_000):
        gradient = torch.sigmoid(-(theta @ zt)) * zt - precision @ (theta - mt)
        theta = theta + step * gradient
    assert torch.allclose(tensor(post.mean), theta, atol=1e-8)

    hessian = finite_difference_hessian(lambda t: log_posterior(t, mt, ct, zt),
                                        tensor(post.mean))
    assert torch.allclose(tensor(post.cov), torch.linalg.inv(-hessian), atol=1e-6)


@pytest.mark.parametrize("s", [-1e3, -30.0, -2.0, 0.0, 0.7, 40.0, 1e3])
@pytest.mark.parametrize("q", [1e-12, 1e-3, 1.0, 50.0, 1e6, 1e9])
def test_map_margin_solves_the_stationarity_equation(s, q):
    t = learning.map_margin(s, q)
    assert s <= t <= s + q
    # t = s + q sigmoid(-t); compare with bisection on the same monotone function.
    lo, hi = s, s + q
    for _ in range(400):
        mid = 0.5 * (lo + hi)
        if mid - s - q * torch.sigmoid(-tensor(mid)).item() > 0:
            hi = mid
        else:
            lo = mid
    assert t == pytest.approx(0.5 * (lo + hi), rel=1e-11, abs=1e-11)


def test_zero_z_changes_nothing():
    post = Posterior((0.5, -0.2), ((1.0, 0.3), (0.3, 2.0)))
    assert learning.update(post, [0.0, 0.0]) == post


# 2. Toy data: the sequential filter against the batch MAP

TRUE_THETA = (1.5, -1.0, 0.6)


def toy_data(n: int, seed: int) -> torch.Tensor:
    """Pairs z ~ N(0, I), labelled by sigmoid(theta.z), oriented towards the chosen side."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=generator, dtype=F64)
    chose_a = torch.rand(n, generator=generator, dtype=F64) < torch.sigmoid(z @ tensor(TRUE_THETA))
    return torch.where(chose_a[:, None], z, -z)


def batch_map(zs: torch.Tensor, variance: float = learning.PRIOR_VARIANCE) -> torch.Tensor:
    """Newton's method on sum log sigmoid(theta.z_i) - |theta|^2 / (2 v0)."""
    theta = torch.zeros(zs.shape[1], dtype=F64)
    for _ in range(50):
        p = torch.sigmoid(zs @ theta)
        gradient = zs.T @ (1 - p) - theta / variance
        hessian = -(zs.T * (p * (1 - p))) @ zs - torch.eye(len(theta), dtype=F64) / variance
        theta = theta - torch.linalg.solve(hessian, gradient)
    assert gradient.abs().max() < 1e-10
    return theta


def sequential_mean(zs: torch.Tensor) -> torch.Tensor:
    return tensor(learning.update_all(Posterior.prior(zs.shape[1]), zs.tolist()).mean)


@pytest.mark.parametrize("seed", range(5))
def test_sequential_mean_is_close_to_batch_map_and_recovers_signs(seed):
    # Measured over seeds 0-4: cosine >= 0.9995, relative error 0.045 .. 0.089 (the filter
    # shrinks slightly towards the prior: each early step linearises around a worse mean).
    zs = toy_data(200, seed)
    mean, reference = sequential_mean(zs), batch_map(zs)
    cosine = float(mean @ reference / (mean.norm() * reference.norm()))
    assert cosine > 0.99
    assert float((mean - reference).norm() / reference.norm()) < 0.1
    assert torch.equal(mean.sign(), tensor(TRUE_THETA).sign())


def test_error_shrinks_with_more_data():
    # Averaged over seeds: one seed's 20 pairs can be lucky (seed 3: 0.51 vs 0.56).
    # Measured mean error: 0.95 at n = 20, 0.33 at n = 200.
    theta = tensor(TRUE_THETA)
    errors = {n: sum(float((sequential_mean(toy_data(200, seed)[:n]) - theta).norm())
                     for seed in range(5)) / 5 for n in (20, 200)}
    assert errors[200] < 0.5 * errors[20]


# 3. Order


def test_order_of_observations_matters_little():
    # Measured over 5 seeds x 10 permutations: |mean_perm - mean| / |mean| <= 0.083 and every
    # axis within 0.57 posterior standard deviations; bounds 0.12 and 0.8. The shift is of
    # the size of the filter's gap to the batch MAP and well inside the posterior's spread.
    worst_relative, worst_in_sd = 0.0, 0.0
    for seed in range(5):
        zs = toy_data(200, seed)
        post = learning.update_all(Posterior.prior(3), zs.tolist())
        mean = tensor(post.mean)
        sd = torch.diagonal(tensor(post.cov)).sqrt()
        for k in range(10):
            perm = torch.randperm(200, generator=torch.Generator().manual_seed(1000 * seed + k))
            shuffled = sequential_mean(zs[perm])
            worst_relative = max(worst_relative, float((shuffled - mean).norm() / mean.norm()))
            worst_in_sd = max(worst_in_sd, float(((shuffled - mean).abs() / sd).max()))
    assert worst_relative < 0.12
    assert worst_in_sd < 0.8


# 4. Win probability


def test_win_probability_without_uncertainty_is_the_plain_sigmoid():
    m, z = (0.8, -1.2, 0.3), [1.0, 0.5, -2.0]
    post = Posterior(m, tuple(tuple(1e-12 if i == j else 0.0 for j in range(3))
                              for i in range(3)))
    plain = float(torch.sigmoid(tensor(m) @ tensor(z)))
    assert learning.win_probability(post, z) == pytest.approx(plain, abs=1e-9)


def test_win_probability_shrinks_towards_half_as_variance_grows():
    m, z = (0.8, -1.2), [1.0, -0.5]
    distances = []
    for variance in (0.01, 0.1, 1.0, 10.0, 100.0, 1e4):
        p = learning.win_probability(Posterior(m, ((variance, 0.0), (0.0, variance))), z)
        assert p > 0.5  # m.z > 0: uncertainty never flips the side
        distances.append(p - 0.5)
    assert all(a > b for a, b in zip(distances, distances[1:], strict=False))
    assert distances[-1] < 0.02


@pytest.mark.parametrize(("m", "cov", "z"), [
    ((0.5, -1.0), ((1.0, 0.3), (0.3, 0.8)), [1.0, -0.8]),
    ((1.5, 0.5), ((2.0, -0.5), (-0.5, 1.0)), [1.0, -0.8]),
    ((-0.3, 0.2), ((4.0, 1.0), (1.0, 3.0)), [2.0, 1.0]),
])
def test_win_probability_matches_monte_carlo(m, cov, z):
    # Measured gaps: 0.004 or less (the probit approximation's own error; MC's SE ~ 0.001).
    generator = torch.Generator().manual_seed(0)
    chol = torch.linalg.cholesky(tensor(cov))
    samples = tensor(m) + torch.randn(100_000, 2, generator=generator, dtype=F64) @ chol.T
    monte_carlo = float(torch.sigmoid(samples @ tensor(z)).mean())
    assert learning.win_probability(Posterior(m, cov), z) == pytest.approx(monte_carlo, abs=0.01)


# 5. Positive probability and the most uncertain axis


def test_positive_probability_matches_monte_carlo():
    m = (0.5, -1.0, 0.0, 2.0)
    a = tensor([[1.0, 0.2, 0.0, 0.1], [0.0, 0.7, 0.3, 0.0], [0.2, 0.0, 1.5, 0.4],
                [0.0, 0.1, 0.0, 0.5]])
    cov = a @ a.T
    post = Posterior(m, tuple(map(tuple, cov.tolist())))
    generator = torch.Generator().manual_seed(1)
    samples = tensor(m) + torch.randn(100_000, 4, generator=generator, dtype=F64) @ a.T
    monte_carlo = (samples > 0).to(F64).mean(0)
    assert torch.allclose(tensor(learning.positive_probability(post)), monte_carlo, atol=0.01)
    assert learning.positive_probability(post)[2] == 0.5


def brute_force_contrast_gain(post: Posterior, x: tuple[int, ...]) -> float:
    """1/2 log(1 + p(1-p) x^T S x) at the probit-moderated p, in plain floats."""
    d = len(x)
    s = sum(post.mean[a] * x[a] for a in range(d))
    q = sum(x[a] * post.cov[a][b] * x[b] for a in range(d) for b in range(d))
    p = 1.0 / (1.0 + math.exp(-s / math.sqrt(1.0 + math.pi * q / 8.0)))
    return 0.5 * math.log1p(p * (1.0 - p) * q)


def test_explore_contrast_from_the_prior_contrasts_every_axis():
    # at the prior every contrast has p = 1/2, so the gain grows with x^T x = the axes it moves
    assert learning.explore_contrast(Posterior.prior(3)) == (1, 1, 1)
    assert learning.explore_contrast(Posterior.prior(1)) == (1,)


def test_explore_contrast_leaves_out_an_axis_the_profile_is_sure_of():
    # axis 0: mean 3, sd 0.3. Contrasting it moves p to ~0.9: (0, 1, 1) gains more
    post = Posterior((3.0, 0.0, 0.0), ((0.09, 0, 0), (0, 1.0, 0), (0, 0, 1.0)))
    assert learning.explore_contrast(post) == (0, 1, 1)


def test_explore_contrast_turns_to_directions_not_yet_asked():
    # after a choice along (1, 1, 1) the variance along it shrank: a one-minus pattern next
    post = learning.update(Posterior.prior(3), [0.5, 0.5, 0.5])
    nxt = learning.explore_contrast(post)
    assert nxt != (1, 1, 1) and sorted(nxt) == [-1, 1, 1]


@pytest.mark.parametrize("seed", range(20))
def test_explore_contrast_maximises_the_gain_over_every_contrast(seed):
    generator = torch.Generator().manual_seed(seed)
    d = 1 + seed % 4
    a = torch.randn(d, d, generator=generator, dtype=F64)
    mean = torch.randn(d, generator=generator, dtype=F64) * 2
    post = Posterior(tuple(mean.tolist()), tuple(map(tuple, (a @ a.T + 0.1 * torch.eye(
        d, dtype=F64)).tolist())))
    every = [x for x in itertools.product((-1, 0, 1), repeat=d) if any(x)]
    best = max(brute_force_contrast_gain(post, x) for x in every)
    chosen = learning.explore_contrast(post)
    assert chosen in every and next(v for v in chosen if v) == 1  # canonical sign
    assert brute_force_contrast_gain(post, chosen) == pytest.approx(best, rel=1e-9)


def test_explore_contrast_refuses_more_axes_than_it_can_enumerate():
    with pytest.raises(ValueError, match="11 axes"):
        learning.explore_contrast(Posterior.prior(learning.MAX_EXPLORE_DIMS + 1))


# 6. JSON and validation


def test_json_round_trip():
    post = learning.update_all(Posterior.prior(3), toy_data(10, 0).tolist())
    data = json.loads(json.dumps(post.to_json()))
    assert set(data) == {"mean", "cov"}
    assert Posterior.from_json(data) == post
    assert Posterior.from_json(Posterior.prior(2, 0.5).to_json()) == Posterior.prior(2, 0.5)
    assert Posterior.prior(4).dims == 4


@pytest.mark.parametrize(("data", "problem"), [
    ({"cov": [[1.0]]}, "missing 'mean'"),
    ({"mean": [0.0]}, "missing 'cov'"),
    ([0.0], "must be an object"),
    ({"mean": 0.0, "cov": [[1.0]]}, "mean must be a list"),
    ({"mean": [0.0], "cov": [1.0]}, "cov must be a list of lists"),
    ({"mean": [], "cov": []}, "at least one axis"),
    ({"mean": [0.0, 0.0], "cov": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]}, "must be 2 x 2"),
    ({"mean": [0.0, 0.0], "cov": [[1.0]]}, "must be 2 x 2"),
    ({"mean": [0.0], "cov": [[1.0], [1.0]]}, "must be 1 x 1"),
    ({"mean": [float("nan")], "cov": [[1.0]]}, "mean has a non-finite"),
    ({"mean": [0.0], "cov": [[float("inf")]]}, "cov has a non-finite"),
    ({"mean": ["0.1"], "cov": [[1.0]]}, "mean holds a non-number"),
    ({"mean": [0.0], "cov": [[True]]}, "cov holds a non-number"),
    ({"mean": [0.0, 0.0], "cov": [[1.0, 0.5], [0.4, 1.0]]}, "not symmetric"),
    ({"mean": [0.0, 0.0], "cov": [[1.0, 2.0], [2.0, 1.0]]}, "not positive definite"),
    ({"mean": [0.0], "cov": [[0.0]]}, "not positive definite"),
])
def test_from_json_rejects(data, problem):
    with pytest.raises(ValueError, match=problem):
        Posterior.from_json(data)


@pytest.mark.parametrize(("z", "problem"), [
    ([1.0], "1 values, the posterior has 2 axes"),
    ([1.0, 2.0, 3.0], "3 values"),
    ([float("nan"), 1.0], "non-finite"),
    ([1.0, float("-inf")], "non-finite"),
    (["a", 1.0], "sequence of numbers"),
])
def test_update_and_win_probability_reject_bad_z(z, problem):
    post = Posterior.prior(2)
    with pytest.raises(ValueError, match=problem):
        learning.update(post, z)
    with pytest.raises(ValueError, match=problem):
        learning.win_probability(post, z)
    with pytest.raises(ValueError, match=problem):
        learning.update_all(post, [[0.5, 0.5], z])


@pytest.mark.parametrize(("dims", "variance"), [(0, 1.0), (-1, 1.0), (2, 0.0), (2, -1.0),
                                                (2, float("nan")), (2, float("inf"))])
def test_prior_rejects_bad_arguments(dims, variance):
    with pytest.raises(ValueError):
        Posterior.prior(dims, variance)


# 7. Numerical robustness


def test_huge_z_keeps_the_covariance_positive_definite():
    z = [1e3, -1e3, 500.0]
    post = learning.update(Posterior.prior(3), z)
    assert_valid_gaussian(post)
    # Against the precision form, which cannot cancel: S' = (I / v0 + lam z z^T)^-1, lam at
    # the MAP margin. The margin is only ~log(z^T S z), so lam is tiny and the variance along
    # z shrinks by ~15x, not to zero: the likelihood is nearly flat where the MAP lands.
    zt = tensor(z)
    margin = tensor(post.mean) @ zt
    lam = torch.sigmoid(margin) * torch.sigmoid(-margin)
    expected = torch.linalg.inv(torch.eye(3, dtype=F64) + lam * torch.outer(zt, zt))
    assert torch.allclose(tensor(post.cov), expected, rtol=1e-9, atol=1e-12)
    orthogonal = tensor([1.0, 1.0, 0.0])  # z . orthogonal = 0: untouched
    assert float(orthogonal @ tensor(post.cov) @ orthogonal) == pytest.approx(2.0, rel=1e-9)
    # ... and then a contradicting huge observation.
    post = learning.update(post, [-x for x in z])
    assert_valid_gaussian(post)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_many_identical_observations_stay_finite_and_definite(scale):
    z = [scale * x for x in (1.0, 2.0, -1.0)]
    post, margins, spreads = Posterior.prior(3), [], []
    for _ in range(1000):
        post = learning.update(post, z)
        margins.append(sum(m * x for m, x in zip(post.mean, z, strict=True)))
        spreads.append(float(tensor(z) @ tensor(post.cov) @ tensor(z)))
    assert_valid_gaussian(post)
    # Each agreeing click raises the margin and narrows the belief along z, never the reverse.
    assert all(b > a for a, b in zip(margins, margins[1:], strict=False))
    assert all(b < a for a, b in zip(spreads, spreads[1:], strict=False))
    assert learning.win_probability(post, z) > (0.99 if scale == 1.0 else 0.5)
