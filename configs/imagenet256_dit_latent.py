"""``--config=configs/imagenet256_dit_latent.py`` in a checkout: the package's recipe."""

from difflax.configs.imagenet256_dit_latent import get_config as get_config
