"""One exception type for bad user input, so the CLI can turn it into one line and exit 2."""

import errno
import os
import tempfile
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: the message says what was wrong and how to fix it.

    The CLI prints ``resnet-lab: error: <message>`` and exits with status 2. Raise it
    before anything is written (no MLflow run, no file), so bad input leaves no trace.
    """


def check_can_create(folder: Path, what: str, advice: str) -> None:
    """Raise a one-line UserError unless ``folder`` is, or can be made, a writable directory.

    Checked without creating anything (an unnamed temporary file in the nearest existing
    ancestor), so a refusal leaves nothing behind; ``os.access`` would say yes to root on /proc.
    """
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"cannot create {what} {folder}: {existing} is not a writable directory "
                        f"({e.strerror or e}); {advice}") from None
