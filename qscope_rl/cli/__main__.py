"""``python -m qscope_rl.cli``: the same as the ``qscope-rl`` console script."""

import sys

from . import main

sys.exit(main())
