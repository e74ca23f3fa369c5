"""Exact and reproducible evaluation of generative models.

Feature statistics and distances:

* :mod:`~difflax.metrics.frechet` -- Fréchet distance (FID's formula), float64 and stable.
* :mod:`~difflax.metrics.stats` -- streaming count/mean/covariance, merged across batches
  and devices (Chan et al.), saved as ``mu``/``sigma`` ``.npz``.
* :mod:`~difflax.metrics.kid` -- KID, unbiased cubic-kernel MMD^2 over subsets.
* :mod:`~difflax.metrics.prdc` -- precision, recall, density, coverage (k-NN balls).
* :mod:`~difflax.metrics.sample_based` -- sliced Wasserstein, energy distance, RBF MMD and
  exact NLL for low-dimensional data with a known density.

Feature networks:

* :mod:`~difflax.metrics.inception` -- the FID Inception-v3 (pool3, 2048-d) in Flax, weights
  from a local ``.npz`` made by ``scripts/convert_inception.py``; nothing is downloaded.
* :mod:`~difflax.metrics.digits` -- a classifier for sklearn's 8x8 digits trained by difflax:
  Fréchet digits distance (FDD) and class accuracy.

:mod:`~difflax.metrics.evaluate` generates samples over seeds, sharded over a ``"data"``
mesh axis, and reports mean ± std (and min) per metric.
"""

from difflax.metrics import digits, distances, evaluate, frechet, inception, kid, prdc, sample_based, stats
from difflax.metrics.digits import DigitsClassifier, frechet_digits_distance, load_or_train_digits_classifier
from difflax.metrics.evaluate import EvalResult, generate_stats, make_data_mesh
from difflax.metrics.evaluate import evaluate as evaluate_samples
from difflax.metrics.frechet import frechet_distance
from difflax.metrics.inception import InceptionV3FID, inception_feature_fn, load_inception
from difflax.metrics.kid import kid as kernel_inception_distance
from difflax.metrics.prdc import prdc as precision_recall_density_coverage
from difflax.metrics.sample_based import energy_distance, exact_nll, mmd, sliced_wasserstein
from difflax.metrics.stats import FeatureStats, load_stats, save_stats

__all__ = [
    "DigitsClassifier",
    "EvalResult",
    "FeatureStats",
    "InceptionV3FID",
    "digits",
    "distances",
    "energy_distance",
    "evaluate",
    "evaluate_samples",
    "exact_nll",
    "frechet",
    "frechet_digits_distance",
    "frechet_distance",
    "generate_stats",
    "inception",
    "inception_feature_fn",
    "kernel_inception_distance",
    "kid",
    "load_inception",
    "load_or_train_digits_classifier",
    "load_stats",
    "make_data_mesh",
    "mmd",
    "prdc",
    "precision_recall_density_coverage",
    "sample_based",
    "save_stats",
    "sliced_wasserstein",
    "stats",
]
