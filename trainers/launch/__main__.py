"""``python -m qscope_rl.trainers.launch --config RECIPE.yaml [--<field> <value> ...]``."""

import sys

from .launcher import main

sys.exit(main())
