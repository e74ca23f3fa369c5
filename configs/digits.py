"""``--config=configs/digits.py`` in a checkout: the package's recipe."""

from difflax.configs.digits import get_config as get_config
