"""The compiled sampler holds one copy of the network per place the loop evaluates it.

A copy of the network costs compile time (for a large model, about as much as the network
itself), so the optimized HLO of a jitted :func:`difflax.sample` is checked for the
network's dots: a tiny MLP eps network whose parameters are arguments, as a user's are.
The final denoising step is the scan's last iteration (``Step.final``), the step's own first
evaluation; it is checked against the loop written out by hand, the final step after it. A
staged solver's stages (one evaluation each, one loop iteration each) are checked the same way.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax.analytic import GaussianMixture
from difflax.solvers import SOLVERS
from difflax.solvers.base import Step, call
from difflax.solvers.ode import EDMStochastic
from difflax.solvers.registry import resolve_grid

WIDTHS = (6, 32, 32, 6)  # three dots per evaluation
PROCESS = difflax.DiscreteVP.linear()


def _mlp(params, x, t):
    h = jnp.concatenate([x, t[:, None]], axis=-1)
    for w in params[:-1]:
        h = jnp.tanh(h @ w)
    return h @ params[-1]


def _params():
    keys = jax.random.split(jax.random.key(0), len(WIDTHS) - 1)
    sizes = [WIDTHS[0] + 1, *WIDTHS[1:]]
    return [jax.random.normal(k, (i, o)) / i**0.5 for k, i, o in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def _dots(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text().count(" dot(")


def _copies(solver, final_zero):
    """Copies of the network in the compiled sampler: its dots over the network's own."""
    params, x = _params(), jnp.ones((4, WIDTHS[0]))

    def sample(params, x):
        denoise = difflax.as_denoiser(lambda x, t: _mlp(params, x, t), PROCESS, "eps")
        return difflax.sample(denoise, PROCESS, x, solver, 5, final_zero=final_zero)[0]

    network = _dots(_mlp, params, x, jnp.full((4,), 0.5))
    assert network == len(WIDTHS) - 1
    return _dots(sample, params, x) / network


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_scan_body_holds_the_network_once(solver):
    assert _copies(solver, final_zero=False) == 1


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "unipc", "euler", "heun"])
def test_final_step_shares_the_network_of_the_scan(solver):
    # A staged solver (Heun) evaluates once per iteration: one copy for its two evaluations a step.
    want = 1 if SOLVERS[solver].staged else SOLVERS[solver].evals_per_step
    assert _copies(solver, final_zero=True) == want


ARGS = {"ddim": {"eta": 0.5}, "edm": {"s_churn": 10.0}, "pc": {"corrector_steps": 1}}


def _by_hand(solver, denoise, process, x, ts, key):
    """The loop written out: every step in turn, then the final denoising step ``D(x, t)`` (after
    EDM's churn, the last step of Karras et al.'s algorithm 2)."""
    n = ts.shape[0] - 1
    state = solver.init(process, x)
    for i in range(n - 1):
        x, state = solver.step(
            denoise, process, x, state, Step(ts[i], ts[i + 1], jnp.int32(i), n, jax.random.fold_in(key, i))
        )
    t = ts[n - 1]
    if isinstance(solver, EDMStochastic):
        x, t = solver._churn(process, x, Step(t, ts[n], jnp.int32(n - 1), n, jax.random.fold_in(key, n - 1)))
    return call(denoise, x, t)


@pytest.mark.parametrize("name", sorted(set(SOLVERS) - {"adaptive"}))
def test_final_step_in_the_scan_is_the_final_step_after_it(x64, name):
    process = difflax.VP()
    denoise = GaussianMixture.isotropic(np.array([[1.0, -0.5], [-1.0, 0.5]]), np.array([0.3, 0.5])).denoiser(process)
    solver = SOLVERS[name](**ARGS.get(name, {}))
    key = jax.random.key(1)
    x_T = process.prior_sample(jax.random.key(2), (3, 2), jnp.float64)
    ts, final_zero = resolve_grid(None, solver, process, 3)
    assert final_zero

    @jax.jit
    def both(x_T):
        return difflax.sample(denoise, process, x_T, solver, 3, key=key, return_trajectory=True), _by_hand(
            solver, denoise, process, x_T, ts, key
        )

    (x, info), want = both(x_T)
    np.testing.assert_allclose(x, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(info["trajectory"][-1], x)
    assert info["trajectory"].shape == (4, 3, 2)
    assert int(info["nfe"]) == 2 * solver.evals_per_step + 1


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun"])
def test_shared_time_costs_no_branch_in_the_compiled_loop(solver):
    """The sampler hands the denoiser one time for the whole batch; ``once_per_batch``'s test of that
    folds away in XLA (compared as bits), so the loop keeps neither a branch nor per-example lookups."""
    params, x = _params(), jnp.ones((4, WIDTHS[0]))

    def sample(params, x):
        denoise = difflax.as_denoiser(lambda x, t: _mlp(params, x, t), PROCESS, "eps")
        return difflax.sample(denoise, PROCESS, x, solver, 5)[0]

    hlo = jax.jit(sample).lower(params, x).compile().as_text()
    assert hlo.count("conditional(") == 0
    assert hlo.count(" gather(") == 0
