"""Forward noising processes ``x_t = alpha(t) x_0 + sigma(t) eps``.

Every process is an immutable pytree (``difflax.pytree.dataclass``) with the same
interface, so samplers, losses and likelihoods never special-case a family:

* ``alpha(t)``, ``sigma(t)``: the marginal coefficients of
  ``q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)``.
* ``log_snr(t) = log(alpha^2 / sigma^2)`` (strictly decreasing in ``t``) and its
  inverse ``t_from_log_snr``, written with ``log1p`` / ``expm1`` / ``asinh`` so the
  round trip is accurate at both ends of the range.
* ``sde(x, t) -> (drift, diffusion)`` of the forward Ito SDE
  ``dx = f(t) x dt + g(t) dw`` whose marginals are the ones above (Song et al.
  2021, "Score-based generative modeling through SDEs"). For any such linear SDE
  ``f = d log(alpha)/dt`` and ``g^2 = d(sigma^2)/dt - 2 f sigma^2``; each process
  writes these in closed form.
* ``marginal(x0, t, eps)``, ``prior_sample(key, shape)``, ``t_min``, ``t_max``.

``t`` may be a scalar or a ``(batch,)`` vector; coefficients come back with the
shape of ``t`` and :func:`broadcast_to` lines them up with a batch of data.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from difflax import pytree
from difflax.checks import check_in_range, concrete_float
from difflax.interpolation import interp_sorted, interp_uniform

Array = jax.Array

__all__ = [
    "EDM",
    "PROCESSES",
    "VE",
    "VP",
    "DiscreteVP",
    "Flow",
    "Process",
    "SubVP",
    "broadcast_to",
    "check_t",
    "get_process",
    "once_per_batch",
]


def broadcast_to(coef: Array, x: Array) -> Array:
    """Append singleton axes to a per-example coefficient so it broadcasts over ``x``.

    ``coef`` has shape ``()`` or ``(batch,)``; the result has ``x.ndim`` axes.
    """
    coef = jnp.asarray(coef)
    if coef.ndim > x.ndim:
        raise ValueError(
            f"t has shape {coef.shape}, more axes than x with shape {x.shape}; "
            "t must be a scalar or have shape (batch,)."
        )
    if coef.ndim and coef.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"t has shape {coef.shape} but x has batch size {x.shape[0]}; "
            "t must be a scalar or have shape (batch,) matching x."
        )
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def once_per_batch(fn, t):
    """``fn(t)`` for a time ``t`` of shape ``()`` or ``(batch,)``: computed once, on ``t[0]``, and broadcast
    when every entry is the same time, else per example.

    A sampler hands the denoiser one time for the whole batch, broadcast to ``(batch,)``; the
    coefficients of that time (for :class:`DiscreteVP` a table search) need no work per example.
    Which branch runs is decided at run time (``lax.cond`` on ``all(t == t[0])``), so a batch of
    different times (a training loss) stays exact; under ``vmap`` both branches run. ``fn`` returns
    a pytree of arrays broadcastable to ``t``'s shape; the result has that shape.
    """
    t = jnp.asarray(t)

    def full(out):
        return jax.tree.map(lambda c: jnp.broadcast_to(c, t.shape), out)

    if t.ndim == 0 or t.shape[0] == 1:
        return full(fn(t))
    # Compared as bits, so that XLA folds the test to true when t is a broadcast scalar (a sampler's
    # time vector) and keeps only the first branch; a float compare cannot fold (NaN != NaN).
    bits = jax.lax.bitcast_convert_type(t, jnp.dtype(f"int{8 * t.dtype.itemsize}"))
    return jax.lax.cond(jnp.all(bits == bits[0]), lambda: full(fn(t[0])), lambda: full(fn(t)))


def check_t(t, lo: float, hi: float, name: str = "t", what: str = "process") -> None:
    """Raise a ``ValueError`` if a concrete ``t`` lies outside ``[lo, hi]``.

    Traced values of ``t`` or of the bounds are not checked (the check happens at
    trace time and costs nothing inside ``jit``). A relative tolerance of ``1e-9``
    lets rounding at the ends pass.
    """
    lo_f, hi_f = concrete_float(lo), concrete_float(hi)
    if lo_f is None or hi_f is None:
        return
    tol = 1e-9 * max(1.0, abs(lo_f), abs(hi_f))
    check_in_range(t, lo_f, hi_f, name, context=f" for the {what}", tol=tol)


class Process:
    """Shared behaviour of every forward process (mixin for the dataclasses below).

    A subclass provides ``alpha``, ``sigma``, ``log_snr``, ``t_from_log_snr`` and
    ``sde_coefficients(t) -> (f, g)`` in closed form, and the fields ``t_min`` and ``t_max``.
    """

    t_min: float
    t_max: float
    # Which grids spread a sampler's steps well over this process's time, so that ``difflax.sample``
    # can adapt a solver's default grid (``difflax.solvers.registry.DEFAULT_GRIDS``): "diffusion"
    # (a diffusion clock: VP, DDPM tables), "noise_level" (t is sigma or log sigma: VE, EDM) or
    # "uniform_time" (log-SNR unbounded or far wider than the data need; uniform steps in t suit it).
    grid_kind: str = "diffusion"

    def alpha_sigma(self, t):
        """``(alpha(t), sigma(t))`` in one call."""
        return self.alpha(t), self.sigma(t)

    def alpha_sigma_derivatives(self, t):
        """``(d alpha/dt, d sigma/dt)``, by forward-mode differentiation of the closed forms."""
        t = jnp.asarray(t, dtype=jnp.result_type(t, float))
        ones = jnp.ones_like(t)
        _, d_alpha = jax.jvp(self.alpha, (t,), (ones,))
        _, d_sigma = jax.jvp(self.sigma, (t,), (ones,))
        return d_alpha, d_sigma

    def sde(self, x: Array, t) -> tuple[Array, Array]:
        """Drift ``f(t) x`` and diffusion ``g(t)`` (broadcast against ``x``) of the forward SDE."""
        f, g = self.sde_coefficients(t)
        return broadcast_to(f, x) * x, broadcast_to(g, x)

    def marginal(self, x0: Array, t, eps: Array) -> Array:
        """Sample of ``q(x_t | x_0)``: ``alpha(t) x0 + sigma(t) eps``."""
        x0 = jnp.asarray(x0)
        eps = jnp.asarray(eps)
        if x0.shape != eps.shape:
            raise ValueError(f"eps must have the shape of x0 {x0.shape}; got {eps.shape}.")
        alpha, sigma = self.alpha_sigma(t)
        return broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, x0) * eps

    def prior_sample(self, key: Array, shape, dtype=jnp.float32) -> Array:
        """A draw of the prior at ``t_max``: ``sigma(t_max) * N(0, I)``.

        For VP, sub-VP and the flow interpolant ``alpha(t_max)`` is (close to) zero, for
        VE and EDM it is one but ``sigma(t_max)`` dwarfs the data scale.
        """
        return self.sigma(jnp.asarray(self.t_max, dtype)) * jax.random.normal(key, shape, dtype)

    def prior_std(self):
        """Standard deviation of :meth:`prior_sample`."""
        return self.sigma(jnp.asarray(self.t_max))


def _vp_quadratic_time(big_b, beta_min, beta_max):
    """Solve ``beta_min t + (beta_max - beta_min) t^2 / 2 = B`` for ``t >= 0`` (cancellation-free root)."""
    d = beta_max - beta_min
    return 2.0 * big_b / (beta_min + jnp.sqrt(beta_min**2 + 2.0 * d * big_b))


@pytree.dataclass
class VP(Process):
    """Continuous variance-preserving process with linear ``beta(t)`` (Song et al. 2021).

    ``beta(t) = beta_min + t (beta_max - beta_min)``, ``B(t) = int_0^t beta``,
    ``alpha = exp(-B/2)``, ``sigma = sqrt(1 - exp(-B))``, forward SDE
    ``dx = -beta(t)/2 x dt + sqrt(beta(t)) dw``. Defaults are score_sde's
    (``beta_min=0.1``, ``beta_max=20``, sampling ``t_min = 1e-3``).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha(self, t):
        return jnp.exp(-0.5 * self.integrated_beta(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(-self.integrated_beta(t)))

    def log_snr(self, t):
        # log(e^{-B} / (1 - e^{-B})) = -log(expm1(B))
        return -jnp.log(jnp.expm1(self.integrated_beta(t)))

    def t_from_log_snr(self, log_snr):
        big_b = jax.nn.softplus(-log_snr)  # log1p(exp(-l)), stable both ways
        return _vp_quadratic_time(big_b, self.beta_min, self.beta_max)

    def sde_coefficients(self, t):
        beta = self.beta(t)
        return -0.5 * beta, jnp.sqrt(beta)


@pytree.dataclass
class SubVP(Process):
    """Sub-VP process (Song et al. 2021, eq. 29): VP's mean, ``sigma = 1 - exp(-B)``.

    Forward SDE ``dx = -beta/2 x dt + sqrt(beta (1 - exp(-2B))) dw``. As ``t -> 0``,
    ``sigma ~ B ~ beta_min t``, so ``log_snr ~ -2 log(beta_min t)`` reaches far beyond VP's
    range at the clean end, where log-SNR grids would crowd the steps; uniform steps in ``t`` suit it.
    """

    grid_kind = "uniform_time"

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def integrated_beta(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def alpha(self, t):
        return jnp.exp(-0.5 * self.integrated_beta(t))

    def sigma(self, t):
        return -jnp.expm1(-self.integrated_beta(t))

    def log_snr(self, t):
        big_b = self.integrated_beta(t)
        return -big_b - 2.0 * jnp.log(-jnp.expm1(-big_b))

    def t_from_log_snr(self, log_snr):
        # alpha / (1 - alpha^2) = e^{l/2} with alpha = e^{-B/2}  =>  B = 2 asinh(e^{-l/2} / 2).
        big_b = 2.0 * jnp.arcsinh(0.5 * jnp.exp(-0.5 * log_snr))
        return _vp_quadratic_time(big_b, self.beta_min, self.beta_max)

    def sde_coefficients(self, t):
        beta = self.beta_min + t * (self.beta_max - self.beta_min)
        return -0.5 * beta, jnp.sqrt(-beta * jnp.expm1(-2.0 * self.integrated_beta(t)))


@pytree.dataclass
class VE(Process):
    """Variance-exploding process of NCSN / score_sde: geometric ``sigma(t)``, ``alpha = 1``.

    ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, forward SDE
    ``dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw``. As in score_sde the
    marginal standard deviation is taken to be ``sigma(t)`` (the SDE started at
    ``t_min`` with that spread reproduces it exactly). Defaults: CIFAR-10 of score_sde.
    """

    grid_kind = "noise_level"

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0

    def _log_ratio(self):
        return jnp.log(self.sigma_max) - jnp.log(self.sigma_min)

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t, dtype=jnp.result_type(t, float)))

    def sigma(self, t):
        return self.sigma_min * jnp.exp(t * self._log_ratio())

    def log_snr(self, t):
        return -2.0 * (jnp.log(self.sigma_min) + t * self._log_ratio())

    def t_from_log_snr(self, log_snr):
        return (-0.5 * log_snr - jnp.log(self.sigma_min)) / self._log_ratio()

    def sde_coefficients(self, t):
        sigma = self.sigma(t)
        return jnp.zeros_like(sigma), sigma * jnp.sqrt(2.0 * self._log_ratio())


@pytree.dataclass
class EDM(Process):
    """The process of Karras et al. 2022 ("Elucidating the design space"): ``sigma(t) = t``, ``alpha = 1``.

    Forward SDE ``dx = sqrt(2 t) dw``. ``sigma_data`` is the data standard deviation
    used by the EDM preconditioning and loss weighting; ``rho`` the exponent of its
    time discretization.
    """

    grid_kind = "noise_level"

    sigma_data: float = 0.5
    t_min: float = 0.002
    t_max: float = 80.0
    rho: float = 7.0

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t, dtype=jnp.result_type(t, float)))

    def sigma(self, t):
        return jnp.asarray(t, dtype=jnp.result_type(t, float))

    def log_snr(self, t):
        return -2.0 * jnp.log(t)

    def t_from_log_snr(self, log_snr):
        return jnp.exp(-0.5 * log_snr)

    def sde_coefficients(self, t):
        t = jnp.asarray(t, dtype=jnp.result_type(t, float))
        return jnp.zeros_like(t), jnp.sqrt(2.0 * t)


@pytree.dataclass
class Flow(Process):
    """Linear interpolant of flow matching / rectified flow: ``x_t = (1 - t) x0 + t eps``.

    (Lipman et al. 2023; Liu et al. 2023.) The matching SDE has ``f = -1/(1 - t)`` and
    ``g^2 = 2 t / (1 - t)``; its probability-flow ODE is the flow ``dx/dt = E[eps - x0 | x_t]``.
    ``log_snr`` is infinite at ``t = 0`` and ``t = 1``; the default ``t_min`` keeps
    log-SNR grids finite, and samplers finish with a denoising step to ``t = 0``
    (for this process identical to an Euler step of the flow).
    """

    grid_kind = "uniform_time"

    t_min: float = 1e-3
    t_max: float = 1.0

    def alpha(self, t):
        return 1.0 - jnp.asarray(t, dtype=jnp.result_type(t, float))

    def sigma(self, t):
        return jnp.asarray(t, dtype=jnp.result_type(t, float))

    def log_snr(self, t):
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def t_from_log_snr(self, log_snr):
        return jax.nn.sigmoid(-0.5 * log_snr)

    def sde_coefficients(self, t):
        t = jnp.asarray(t, dtype=jnp.result_type(t, float))
        return -1.0 / (1.0 - t), jnp.sqrt(2.0 * t / (1.0 - t))

    def marginal(self, x0: Array, t, eps: Array) -> Array:
        check_t(t, 0.0, 1.0, what="Flow process")
        return super().marginal(x0, t, eps)


@pytree.dataclass
class DiscreteVP(Process):
    """Discrete-time VP process from a beta table (DDPM, Ho et al. 2020), in continuous time.

    With ``N`` steps and ``alpha_bar_n = prod_{i <= n} (1 - beta_i)`` the integer DDPM
    step ``n = 0 .. N-1`` sits at ``t = (n + 1) / N`` and ``t = 0`` is clean data
    (``alpha_bar = 1``). Between these knots ``log alpha_bar`` is interpolated
    linearly, so continuous-time solvers can query any ``t`` in ``[0, 1]``
    (the convention of DPM-Solver's discrete noise schedule). ``timestep(t)`` maps back
    to the integer-step index ``n`` a DDPM network expects. The continuous SDE has the
    piecewise-constant ``beta(t) = -d log alpha_bar / dt``.

    Build one with :meth:`linear`, :meth:`cosine` or :meth:`scaled_linear`. ``grid_kind``
    (static) is ``"uniform_time"`` for the cosine table, whose ``alpha_bar`` falls to almost 0
    (Nichol & Dhariwal 2021 space its noise levels evenly in ``t``), else ``"diffusion"``.
    """

    log_alpha_bar: Array  # (N + 1,) knots at t = n / N, first entry 0.
    t_min: float = 1e-3
    t_max: float = 1.0
    grid_kind: str = pytree.field(static=True, default="diffusion")

    @classmethod
    def from_betas(cls, betas, t_min: float | None = None, grid_kind: str = "diffusion") -> DiscreteVP:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2:
            raise ValueError(f"betas must be a 1-D table with at least 2 entries; got shape {betas.shape}.")
        if np.any(betas <= 0) or np.any(betas >= 1):
            raise ValueError("betas must lie strictly between 0 and 1.")
        log_abar = np.concatenate([[0.0], np.cumsum(np.log1p(-betas))])
        n = betas.size
        return cls(
            log_alpha_bar=jnp.asarray(log_abar, dtype=jnp.float32 if not jax.config.jax_enable_x64 else jnp.float64),
            t_min=1.0 / n if t_min is None else t_min,
            t_max=1.0,
            grid_kind=grid_kind,
        )

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteVP:
        """DDPM's linear schedule (Ho et al. 2020): betas from 1e-4 to 0.02 over 1000 steps."""
        return cls.from_betas(np.linspace(beta_start, beta_end, num_steps, dtype=np.float64))

    @classmethod
    def scaled_linear(cls, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> DiscreteVP:
        """Linear in ``sqrt(beta)`` (latent diffusion / Stable Diffusion)."""
        return cls.from_betas(np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2)

    @classmethod
    def cosine(cls, num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteVP:
        """Cosine schedule of Nichol & Dhariwal 2021: ``alpha_bar(t) = cos^2((t + s)/(1 + s) pi/2)``.

        Betas are clipped at ``max_beta`` as in the paper.
        """

        def abar(u):
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta) for i in range(num_steps)]
        return cls.from_betas(betas, grid_kind="uniform_time")

    @property
    def num_steps(self) -> int:
        return self.log_alpha_bar.shape[0] - 1

    @property
    def alphas_cumprod(self) -> Array:
        """``alpha_bar_n`` for the integer steps ``n = 0 .. N-1`` (as DDPM code tabulates it)."""
        return jnp.exp(self.log_alpha_bar[1:])

    @property
    def betas(self) -> Array:
        return -jnp.expm1(jnp.diff(self.log_alpha_bar))

    def _knots(self):
        # A constant of the program (numpy), not a linspace computed wherever a time is looked up.
        return np.linspace(0.0, 1.0, self.num_steps + 1).astype(self.log_alpha_bar.dtype)

    def log_alpha_bar_at(self, t):
        t = jnp.asarray(t, dtype=jnp.result_type(t, float))
        return interp_uniform(t, jnp.asarray(self._knots(), t.dtype), self.log_alpha_bar.astype(t.dtype))

    def alpha(self, t):
        check_t(t, 0.0, 1.0, what="DiscreteVP process (t = (n + 1) / N)")
        return jnp.exp(0.5 * self.log_alpha_bar_at(t))

    def sigma(self, t):
        check_t(t, 0.0, 1.0, what="DiscreteVP process (t = (n + 1) / N)")
        return jnp.sqrt(-jnp.expm1(self.log_alpha_bar_at(t)))

    def log_snr(self, t):
        la = self.log_alpha_bar_at(t)
        return la - jnp.log(-jnp.expm1(la))

    def t_from_log_snr(self, log_snr):
        log_snr = jnp.asarray(log_snr, dtype=jnp.result_type(log_snr, float))
        la = -jax.nn.softplus(-log_snr)  # log alpha_bar = log sigmoid(l)
        # log_alpha_bar decreases in t: interpolate on the reversed table.
        return interp_sorted(la, self.log_alpha_bar[::-1].astype(la.dtype), jnp.asarray(self._knots()[::-1], la.dtype))

    def timestep(self, t):
        """Continuous ``t`` to the (fractional) DDPM step index ``n = N t - 1``."""
        return self.num_steps * jnp.asarray(t) - 1.0

    def time_from_timestep(self, n):
        """DDPM step index ``n`` to continuous time ``t = (n + 1) / N``."""
        return (jnp.asarray(n, dtype=jnp.result_type(n, float)) + 1.0) / self.num_steps

    def sde_coefficients(self, t):
        t = jnp.asarray(t, dtype=jnp.result_type(t, float))
        n = self.num_steps
        slopes = jnp.diff(self.log_alpha_bar).astype(t.dtype) * n  # d log alpha_bar / dt per segment
        idx = jnp.clip(jnp.floor(t * n).astype(jnp.int32), 0, n - 1)
        beta = -slopes[idx]
        return -0.5 * beta, jnp.sqrt(beta)


PROCESSES = {
    "vp": VP,
    "subvp": SubVP,
    "ve": VE,
    "edm": EDM,
    "flow": Flow,
    "ddpm_linear": DiscreteVP.linear,
    "ddpm_cosine": DiscreteVP.cosine,
    "ddpm_scaled_linear": DiscreteVP.scaled_linear,
}


def get_process(name: str, **kwargs) -> Process:
    """Build a process from its config name (see :data:`PROCESSES`) and keyword arguments."""
    if name not in PROCESSES:
        raise ValueError(f"Unknown process {name!r}; expected one of {', '.join(map(repr, PROCESSES))}.")
    return PROCESSES[name](**kwargs)
