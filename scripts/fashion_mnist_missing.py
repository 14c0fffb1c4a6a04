"""Exit 3 when a study uses Fashion-MNIST and it is neither on this machine nor downloadable; else 0.

Used by ``make data``, which then installs Debian's ``dataset-fashion-mnist`` where it may:
finding and downloading data is the library's job (``resnet_lab.data``), installing system
packages is not. A study file that does not load exits 0: ``resnet-lab study`` reports it.
"""

from __future__ import annotations

import sys

from resnet_lab.data import load_dataset
from resnet_lab.errors import UserError
from resnet_lab.studyfile import load_scales


def main(study_file: str) -> int:
    try:
        cfgs = [r.cfg for study in load_scales(study_file).values() for r in study.runs]
    except UserError:
        return 0
    for data_root in sorted({c.data_root for c in cfgs if c.dataset == "fashion-mnist" and c.data_dir is None}):
        try:
            load_dataset("fashion-mnist", data_root=data_root, download=True)
        except UserError:
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
