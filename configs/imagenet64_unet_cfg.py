"""``--config=configs/imagenet64_unet_cfg.py`` in a checkout: the package's recipe."""

from difflax.configs.imagenet64_unet_cfg import get_config as get_config
