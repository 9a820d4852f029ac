"""Measurement probes, each figure labelled with where it came from.

* :mod:`.memory` -- live-tensor peak of a piece of work (real tensors: a measurement; fake: a prediction)
* :mod:`.workload` -- the benchmarked unit of work: one training step, one DDIM sampling step
* :mod:`.predict` -- predicted peak memory and FLOPs of a step under fake tensors
* :mod:`.energy` -- joules of a window of steps: NVML on GPUs, codecarbon elsewhere
* :mod:`.timing` -- synchronised step times, median and IQR
* :mod:`.flops` -- FLOPs through ``torch.utils.flop_counter``
* :mod:`.env` -- torch / CUDA / driver versions, device and CPU model, git revision
"""
