"""The ``resnet-lab`` command: the library's commands (``resnet_lab.cli``) and ``report`` (``analysis``).

This module sits above both packages. ``analysis`` reads what ``resnet_lab`` logs, so it imports
the library; the library never imports ``analysis`` (tests/test_imports.py checks it), and the
command that writes reports is added here rather than in ``resnet_lab.cli``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from analysis import report
from resnet_lab import cli

COMMANDS = (report.add_parser,)  # registered beside the library's own (train, describe, study, diagnose, ui)


def make_parser() -> argparse.ArgumentParser:
    return cli.make_parser(COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
