"""``python -m idmbench.check`` = ``python run_bench.py check``."""

import sys

from . import main

sys.exit(main())
