"""``--config=configs/toy2d.py`` in a checkout: the package's recipe."""

from difflax.configs.toy2d import get_config as get_config
