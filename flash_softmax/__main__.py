"""``python -m flash_softmax``: the same command line as ``flash-softmax``."""

import sys

from flash_softmax.cli import main

sys.exit(main())
