"""The invariants no ``--update`` can waive (guards); each fails when what it guards is switched off (tests)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .figures import Figure, _gib, _reason, measured_activation, predicted_activation

logger = logging.getLogger(__name__)


#: the invariants' settings (see the module docstring)
INVARIANT_SIZE = 128  # predicted training peaks: IDM vs its twin and vs unet
TWIN_LIMIT = 1 / 4
UNET_LIMIT = 1 / 8
PARAM_MATCH = 0.05  # small presets: parameter counts within +-5 % of each other
FLAT_SIZE, FLAT_BLOCKS, FLAT_GROWTH = 64, (2, 8), 0.10
MEASURED_TWIN_SIZE, MEASURED_TWIN_BLOCKS, MEASURED_TWIN_LIMIT = 32, 8, 1 / 3


@dataclass
class Invariant:
    name: str
    ok: bool
    detail: str


def _guarded(name: str, fn: Callable[[], Invariant]) -> Invariant:
    """Run one invariant; any failure to compute it is a failed invariant with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except Exception as exc:  # noqa: BLE001 - a FAIL line, never a traceback
        logger.debug("invariant %s could not be computed", name, exc_info=True)
        return Invariant(name, False, f"could not be computed: {_reason(exc)}")


def _predicted_train_peak(name: str, overrides: dict[str, Any] | None = None) -> int:
    """Predicted training peak bytes of ``name`` (``small``, ``overrides``) at INVARIANT_SIZE^3."""
    from ..measure.predict import Predictor

    p = Predictor(name, "small", overrides=overrides, flops=False).predict(INVARIANT_SIZE, "train")
    if not p.ok:
        raise RuntimeError(f"prediction of {name} {overrides or ''} failed: {p.error}")
    return int(p.peak_bytes)  # type: ignore[arg-type]


def _params(name: str, overrides: dict[str, Any] | None = None) -> int:
    """Trainable parameters of ``name`` at ``small`` with ``overrides``."""
    from ..registry import count_parameters, create_model

    return count_parameters(create_model(name, preset="small", **(overrides or {})))


TWIN_NAME = f"idm <= 1/4 of its plain-autograd twin, predicted train {INVARIANT_SIZE}^3"
UNET_NAME = f"idm <= 1/8 of unet (SDPA, parameter-matched), predicted train {INVARIANT_SIZE}^3"
FLAT_NAME = "idm activations flat in blocks_per_level"
MEASURED_TWIN_NAME = "idm <= 1/3 of plain autograd, measured activations"


def twin_invariant(idm_peak: int | None = None) -> Invariant:
    """IDM's predicted training peak at 128^3 <= 1/4 of ``create_model("idm", memory_efficient=False)``'s."""

    def fn() -> Invariant:
        idm = idm_peak if idm_peak is not None else _predicted_train_peak("idm")
        twin = _predicted_train_peak("idm", {"memory_efficient": False})
        return Invariant(TWIN_NAME, idm <= twin * TWIN_LIMIT,
                         f"small: {_gib(idm)} vs {_gib(twin)} with memory_efficient=False "
                         f"(ratio {idm / twin:.3f}, limit {TWIN_LIMIT:.3f})")

    return _guarded(TWIN_NAME, fn)


def unet_invariant(idm_peak: int | None = None) -> Invariant:
    """IDM's predicted training peak at 128^3 <= 1/8 of unet's with SDPA attention, parameters within 5 %."""

    def fn() -> Invariant:
        from ..registry import list_models

        if "unet" not in list_models():
            return Invariant(UNET_NAME, False, "unet is not registered")
        sdpa = {"use_flash_attention": True}
        idm = idm_peak if idm_peak is not None else _predicted_train_peak("idm")
        unet = _predicted_train_peak("unet", sdpa)
        pi, pu = _params("idm"), _params("unet", sdpa)
        matched = abs(pi / pu - 1) <= PARAM_MATCH
        return Invariant(UNET_NAME, matched and idm <= unet * UNET_LIMIT,
                         f"small: {_gib(idm)} vs {_gib(unet)} (ratio {idm / unet:.3f}, limit {UNET_LIMIT:.3f}); "
                         f"parameters {pi:,} vs {pu:,} ({(pi / pu - 1) * 100:+.1f} %, limit +-{PARAM_MATCH * 100:g} %)"
                         + ("" if matched else " -- NOT parameter-matched"))

    return _guarded(UNET_NAME, fn)


def flat_invariant() -> Invariant:
    """IDM's activation bytes (fake tensors, 64^3 small) grow by at most 10 % from 2 to 8 blocks per level."""

    def fn() -> Invariant:
        lo, hi = FLAT_BLOCKS
        a_lo = predicted_activation("idm", "small", FLAT_SIZE, blocks_per_level=lo)
        a_hi = predicted_activation("idm", "small", FLAT_SIZE, blocks_per_level=hi)
        return Invariant(FLAT_NAME, a_hi <= (1 + FLAT_GROWTH) * a_lo,
                         f"{FLAT_SIZE}^3 small, predicted: {_gib(a_lo)} at {lo} blocks, {_gib(a_hi)} at {hi} blocks "
                         f"({(a_hi / a_lo - 1) * 100:+.1f} %, limit +{FLAT_GROWTH * 100:g} %)")

    return _guarded(FLAT_NAME, fn)


def measured_twin_invariant() -> Invariant:
    """IDM's measured activation bytes (CPU tensors, 32^3, 8 blocks) <= 1/3 of its plain-autograd twin's."""

    def fn() -> Invariant:
        k = MEASURED_TWIN_BLOCKS
        a = measured_activation("idm", "small", MEASURED_TWIN_SIZE, blocks_per_level=k)
        plain = measured_activation("idm", "small", MEASURED_TWIN_SIZE, blocks_per_level=k, memory_efficient=False)
        return Invariant(MEASURED_TWIN_NAME, a <= plain * MEASURED_TWIN_LIMIT,
                         f"{MEASURED_TWIN_SIZE}^3 small, {k} blocks, CPU tensors: {_gib(a)} vs {_gib(plain)} with "
                         f"memory_efficient=False (ratio {a / plain:.3f}, limit {MEASURED_TWIN_LIMIT:.3f})")

    return _guarded(MEASURED_TWIN_NAME, fn)


def invariants(figures: Sequence[Figure] = ()) -> list[Invariant]:
    """The checks no baseline can waive (see the module docstring); IDM's 128^3 peak is taken from
    ``figures`` when it is there."""
    from ..registry import list_models

    if "idm" not in list_models():
        return [Invariant(n, False, "idm is not registered") for n in (TWIN_NAME, UNET_NAME, FLAT_NAME, MEASURED_TWIN_NAME)]
    idm_peak = next((f.value for f in figures if f.key() == ("idm", "small", str(INVARIANT_SIZE), "train",
                                                              "predicted_peak_bytes") and f.value), None)
    return [twin_invariant(idm_peak), unet_invariant(idm_peak), flat_invariant(), measured_twin_invariant()]
