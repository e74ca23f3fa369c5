"""The sampling API: grids, tracing, vmap, grad, sharding, step-by-step use, errors."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import difflax
from difflax.analytic import GaussianMixture
from difflax.solvers import SOLVERS, Step, get_solver, make_grid

GM = GaussianMixture.isotropic(jnp.array([[-1.5, 0.5], [1.0, -1.0], [0.5, 2.0]]), jnp.array([0.3, 0.4, 0.2]))


@pytest.mark.parametrize("name", ["uniform", "trailing", "logsnr", "karras", "edm"])
@pytest.mark.parametrize("process", [difflax.VP(), difflax.EDM(), difflax.Flow(), difflax.DiscreteVP.cosine()])
def test_grids_are_decreasing_and_end_in_zero(name, process):
    ts = np.asarray(make_grid(name, process, 7))
    assert ts.shape == (8,)
    assert ts[-1] == 0.0 and np.all(np.diff(ts) < 0)
    assert ts[0] <= float(process.t_max) * (1 + 1e-6)
    if name not in ("edm",):
        assert ts[0] == pytest.approx(float(process.t_max))
    if name in ("uniform", "logsnr", "karras"):
        assert ts[-2] == pytest.approx(float(process.t_min), rel=1e-5)
        no_zero = np.asarray(make_grid(name, process, 7, final_zero=False))
        assert no_zero.shape == (8,) and no_zero[-1] == pytest.approx(float(process.t_min), rel=1e-5)


def test_grid_spacings(x64):
    p = difflax.VP()
    lam = p.log_snr(make_grid("logsnr", p, 6, final_zero=False))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-8)
    e = difflax.EDM()
    sig = np.asarray(make_grid("karras", e, 5, final_zero=False, rho=7.0))
    want = (80 ** (1 / 7) + np.linspace(0, 1, 6) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(sig, want, rtol=1e-10)
    np.testing.assert_allclose(make_grid("trailing", p, 4), [1.0, 0.75, 0.5, 0.25, 0.0])


def test_changing_traced_scalars_does_not_recompile(key):
    traces = []
    p = difflax.VP()

    def denoise(x, t):
        traces.append(1)
        return GM.denoiser(p)(x, t)

    @jax.jit
    def run(x, eta, churn, key):
        a, _ = difflax.sample(denoise, p, x, solver="ddim", steps=5, eta=eta, key=key)
        b, _ = difflax.sample(denoise, p, x, solver="edm", steps=5, s_churn=churn, key=key)
        return a + b

    x = p.prior_sample(key, (4, 2))
    run(x, 0.0, 0.0, key)
    count = len(traces)
    for eta, churn in [(0.5, 10.0), (1.0, 40.0), (0.2, 3.0)]:
        run(x, eta, churn, key)
    assert len(traces) == count, "sweeping eta / s_churn retraced the sampler"


def test_step_by_step_loop_matches_sample(key):
    p = difflax.VP()
    denoise = GM.denoiser(p)
    x_T = p.prior_sample(key, (5, 2))
    ts = make_grid("logsnr", p, 6)
    solver = get_solver("heun")
    x, state = x_T, solver.init(p, x_T)
    for i in range(5):
        x, state = solver.step(denoise, p, x, state, Step(ts[i], ts[i + 1], jnp.int32(i), 6, None))
    x0_manual = denoise(x, jnp.full((5,), ts[5]))
    x0, info = difflax.sample(denoise, p, x_T, solver="heun", steps=6, grid="logsnr")
    np.testing.assert_allclose(x0, x0_manual, rtol=1e-5, atol=1e-6)
    assert int(info["nfe"]) == 5 * solver.evals_per_step + 1 == 11


def test_ddim_eta_one_is_ddpm_beta_tilde(key):
    p = difflax.DiscreteVP.linear()
    denoise = GM.denoiser(p)
    x_T = p.prior_sample(key, (6, 2))
    a, _ = difflax.sample(denoise, p, x_T, solver="ddim", steps=8, eta=1.0, key=key)
    b, _ = difflax.sample(denoise, p, x_T, solver="ddpm", steps=8, key=key)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_trajectory_and_nfe(key):
    p = difflax.EDM()
    x_T = p.prior_sample(key, (3, 2))
    x0, info = difflax.sample(GM.denoiser(p), p, x_T, solver="euler", steps=6, return_trajectory=True)
    assert info["trajectory"].shape == (7, 3, 2)
    np.testing.assert_allclose(info["trajectory"][-1], x0)
    np.testing.assert_allclose(info["trajectory"][0], x_T)
    assert int(info["nfe"]) == 6


MULTISTEP = [
    ("dpmpp_2m", {}),
    ("dpmpp_3m", {}),
    ("dpmpp_2m_sde", {}),
    ("unipc", {"order": 3}),
    ("deis", {}),
    ("ipndm", {}),
]


@pytest.mark.parametrize("name,kwargs", MULTISTEP, ids=[name for name, _ in MULTISTEP])
def test_multistep_history_is_updated_in_place(name, kwargs):
    """The compiled loop of a multistep sampler copies neither its history nor ``x`` (nor rebuilds the
    history by a concatenation): each step writes its model output into the history's ring buffer
    before reading the earlier ones, so the scan carry is updated in place."""
    p = difflax.DiscreteVP.linear()
    w = 0.1 * jnp.eye(7)
    denoise = difflax.as_denoiser(lambda x, t: x @ w, p, "eps")
    x = jnp.ones((4, 3, 5, 7))
    key = jax.random.key(0) if get_solver(name).stochastic else None
    run = jax.jit(lambda x: difflax.sample(denoise, p, x, solver=name, steps=12, key=key, **kwargs)[0])
    hlo = run.lower(x).compile().as_text()
    body = re.search(r"f32\[4,3,5,7\][^\n]* while\([^\n]*body=%?([\w.\-]+)", hlo).group(1)
    loop = re.search(rf"\n%?{re.escape(body)} [^\n]*\{{\n(.*?)\n\}}", hlo, re.S).group(1)
    assert "dynamic-update-slice" in loop
    assert not re.findall(r"= f32\[[\d,]*4,3,5,7\]\S* (copy|concatenate)\(", loop)


def test_vmap_over_keys_and_grad_through_sampler(x64, key):
    p = difflax.VP()
    denoise = GM.denoiser(p)
    keys = jax.random.split(key, 3)
    xs = jax.vmap(lambda k: difflax.sample(denoise, p, p.prior_sample(k, (2, 2), jnp.float64), solver="ddim",
                                           steps=5, eta=0.5, key=k)[0])(keys)
    one = difflax.sample(denoise, p, p.prior_sample(keys[1], (2, 2), jnp.float64), solver="ddim", steps=5, eta=0.5,
                         key=keys[1])[0]
    np.testing.assert_allclose(xs[1], one, rtol=1e-10)

    x_T = p.prior_sample(key, (2, 2), jnp.float64)
    target = jnp.array([1.0, -1.0])

    def reward(x_T):
        x0, _ = difflax.sample(denoise, p, x_T, solver="heun", steps=6)
        return -jnp.sum((x0 - target) ** 2)

    g = jax.grad(reward)(x_T)
    assert bool(jnp.all(jnp.isfinite(g)))
    direction = jax.random.normal(jax.random.key(3), x_T.shape, x_T.dtype)
    h = 1e-6
    fd = (reward(x_T + h * direction) - reward(x_T - h * direction)) / (2 * h)
    assert float(jnp.vdot(g, direction)) == pytest.approx(float(fd), rel=1e-5)


def test_sampling_sharded_over_eight_devices(tmp_path):
    """The jitted sampler runs on a batch sharded over a device mesh and matches one device."""
    script = textwrap.dedent(
        """
        import numpy as np, jax, jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import difflax
        from difflax.analytic import GaussianMixture
        assert jax.device_count() == 8
        gm = GaussianMixture.isotropic(jnp.array([[-1.0, 0.0], [1.0, 0.5]]), 0.3)
        p = difflax.VP()
        run = jax.jit(lambda x: difflax.sample(gm.denoiser(p), p, x, solver="heun", steps=8)[0])
        x = p.prior_sample(jax.random.key(0), (16, 2))
        mesh = Mesh(np.array(jax.devices()), ("data",))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        out = run(xs)
        assert len(out.sharding.device_set) == 8, out.sharding
        np.testing.assert_allclose(np.asarray(out), np.asarray(run(x)), rtol=1e-5, atol=1e-6)
        print("ok")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_errors_name_the_argument(key):
    p = difflax.VP()
    d = GM.denoiser(p)
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match=r"Unknown solver 'rk4'.*'ddim'"):
        difflax.sample(d, p, x, solver="rk4")
    with pytest.raises(ValueError, match="Unknown grid 'cosine'"):
        difflax.sample(d, p, x, solver="ddim", grid="cosine")
    with pytest.raises(ValueError, match=r"stochastic.*key"):
        difflax.sample(d, p, x, solver="ddpm")
    with pytest.raises(ValueError, match=r"stochastic.*key"):
        difflax.sample(d, p, x, solver="ddim", eta=0.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        difflax.sample(d, p, x, solver="ddim", grid=jnp.array([0.5, 0.9, 0.0]))
    with pytest.raises(ValueError, match="steps must be a positive int"):
        difflax.sample(d, p, x, solver="ddim", steps=0)
    with pytest.raises(TypeError, match="solver 'ddim'"):
        difflax.sample(d, p, x, solver="ddim", churn=1.0)
    with pytest.raises(ValueError, match="denoise must return"):
        difflax.sample(lambda x, t: x[:, :1], p, x, solver="ddim")
    assert {"ddpm", "ddim", "euler", "heun", "edm"} <= set(SOLVERS)


@pytest.mark.parametrize("name", sorted(set(SOLVERS) - {"adaptive"}))
def test_step_keeps_the_dtype_of_x(x64, name):
    p = difflax.VP()
    solver = get_solver(name)
    for x_dtype, t_dtype in [(jnp.float32, jnp.float64), (jnp.float64, jnp.float32)]:
        x = jnp.linspace(-1.0, 1.0, 6, dtype=x_dtype).reshape(3, 2)
        ts = jnp.asarray([0.8, 0.5], t_dtype)
        step = Step(ts[0], ts[1], jnp.int32(1), 4, jax.random.key(0))
        out, _ = solver.step(lambda x, t: 0.5 * x, p, x, solver.init(p, x), step)
        assert out.dtype == x_dtype, f"{name}: x {x.dtype.name}, t {ts.dtype.name} gave {out.dtype.name}"
