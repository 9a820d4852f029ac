#!/usr/bin/env python
"""Entry point: ``python run_bench.py --models idm,patchddm --sizes 64,128,256`` (see --help)."""
import sys

from idmbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
