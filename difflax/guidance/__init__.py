r"""Guidance and conditional generation as denoiser transforms.

Every transform here takes denoisers and returns a denoiser (``denoise(x_t, t) -> x0_hat``),
so transforms compose like optax transforms and every result works with every solver::

    guided = dynamic_threshold(cfg(denoise_cond, y, 4.0, null=NULL), percentile=0.995)
    x0, info = difflax.sample(guided, process, x_T, solver="ddim", steps=50)

Conditional denoisers ``denoise_cond(x_t, t, y)`` and null conditions are described in
:mod:`difflax.conditions`. Contents:

* :mod:`~difflax.guidance.classifier_free`: :func:`cfg`, :func:`cfg_separate`, guidance
  limited to an interval of noise levels, CFG rescale, :func:`apg`, :func:`apg_update`,
  :func:`compose`;
* :mod:`~difflax.guidance.classifier`: :func:`classifier_guidance`,
  :func:`classifier_log_prob`, :func:`universal_guidance`;
* :mod:`~difflax.guidance.constraints`: :func:`clip_x0`, :func:`dynamic_threshold`,
  :func:`inpaint`;
* :mod:`~difflax.guidance.inverse`: :func:`pigdm` for ``y = A x0 + sigma_y n``, with
  :class:`LinearOperator`, :func:`mask_operator`, :func:`superres_operator`,
  :func:`blur_operator`.

:func:`null_like` (from :mod:`difflax.conditions`) and :func:`noisy_classifier_loss`
(from :mod:`difflax.losses`) are re-exported here.

Spaces. With ``x_t = alpha x0 + sigma eps`` the x0, eps, v and score predictions are
affine functions of each other at fixed ``(x_t, t)`` (:mod:`difflax.parametrization`),
and an affine map preserves affine combinations whose weights sum to one. Linear
guidance rules such as classifier-free guidance, ``D_u + gamma (D_c - D_u)``, therefore
give the *same* sampler whether they are applied to x0, eps, v or score predictions;
this package applies them to x0. Non-linear rules (CFG rescale, APG, thresholding) depend
on the space and each says which one it uses. All conversions go through
:mod:`difflax.parametrization`.

Scalars a user sweeps (guidance scales, ``phi``, ``eta``, interval bounds) may be
traced: a guided denoiser built inside ``jax.jit`` from a traced scale never recompiles
when the scale changes.
"""

from difflax.conditions import ConditionalDenoiser, null_like
from difflax.guidance.classifier import FORMS, classifier_guidance, classifier_log_prob, universal_guidance
from difflax.guidance.classifier_free import (
    CONVENTIONS,
    RESCALE_SPACES,
    apg,
    apg_update,
    cfg,
    cfg_separate,
    compose,
    guidance_gamma,
)
from difflax.guidance.constraints import clip_x0, dynamic_threshold, inpaint
from difflax.guidance.inverse import (
    COVARIANCES,
    LinearOperator,
    blur_operator,
    mask_operator,
    pigdm,
    superres_operator,
)
from difflax.losses.classifier import noisy_classifier_loss

__all__ = [
    "CONVENTIONS",
    "COVARIANCES",
    "FORMS",
    "RESCALE_SPACES",
    "ConditionalDenoiser",
    "LinearOperator",
    "apg",
    "apg_update",
    "blur_operator",
    "cfg",
    "cfg_separate",
    "classifier_guidance",
    "classifier_log_prob",
    "clip_x0",
    "compose",
    "dynamic_threshold",
    "guidance_gamma",
    "inpaint",
    "mask_operator",
    "noisy_classifier_loss",
    "null_like",
    "pigdm",
    "superres_operator",
    "universal_guidance",
]

# The samplers that act between solver steps are solver wrappers now; guidance stays below the solvers.
_MOVED = ("inpaint_sample", "sdedit", "dps_sample")


def __getattr__(name):
    if name in _MOVED:
        raise AttributeError(
            f"difflax.guidance.{name} moved to difflax.solvers.{name} (a sampler built on the solver "
            "loop; guidance holds only denoiser transforms)."
        )
    raise AttributeError(f"module 'difflax.guidance' has no attribute {name!r}")
