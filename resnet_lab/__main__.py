"""``python -m resnet_lab``: the library's commands; ``resnet-lab`` (``resnet_lab_command``) adds ``report``."""

import sys

from .cli import main

sys.exit(main())
