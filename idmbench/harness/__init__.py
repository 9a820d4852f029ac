"""The benchmark harness, one job per module.

* :mod:`.sweep` -- the policy loop: predict each config, decide, measure it in a worker or keep the
  prediction, append its row; the largest cube per budget at the end.
* :mod:`.options` -- :class:`~.options.SweepOptions` and the checks that build it from flags.
* :mod:`.policy` -- measure or predict on this machine; :mod:`.estimate` -- how long measuring takes.
* :mod:`.runner` -- worker processes (start, wait, kill, label a death); :mod:`.worker` -- one config
  measured in a fresh process; :mod:`.records` -- the typed config and result they exchange, and rows.
* :mod:`.metadata` -- ``run.json``; :mod:`.budget` -- ``budgets.csv``.
* :mod:`.progress` -- the progress display; :mod:`.console` -- tables, summary, log routing.
* :mod:`.compare` -- measured versus predicted memory of a finished sweep.
"""
