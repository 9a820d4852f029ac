"""The benchmark harness: the sweep (:mod:`.sweep`), one worker process per config (:mod:`.worker`), what to
measure versus predict on this machine (:mod:`.policy`), the largest trainable cube per memory budget
(:mod:`.budget`), progress and summary output (:mod:`.progress`)."""
