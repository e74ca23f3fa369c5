"""``--config=configs/cifar10_ddpmpp.py`` in a checkout: the package's recipe."""

from difflax.configs.cifar10_ddpmpp import get_config as get_config
