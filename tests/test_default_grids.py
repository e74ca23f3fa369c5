"""Every solver's default grid suits every process.

``difflax.sample(..., grid=None)`` takes the solver's ``default_grid`` and adapts it to the process's
``grid_kind`` (:func:`difflax.solvers.registry.default_grid`). The data are a 2-D mixture of three
narrow Gaussians whose exact denoiser stands in for a perfectly trained network; every sampler
takes 10 steps from the same ``x_T`` (512 points), on each named grid of ``GRIDS``.

* Deterministic solvers: the error is the RMS distance to the solution from the same ``x_T`` with
  1000 steps of DPM-Solver++(3M) on ``logsnr``. The default grid's error must be within 1.5x of the
  solver's best named grid, on every process of ``PROCESSES``.
* Stochastic solvers (a sanity check): the distance of the samples (2048 of them) to the data is the
  maximum mean discrepancy with a Gaussian kernel, its data terms in closed form. At 10 steps these
  samplers are far from converged, and on diffusion clocks their best named grid is the one that
  hands most of the work to the final denoising step ("trailing"), so they are held to a weaker
  standard: the default grid is within 1.5x of the best named grid, or of the sampler on VP with its
  own default (its paper's grid).

Each solver compiles one program, called for every grid and for the processes that share a pytree
structure (the DDPM tables); the whole file runs in 64-bit floats, as the flow interpolant's
``logsnr`` reference grid starts with times that round to 1 in 32 bits.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax.analytic import GaussianMixture
from difflax.processes import PROCESSES, DiscreteVP
from difflax.solvers import GRIDS, SOLVERS, Adaptive, Euler, ReplaceKnown, get_solver, make_grid, sdedit
from difflax.solvers.registry import default_grid, resolve_grid

STEPS = 10
BATCH = 512
FACTOR = 1.5
MEANS = jnp.array([[-1.0, 0.5], [1.0, 1.0], [0.3, -1.0]])
STDS = jnp.array([0.2, 0.3, 0.15])
WEIGHTS = jnp.array([0.3, 0.3, 0.4])
BANDWIDTH = 0.3
DETERMINISTIC = ("ddim", "euler", "heun", "edm", "dpm_solver", "dpmpp_2s", "dpmpp_2m", "dpmpp_3m", "unipc", "deis",
                 "ipndm")
STOCHASTIC = ("ddpm", "euler_maruyama", "pc", "dpmpp_2m_sde")
# Annealed Langevin dynamics needs its step size tuned to the process (NCSN's step_lr is for VE with
# sigma_min = 0.01) and many Langevin steps per level: at 10 levels with the defaults its samples
# diverge (sub-VP, EDM) or stay at the prior's scale (scaled-linear table) whatever the grid.
UNJUDGED = ("ald",)
STOCHASTIC_BATCH = 2048
# The programs are tiny and compiling them is the cost of this file: no LLVM optimization and the
# older CPU fusion emitters halve the compile time (same results to 1e-14).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}

# A reverse-SDE step from t_max = 1 of the flow interpolant is singular: Euler-Maruyama's drift
# -1 / (1 - t) divides by alpha(1) = 0.
SINGULAR_AT_T_MAX = {("flow", "euler_maruyama")}
# One test per group of processes that share programs (the DDPM tables), so that a test's programs and
# references are built once, on one worker.
GROUPS = {"vp": ("vp",), "subvp": ("subvp",), "ve": ("ve",), "edm": ("edm",), "flow": ("flow",),
          "ddpm_tables": ("ddpm_linear", "ddpm_cosine", "ddpm_scaled_linear")}
GM = GaussianMixture.isotropic(MEANS, STDS, weights=WEIGHTS)


def test_every_solver_and_process_is_swept():
    assert set(DETERMINISTIC) | set(STOCHASTIC) | set(UNJUDGED) | {"adaptive"} == set(SOLVERS)
    assert all(not get_solver(name).stochastic or name == "edm" for name in DETERMINISTIC)  # edm: no churn
    assert all(get_solver(name).stochastic for name in STOCHASTIC)
    assert sorted(sum(GROUPS.values(), ())) == sorted(PROCESSES)


@pytest.fixture(scope="module", autouse=True)
def _x64_module():
    """64-bit floats for the whole module (the references and programs are shared by its tests)."""
    with jax.enable_x64(True):
        yield


@functools.cache
def _sampler(solver: str):
    """``(process, x_T, ts) -> samples`` of ``solver`` on the grid ``ts``, compiled once per pytree structure."""
    key = jax.random.key(1) if get_solver(solver).stochastic else None

    def draw(process, x_T, ts):
        return difflax.sample(GM.denoiser(process), process, x_T, solver, ts.shape[0] - 1, grid=ts, key=key,
                              final_zero=True)[0]

    return jax.jit(draw, compiler_options=FAST_COMPILE)


def _x_T(process, batch):
    return process.prior_sample(jax.random.key(0), (batch, 2), jnp.float64)


def _draw(solver, process, x_T, ts):
    """``solver``'s samples on the grid ``ts``. ``grid_kind`` only chooses a default grid, so on an
    explicit grid the DDPM tables share one program."""
    program_process = process.replace(grid_kind="diffusion") if isinstance(process, DiscreteVP) else process
    return _sampler(solver)(program_process, x_T, ts)


@functools.cache
def _reference(process_name: str):
    """The solution from ``_x_T(process, BATCH)``: 1000 steps of DPM-Solver++(3M) on ``logsnr``."""
    process = PROCESSES[process_name]()
    return _draw("dpmpp_3m", process, _x_T(process, BATCH), make_grid("logsnr", process, 1000))


def _sweep(process_name, solver, batch, measure):
    """``{grid name: measure(samples)}`` for every named grid, from ``_x_T(process, batch)``."""
    process = PROCESSES[process_name]()
    x_T = _x_T(process, batch)
    return {name: float(measure(_draw(solver, process, x_T, make_grid(name, process, STEPS)))) for name in GRIDS}


def _check_defaults(process_names, solvers, measure, bound):
    """Check ``measure(process, solver)[default] <= bound(process, solver, measures)`` for every pair."""
    failures = []
    for process_name, solver in itertools.product(process_names, solvers):
        if (process_name, solver) in SINGULAR_AT_T_MAX:
            continue
        values = measure(process_name, solver)
        name = default_grid(get_solver(solver), PROCESSES[process_name]())
        limit = bound(process_name, solver, values)
        if not values[name] <= limit:  # NaN fails too
            table = ", ".join(f"{g} {v:.4f}" for g, v in values.items())
            failures.append(f"{process_name}/{solver}: default {name!r} {values[name]:.4f} > {limit:.4f} ({table})")
    assert not failures, "\n".join(failures)


@jax.jit
def _rms(x, reference):
    return jnp.sqrt(jnp.mean(jnp.sum((x - reference) ** 2, axis=-1)))


def _rms_errors(process_name, solver):
    return _sweep(process_name, solver, BATCH, functools.partial(_rms, reference=_reference(process_name)))


@pytest.mark.parametrize("group", list(GROUPS))
def test_deterministic_defaults_are_near_the_best_grid(group):
    _check_defaults(GROUPS[group], DETERMINISTIC, _rms_errors, lambda p, s, errors: FACTOR * min(errors.values()))


@jax.jit
def _mmd(x):
    """Maximum mean discrepancy of the samples ``x`` from the mixture (Gaussian kernel, exact data terms).

    With ``k(x, y) = exp(-|x - y|^2 / (2 l^2))`` in ``d = 2`` dimensions and components
    ``N(mu_k, s_k^2 I)``: ``E_y k(x, y) = sum_k w_k l^2 / (l^2 + s_k^2) exp(-|x - mu_k|^2 / (2 (l^2 + s_k^2)))``
    and ``E k(y, y') = sum_jk w_j w_k l^2 / v_jk exp(-|mu_j - mu_k|^2 / (2 v_jk))``,
    ``v_jk = l^2 + s_j^2 + s_k^2``; the sample term is the U-statistic.
    """
    n, l2 = x.shape[0], BANDWIDTH**2
    kxx = (jnp.sum(jnp.exp(-jnp.sum((x[:, None] - x[None]) ** 2, -1) / (2 * l2))) - n) / (n * (n - 1))
    v = l2 + STDS**2
    kxy = jnp.mean(jnp.sum(WEIGHTS * l2 / v * jnp.exp(-jnp.sum((x[:, None] - MEANS) ** 2, -1) / (2 * v)), -1))
    vv = l2 + STDS[:, None] ** 2 + STDS[None] ** 2
    kyy = jnp.sum(WEIGHTS[:, None] * WEIGHTS[None] * l2 / vv
                  * jnp.exp(-jnp.sum((MEANS[:, None] - MEANS[None]) ** 2, -1) / (2 * vv)))
    return jnp.sqrt(jnp.maximum(kxx - 2 * kxy + kyy, 0.0))


@functools.cache
def _mmds(process_name, solver):
    return _sweep(process_name, solver, STOCHASTIC_BATCH, _mmd)


def _stochastic_bound(process_name, solver, distances):
    on_vp = _mmds("vp", solver)[default_grid(get_solver(solver), PROCESSES["vp"]())]
    return FACTOR * max(min(distances.values()), on_vp)


@pytest.mark.parametrize("group", list(GROUPS))
def test_stochastic_defaults_are_sane(group):
    _check_defaults(GROUPS[group], STOCHASTIC, _mmds, _stochastic_bound)


@pytest.mark.parametrize("process_name", list(PROCESSES))
def test_adaptive_default_spans_the_process(process_name):
    """The adaptive solver uses only the ends of its grid: the whole range, then the denoising step."""
    process = PROCESSES[process_name]()
    ts, final_zero = resolve_grid(None, Adaptive(), process, STEPS)
    assert final_zero
    np.testing.assert_allclose(np.asarray(ts)[[0, -2, -1]], [process.t_max, process.t_min, 0.0], rtol=1e-6)


def test_sample_wrappers_and_sdedit_use_the_process_default():
    process = difflax.Flow()
    x_T = _x_T(process, 8)
    denoise = GM.denoiser(process)
    assert default_grid(Euler(), process) == "uniform"
    assert default_grid(ReplaceKnown(Euler(), jnp.zeros((8, 2)), jnp.zeros((8, 2), bool)), process) == "uniform"
    _, info = difflax.sample(denoise, process, x_T, "euler", STEPS)
    np.testing.assert_array_equal(info["ts"], make_grid("uniform", process, STEPS))
    _, info = sdedit(denoise, process, x_T, 0.5, jax.random.key(2), solver="euler", steps=4)
    np.testing.assert_array_equal(info["ts"], make_grid("uniform", process.replace(t_max=0.5), 4))


@pytest.mark.parametrize("process_name", list(PROCESSES))
def test_one_step_grids_start_at_t_max(process_name):
    """With one step the sampler denoises x_T where it was drawn (``"edm"`` clips to sigma <= 80)."""
    process = PROCESSES[process_name]()
    for name in set(GRIDS) - {"edm"}:
        np.testing.assert_allclose(make_grid(name, process, 1), [process.t_max, 0.0], err_msg=name)


def test_explicit_grids_are_unchanged():
    """A named grid is the same whatever the solver; only ``grid=None`` adapts to the process."""
    process = difflax.Flow()
    ts, _ = resolve_grid("karras", Euler(), process, STEPS)
    np.testing.assert_array_equal(ts, make_grid("karras", process, STEPS))


def test_unknown_grid_kind_is_named():
    class Odd(difflax.VP):
        grid_kind = "sideways"

    with pytest.raises(ValueError, match=r"grid_kind.*'sideways'"):
        default_grid(Euler(), Odd())
