"""The jobs' ``--config`` flag: a recipe name (``digits``, ``toy2d:moons``) or a recipe file, plus overrides.

ml_collections' ``DEFINE_config_file`` loads a file path (``path.py`` or ``path.py:argument``)
and turns ``--config.key=value`` into overrides of its fields; the parser here resolves a
recipe name to its file in :mod:`difflax.configs` first, so both forms work everywhere.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from difflax.configs import RECIPES, recipe_file


class RecipeParser(flags.ArgumentParser):
    """Wraps ml_collections' config file parser: a recipe name is read as its file (:func:`recipe_file`)."""

    def __init__(self, file_parser: flags.ArgumentParser):
        self.file_parser = file_parser

    def parse(self, argument):
        return self.file_parser.parse(recipe_file(argument))

    def flag_type(self):
        return self.file_parser.flag_type()


def define_config_flag(default: str = "digits", flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """Defines ``--config`` (a locked ``ConfigDict``, overridable field by field) that also takes recipe names."""
    holder = config_flags.DEFINE_config_file(
        "config",
        None,
        f"Recipe: a name ({', '.join(RECIPES)}), name:argument, or a .py file defining get_config.",
        flag_values,
        lock_config=True,
    )
    # DEFINE_config_file takes no parser: wrap its own before the default is parsed.
    flag = flag_values[holder.name]
    flag.parser = RecipeParser(flag.parser)
    flag_values.set_default(holder.name, default)
    return holder
