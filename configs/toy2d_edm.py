"""``--config=configs/toy2d_edm.py`` in a checkout: the package's recipe."""

from difflax.configs.toy2d_edm import get_config as get_config
