"""The compiled sampler holds one copy of the network per place the loop evaluates it.

A copy of the network costs compile time (for a large model, about as much as the network
itself), so the optimized HLO of a jitted :func:`difflax.sample` is checked for the
network's dots: a tiny MLP eps network whose parameters are arguments, as a user's are.
"""

import jax
import jax.numpy as jnp
import pytest

import difflax

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


@pytest.mark.xfail(strict=True, reason="the final denoising step D(x, t_min) is evaluated after the scan, "
                   "a second copy of the network (issue 21)")
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_final_step_shares_the_network_of_the_scan(solver):
    assert _copies(solver, final_zero=True) == 1
