"""Bijective layers and the memory-saving autograd of the invertible UNet core."""

from .core import InvertibleUNetCore
from .layers import (
    AdditiveCoupling,
    CheckerboardAttentionCoupling,
    InvertibleLayer,
    OrthogonalDownsample,
    SplitDownsample,
    UpsampleMerge,
    checkerboard,
    haar_matrix,
)

__all__ = [
    "AdditiveCoupling",
    "CheckerboardAttentionCoupling",
    "InvertibleLayer",
    "InvertibleUNetCore",
    "OrthogonalDownsample",
    "SplitDownsample",
    "UpsampleMerge",
    "checkerboard",
    "haar_matrix",
]
