"""Volumes for training and scoring: NIfTI folders, the BraTS layout, and a seeded synthetic default.

* :func:`load_dataset` -- everything a quality run needs: load, preprocess, split.
* :func:`load_volumes` / :func:`find_layout` / :func:`read_volume` -- NIfTI on disk (``nifti.py``).
* :func:`preprocess` -- percentile clip, [-1, 1], foreground crop, aspect-preserving resample, pad.
* :func:`synthetic_volume` / :func:`synthetic_volumes` / :func:`brain_phantom` -- the brain-like default.
* :func:`split_indices` / :func:`training_order` -- deterministic split and data order.
* :class:`DataError` -- unusable data, one line (exit 2 on the command line).
"""

from .dataset import SYNTHETIC, Dataset, load_dataset
from .errors import DataError
from .nifti import LoadedVolumes, find_layout, load_volumes, read_volume
from .preprocess import preprocess
from .split import Split, split_indices, training_order
from .synthetic import brain_phantom, synthetic_volume, synthetic_volumes

__all__ = [
    "SYNTHETIC", "DataError", "Dataset", "LoadedVolumes", "Split", "brain_phantom", "find_layout", "load_dataset",
    "load_volumes", "preprocess", "read_volume", "split_indices", "synthetic_volume", "synthetic_volumes",
    "training_order",
]
