"""Training recipes: ml_collections ConfigDicts, one module per recipe, each with ``get_config()``.

A recipe is named by its module: ``difflax-train --config=toy2d`` trains
:mod:`difflax.configs.toy2d`, ``--config=toy2d:moons`` passes ``"moons"`` to its
``get_config``, and ``--config=path/to/recipe.py`` loads a file of the same form. In Python::

    from difflax.configs import digits

    config = digits.get_config()

Large recipes start from a smaller one (``digits``) and change what differs, field by field.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

_HERE = Path(__file__).parent

RECIPES: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules([str(_HERE)]) if not m.ispkg))


def recipe_file(spec: str) -> str:
    """The file a ``--config`` value names: ``"toy2d:moons"`` -> ``".../difflax/configs/toy2d.py:moons"``.

    A value without a path separator and without ``.py`` is a recipe name (anything after the
    first ``:`` is the argument of its ``get_config``); any other value is a file path and is
    returned as given.
    """
    name, sep, arg = spec.partition(":")
    if "/" in name or "\\" in name or name.endswith(".py"):
        return spec
    if name not in RECIPES:
        raise ValueError(
            f"unknown recipe {name!r}; the recipes are {', '.join(RECIPES)} "
            "(or give the path of a .py file that defines get_config)"
        )
    return f"{_HERE / name}.py{sep}{arg}"
