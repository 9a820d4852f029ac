"""Where the bijective layers used to live; kept so that ``from idmbench.invertible.layers import ...`` works.

The layers are split by concern: :mod:`.base` (the layer contract and recompute helpers),
:mod:`.couplings` (additive couplings), :mod:`.attention` (checkerboard attention),
:mod:`.resampling` (orthogonal 2x2x2 resampling and the level transitions), :mod:`.slabs` (slab-wise
recompute). Import from ``idmbench.invertible`` in new code.
"""

from .attention import CheckerboardAttentionCoupling, MaskedAttentionNet, checkerboard
from .base import InvertibleLayer, State, call_with, detached_params, grads_for, recompute
from .couplings import AdditiveCoupling, TimeConditionedNet
from .resampling import OrthogonalDownsample, SplitDownsample, UpsampleMerge, haar_matrix

__all__ = [
    "AdditiveCoupling",
    "CheckerboardAttentionCoupling",
    "InvertibleLayer",
    "MaskedAttentionNet",
    "OrthogonalDownsample",
    "SplitDownsample",
    "State",
    "TimeConditionedNet",
    "UpsampleMerge",
    "call_with",
    "checkerboard",
    "detached_params",
    "grads_for",
    "haar_matrix",
    "recompute",
]
