"""``--config=configs/cifar10_edm.py`` in a checkout: the package's recipe."""

from difflax.configs.cifar10_edm import get_config as get_config
