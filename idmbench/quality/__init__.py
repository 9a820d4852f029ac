"""Does the lighter model still learn? Train every model on one budget, score held-out denoising, sample.

``python run_bench.py quality ...`` (or ``python -m idmbench.quality ...``); the command line is in
:mod:`idmbench.quality.cli` (``add_arguments(parser)``, ``run(namespace) -> exit code``).
"""
