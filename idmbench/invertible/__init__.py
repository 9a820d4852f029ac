"""Bijective layers and the memory-saving autograd of the invertible UNet core.

:mod:`.core` (the core and its memory-saving Function), :mod:`.couplings`, :mod:`.attention`,
:mod:`.resampling` (the layers), :mod:`.slabs` (slab-wise recompute), :mod:`.base` (the layer
contract), :mod:`.breakdown` (where the backward's memory peak is set).
"""

from .attention import CheckerboardAttentionCoupling, MaskedAttentionNet, checkerboard
from .base import InvertibleLayer, RecomputeContext
from .core import InvertibleUNetCore
from .couplings import AdditiveCoupling, TimeConditionedNet
from .resampling import OrthogonalDownsample, SplitDownsample, UpsampleMerge, haar_matrix
from .slabs import SlabNet, slab_plan

__all__ = [
    "AdditiveCoupling",
    "CheckerboardAttentionCoupling",
    "InvertibleLayer",
    "InvertibleUNetCore",
    "MaskedAttentionNet",
    "OrthogonalDownsample",
    "RecomputeContext",
    "SlabNet",
    "SplitDownsample",
    "TimeConditionedNet",
    "UpsampleMerge",
    "checkerboard",
    "haar_matrix",
    "slab_plan",
]
