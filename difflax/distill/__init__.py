"""Distillation of a frozen teacher denoiser into few-step students.

Every method is a pure loss over denoisers (the teacher frozen, the student being
trained), so it composes with any network and any optimizer;
:mod:`difflax.train.distill` trains Flax students with them (:mod:`difflax.train.advkd` the Adv-KD student).

* :mod:`~difflax.distill.progressive`: progressive distillation (Salimans & Ho 2022).
* :mod:`~difflax.distill.consistency`: consistency distillation and training (Song et al.
  2023), with the improved recipe (Song & Dhariwal 2024), easy consistency tuning (ECT, Geng et al.
  2024) and multistep sampling.
* :mod:`~difflax.distill.reflow`: reflow on teacher couplings and path straightness (Liu et al. 2023).
* :mod:`~difflax.distill.guidance`: guidance distillation (Meng et al. 2023).
* :mod:`~difflax.distill.dmd`: distribution matching distillation (Yin et al. 2024) / Diff-Instruct, and
  DMD2's GAN losses on a head over the fake denoiser's features (Yin et al. 2024b).
* :mod:`~difflax.distill.advkd`: adversarial knowledge distillation, Adv-KD (Mekonnen et al. 2023).
* :mod:`~difflax.distill.meanflow`: MeanFlow, one-step generation with the average velocity (Geng et al. 2025).
* :mod:`~difflax.distill.shortcut`: shortcut models, conditioned on the step size (Frans et al. 2024).
* :mod:`~difflax.distill.scm`: continuous-time consistency models with TrigFlow, sCM (Lu & Song 2024).
* :mod:`~difflax.distill.trajectories`: teacher trajectories as a stored dataset.
"""

from difflax.distill.advkd import (
    PAPER_NUM_STAGES,
    advkd_loss,
    advkd_timesteps,
    critic_loss,
    downsample,
    downsample_targets,
    generator_loss,
    gradient_penalty,
    interpolates,
    stage_factors,
    stage_times,
)
from difflax.distill.consistency import (
    DISTANCES,
    consistency_function,
    consistency_loss,
    consistency_sample,
    ct_curriculum,
    ct_target_decay,
    distance,
    ect_loss,
    ect_pair,
    ict_curriculum,
    karras_levels,
    ode_step,
    sample_level_index,
)
from difflax.distill.dmd import (
    dmd_critic_loss,
    dmd_fake_loss,
    dmd_generator_gan_loss,
    dmd_generator_loss,
    dmd_regression_loss,
)
from difflax.distill.guidance import guidance_distillation_loss
from difflax.distill.meanflow import (
    adaptive_weight,
    average_velocity_sample,
    meanflow_loss,
    meanflow_target,
    sample_interval,
)
from difflax.distill.progressive import progressive_loss, progressive_target, student_grid
from difflax.distill.reflow import reflow_loss, straightness
from difflax.distill.scm import (
    edm_as_trigflow,
    sample_trigflow_time,
    scm_loss,
    scm_tangent,
    trigflow_denoiser,
    trigflow_time,
    trigflow_velocity,
)
from difflax.distill.shortcut import shortcut_loss
from difflax.distill.trajectories import load_trajectories, save_trajectories, teacher_trajectories

__all__ = [
    "DISTANCES",
    "PAPER_NUM_STAGES",
    "adaptive_weight",
    "advkd_loss",
    "advkd_timesteps",
    "average_velocity_sample",
    "consistency_function",
    "consistency_loss",
    "consistency_sample",
    "critic_loss",
    "ct_curriculum",
    "ct_target_decay",
    "distance",
    "dmd_critic_loss",
    "dmd_fake_loss",
    "dmd_generator_gan_loss",
    "dmd_generator_loss",
    "dmd_regression_loss",
    "downsample",
    "downsample_targets",
    "ect_loss",
    "ect_pair",
    "edm_as_trigflow",
    "generator_loss",
    "gradient_penalty",
    "guidance_distillation_loss",
    "ict_curriculum",
    "interpolates",
    "karras_levels",
    "load_trajectories",
    "meanflow_loss",
    "meanflow_target",
    "ode_step",
    "progressive_loss",
    "progressive_target",
    "reflow_loss",
    "sample_interval",
    "sample_level_index",
    "sample_trigflow_time",
    "save_trajectories",
    "scm_loss",
    "scm_tangent",
    "shortcut_loss",
    "stage_factors",
    "stage_times",
    "straightness",
    "student_grid",
    "teacher_trajectories",
    "trigflow_denoiser",
    "trigflow_time",
    "trigflow_velocity",
]
