"""``--config=configs/digits_latent.py`` in a checkout: the package's recipe."""

from difflax.configs.digits_latent import get_config as get_config
