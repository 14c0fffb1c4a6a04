"""A study's name: the MLflow experiment its runs go to, from its file's ``name`` key or stem.

Apart from ``studyfile`` (which imports torch through the config) so that the commands that only
read a store (``ui``, ``report``) find a study's experiment without importing torch.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from .errors import UserError

# An MLflow experiment's name (a study's name is its experiment; checkpoints live in a folder of it):
# the one rule for both (config.check_experiment_name), so an empty, blank or path-like name is
# refused before anything is written. Here, not in config, so that ui and report read it without torch.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def study_name(arg: str) -> str:
    """A study name, or a study TOML path: its ``name`` key, else its file stem (the study runner's rule)."""
    path = Path(arg)
    if arg.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise UserError(f"study file {arg} not found: give a study name (e.g. fashion_mnist) or an existing "
                            "study TOML path")
        try:
            name = tomllib.loads(path.read_text()).get("name", path.stem)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"study file {arg} is not valid TOML: {' '.join(str(e).split())}") from None
        if not isinstance(name, str) or not name:
            raise UserError(f"study file {arg}: name must be a non-empty string, got {name!r}")
        return name
    if not arg or "/" in arg:
        raise UserError(f"{arg!r} is not a study name or a study TOML file")
    return arg
