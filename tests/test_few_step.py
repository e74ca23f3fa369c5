"""MeanFlow, shortcut models and sCM (difflax.distill) against closed forms on Gaussian data.

For data ``N(m, s^2 I)``:

* linear interpolant ``x_t = (1 - t) x0 + t z``: ``x_t = (1 - t) m + sigma_t xi`` along an ODE path
  (``xi`` constant), ``sigma_t^2 = (1 - t)^2 s^2 + t^2``, so the flow map is
  ``x_r = (1 - r) m + (sigma_r / sigma_t) (x_t - (1 - t) m)`` and the average velocity
  ``u = (x_t - x_r) / (t - r) = k (x_t - (1 - t) m) - m`` with
  ``k = (1 - sigma_r / sigma_t) / (t - r) = ((t + r) - s^2 (2 - t - r)) / (sigma_t (sigma_t + sigma_r))``,
  finite at ``r = t`` where ``u`` is the velocity;
* TrigFlow ``x_t = cos(t) x0 + sin(t) z``, ``z ~ N(0, sigma_d^2 I)``: ``sigma_t^2 = cos^2 s^2 + sin^2 sigma_d^2``,
  the consistency function ``f(x_t, t) = m + s (x_t - cos(t) m) / sigma_t`` and the ODE
  ``dx/dt = -sin(t) m + (sigma_t' / sigma_t) (x_t - cos(t) m)``, ``sigma_t' = sin cos (sigma_d^2 - s^2) / sigma_t``.
"""

import jax
import jax.numpy as jnp
import pytest

from difflax import distill
from difflax.processes import broadcast_to

M, S, SD = jnp.array([0.7, -1.2]), 0.6, 1.0  # data mean and std, TrigFlow sigma_d
THETA = (M, jnp.log(S))
PERTURBED = (M + jnp.array([0.2, 0.0]), jnp.log(S) + 0.15)


def _flow_std(t, s):
    return jnp.sqrt((1.0 - t) ** 2 * s**2 + t**2)


def gaussian_average_velocity(theta):
    m, log_s = theta
    s = jnp.exp(log_s)

    def u(x, r, t):
        st, sr = _flow_std(t, s), _flow_std(r, s)
        k = ((t + r) - s**2 * (2.0 - t - r)) / (st * (st + sr))
        return broadcast_to(k, x) * (x - broadcast_to(1.0 - t, x) * m) - m

    return u


def gaussian_velocity(theta):
    u = gaussian_average_velocity(theta)
    return lambda x, t: u(x, t, t)


def _trig_std(t, s):
    return jnp.sqrt(jnp.cos(t) ** 2 * s**2 + jnp.sin(t) ** 2 * SD**2)


def gaussian_trigflow(theta):
    """``(F, dx/dt)``: the exact TrigFlow network ``F = (cos x - f) / (sin sigma_d)`` and ODE."""
    m, log_s = theta
    s = jnp.exp(log_s)

    def F(x_scaled, t):
        x = SD * x_scaled
        c, sn = broadcast_to(jnp.cos(t), x), broadcast_to(jnp.sin(t), x)
        f = m + s * (x - c * m) / broadcast_to(_trig_std(t, s), x)
        return (c * x - f) / (sn * SD)

    def velocity(x, t):
        st = _trig_std(t, s)
        rate = jnp.sin(t) * jnp.cos(t) * (SD**2 - s**2) / st**2
        return -broadcast_to(jnp.sin(t), x) * m + broadcast_to(rate, x) * (x - broadcast_to(jnp.cos(t), x) * m)

    return F, velocity


def _mlp(key, inputs, out=2, width=16):
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (inputs, width)) / jnp.sqrt(inputs)
    w2 = jax.random.normal(k2, (width, out)) / jnp.sqrt(width)
    return lambda h: jnp.tanh(h @ w1) @ w2


@pytest.fixture(scope="module")
def x0():
    return M + S * jax.random.normal(jax.random.key(0), (16384, 2))


# ------------------------------------------------------------------ JVP targets = finite differences along the ODE
def test_meanflow_target_is_finite_difference_along_the_ode():
    with jax.enable_x64(True):
        net = _mlp(jax.random.key(1), 4)
        u = lambda x, r, t: net(jnp.concatenate([x, r[:, None], t[:, None]], axis=1))
        k = jax.random.split(jax.random.key(2), 3)
        x, v = jax.random.normal(k[0], (5, 2), jnp.float64), jax.random.normal(k[1], (5, 2), jnp.float64)
        t = jax.random.uniform(k[2], (5,), jnp.float64, 0.3, 1.0)
        r = 0.5 * t
        value, target = distill.meanflow_target(u, x, r, t, v)
        h = 1e-5
        dudt = (u(x + h * v, r, t + h) - u(x - h * v, r, t - h)) / (2 * h)
        assert jnp.allclose(value, u(x, r, t))
        assert jnp.allclose(target, v - (t - r)[:, None] * dudt, atol=1e-8)


def test_scm_tangent_is_finite_difference_along_the_ode():
    with jax.enable_x64(True):
        net = _mlp(jax.random.key(3), 3)
        F = lambda xs, t: net(jnp.concatenate([xs, t[:, None]], axis=1))
        k = jax.random.split(jax.random.key(4), 3)
        x, v = jax.random.normal(k[0], (5, 2), jnp.float64), jax.random.normal(k[1], (5, 2), jnp.float64)
        t = jax.random.uniform(k[2], (5,), jnp.float64, 0.2, 1.4)
        f = lambda x, t: jnp.cos(t)[:, None] * x - jnp.sin(t)[:, None] * SD * F(x / SD, t)
        h = 1e-5
        dfdt = (f(x + h * v, t + h) - f(x - h * v, t - h)) / (2 * h)
        value, g = distill.scm_tangent(F, x, t, v, SD)
        assert jnp.allclose(value, F(x / SD, t))
        assert jnp.allclose(g, jnp.cos(t)[:, None] * dfdt, atol=1e-8)  # g = cos(t) df/dt at warm-up 1
        _, g_cold = distill.scm_tangent(F, x, t, v, SD, warmup=0.0)  # warm-up 0 keeps only the cos^2 term
        assert jnp.allclose(g_cold, -(jnp.cos(t)[:, None] ** 2) * (SD * F(x / SD, t) - v), atol=1e-12)


# ------------------------------------------------------------------ exact solutions are fixed points
def _loss_and_grad(loss_of_theta):
    """Loss and gradient norm at the exact and at the perturbed solution (one compilation)."""
    thetas = jax.tree.map(lambda a, b: jnp.stack([a, b]), THETA, PERTURBED)
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss_of_theta)))(thetas)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(2, -1) ** 2, axis=1) for g in jax.tree.leaves(grads)))
    return [(float(values[i]), float(norms[i])) for i in range(2)]


def _meanflow(x0, teacher, **kw):
    return lambda th: jnp.mean(
        distill.meanflow_loss(
            gaussian_average_velocity(th), x0, jax.random.key(5), teacher_velocity=teacher, t_min=0.02, **kw
        )
    )


def _shortcut(x0, teacher):
    return lambda th: jnp.mean(
        distill.shortcut_loss(
            gaussian_average_velocity(th), x0, jax.random.key(6), teacher_velocity=teacher, t_min=0.02, t_max=1.0
        )
    )


def _scm(x0, teacher, **kw):
    return lambda th: jnp.mean(
        distill.scm_loss(
            gaussian_trigflow(th)[0],
            x0,
            jax.random.key(7),
            sigma_data=SD,
            teacher_velocity=teacher,
            t_min=0.05,
            t_max=1.5,
            **kw,
        )
    )


@pytest.mark.parametrize("method", ["meanflow", "shortcut", "scm"])
def test_exact_solution_is_a_fixed_point_of_distillation(x0, method):
    if method == "scm":
        loss = _scm(x0[:256], gaussian_trigflow(THETA)[1], tangent_c=0.0)
    else:
        loss = {"meanflow": _meanflow, "shortcut": _shortcut}[method](x0[:256], gaussian_velocity(THETA))
    (value, grad), (value_p, grad_p) = _loss_and_grad(loss)
    assert value < 1e-9 and grad < 1e-4, (value, grad)
    assert value_p > 1e-3 and grad_p > 1e-2, (value_p, grad_p)


@pytest.mark.parametrize("method", ["meanflow", "shortcut", "scm"])
def test_exact_solution_is_a_stationary_point_of_training_from_scratch(x0, method):
    """With the conditional velocity the loss is not 0, but its expected gradient vanishes at the exact solution
    (the target is linear in the velocity, whose conditional mean is the ODE's): a Monte Carlo estimate is
    small there and large at a perturbed solution."""
    if method == "scm":
        loss = _scm(x0, None, tangent_c=0.0)
    elif method == "meanflow":
        loss = _meanflow(x0, None, power=0.0)
    else:
        loss = _shortcut(x0, None)
    (_, grad), (_, grad_p) = _loss_and_grad(loss)
    assert grad < 0.2 * grad_p, (grad, grad_p)


def test_one_step_sampling_with_the_exact_average_velocity_is_the_flow_map():
    z = jax.random.normal(jax.random.key(8), (6, 2))
    u = gaussian_average_velocity(THETA)
    for ts in ([1.0, 0.0], [1.0, 0.5, 0.0], [1.0, 0.75, 0.5, 0.25, 0.0]):
        x, info = distill.average_velocity_sample(u, z, jnp.array(ts))
        assert info["nfe"] == len(ts) - 1
        assert jnp.allclose(x, M + S * z, atol=1e-5)  # the flow map of N(m, s^2) from N(0, 1)


def test_trigflow_reading_of_an_edm_network_is_its_denoiser():
    """``cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)`` with ``F = edm_as_trigflow(F_edm)`` is EDM's denoiser."""
    import difflax

    net = _mlp(jax.random.key(9), 3)
    apply = lambda x, c: net(jnp.concatenate([x, jnp.broadcast_to(c, x.shape[:1])[:, None]], axis=1))
    edm = difflax.EDM(sigma_data=SD)
    denoise = difflax.as_denoiser(apply, edm, "edm")
    F = distill.edm_as_trigflow(apply, SD)
    x, t = jax.random.normal(jax.random.key(10), (5, 2)), jnp.linspace(0.1, 1.5, 5)
    f = jnp.cos(t)[:, None] * x - jnp.sin(t)[:, None] * SD * F(x / SD, t)
    assert jnp.allclose(f, distill.trigflow_denoiser(denoise, edm, SD)(x, t), atol=1e-5)
    assert jnp.allclose(f, denoise(x / jnp.cos(t)[:, None], SD * jnp.tan(t)), atol=1e-5)


def test_trigflow_velocity_of_the_exact_denoiser_is_the_ode():
    _, velocity = gaussian_trigflow(THETA)
    m, s = M, S

    def denoise(x, t):  # E[x0 | x_t] for TrigFlow
        var = _trig_std(t, s) ** 2
        gain = broadcast_to(jnp.cos(t) * s**2 / var, x)
        return m + gain * (x - broadcast_to(jnp.cos(t), x) * m)

    x, t = jax.random.normal(jax.random.key(11), (5, 2)), jnp.linspace(0.1, 1.5, 5)
    assert jnp.allclose(distill.trigflow_velocity(denoise)(x, t), velocity(x, t), atol=1e-5)


def test_bad_arguments_are_named():
    x = jnp.zeros((4, 2))
    u = gaussian_average_velocity(THETA)
    with pytest.raises(ValueError, match="ratio"):
        distill.meanflow_loss(u, x, jax.random.key(0), ratio=1.5)
    with pytest.raises(ValueError, match="consistency_fraction"):
        distill.shortcut_loss(u, x, jax.random.key(0), consistency_fraction=-0.1)
    with pytest.raises(ValueError, match="num_levels"):
        distill.shortcut_loss(u, x, jax.random.key(0), num_levels=0)
