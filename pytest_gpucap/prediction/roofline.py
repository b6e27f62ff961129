"""The decode roofline: how many tokens/s memory bandwidth allows, to judge a measured rate against.

Decode streams the weights and the KV cache once per step, so bandwidth bounds aggregate decode
tokens/s; a measured rate far below that bound points at something other than bandwidth. Built on a
:class:`~.predict.Prediction`, which already knows the bytes involved.
"""

from __future__ import annotations

import math

from ..matrix import CapacityConfig
from .facts import KV_PAD, ModelFacts, pad_to
from .predict import Prediction, predict


def decode_step_bytes(pred: Prediction, context_used_tokens: int | None = None) -> dict[str, int]:
    """Bytes one decode step of all N slots reads: weights (shared) + each slot's KV (+ scores).

    ``n_kv``, the cells attention reads per slot, is ``min(cells, max(256, pad256(used)))`` with
    ``used`` the highest occupied cell + 1 of the busiest stream in the batch (llama_kv_cache::get_n_kv):
    *not* the allocated context. ``context_used_tokens=None`` assumes the slots are full.
    """
    kv = scores = 0
    for cells, per_cell in pred.kv_cell_bytes:
        n_kv = cells if context_used_tokens is None else min(cells, max(KV_PAD, pad_to(context_used_tokens, KV_PAD)))
        kv += pred.n * n_kv * per_cell
    if not pred.flash_attn and pred.kv_cell_bytes:
        # without flash attention the KQ scores (f32) are written, soft-maxed and read back per layer;
        # approximated as 2 x 4 bytes x cells per slot for every KV byte-row pair (order of magnitude)
        cells = pred.kv_cell_bytes[0][0]
        n_kv = cells if context_used_tokens is None else min(cells, max(KV_PAD, pad_to(context_used_tokens, KV_PAD)))
        scores = pred.n * n_kv * 8 * max(1, len(pred.kv_caches))
    return {"weights": pred.weights_read_bytes, "kv": kv, "scores": scores,
            "total": pred.weights_read_bytes + kv + scores}


def decode_roofline_tps(pred: Prediction | ModelFacts, cfg: CapacityConfig, bandwidth_gbps: float,
                        context_used_tokens: int | None = None) -> float:
    """Bandwidth-bound ceiling of aggregate decode tokens/s with all N slots generating.

    One decode step produces N tokens and streams the weights once (shared by the N slots) plus each
    slot's KV cache: ``tps = N * bandwidth / (weights + N * kv_read_per_slot)``.

    Which KV is read: in this llama.cpp build attention reads ``n_kv`` cells per slot, the *used*
    part of the cache (highest occupied cell, padded to 256, of the busiest slot in the batch), with
    flash attention on and off alike; allocation only caps it. Without flash attention the score
    matrix adds traffic (and the compute buffer grows with the *allocated* cells). So
    ``context_used_tokens=None`` (slots assumed full: the study's hypothesis that attention cost
    scales with allocated slot context) is a lower ceiling than the realistic one with the tokens the
    conversations really hold. If the measured rate collapses far below the *used*-context roofline
    (the study's N=3 x 256K: 10 tok/s), bandwidth is not what limits it: look at compute-bound
    attention (quantized-KV dequantisation in the FA kernel), a cell high-water mark that stays near
    the allocation in long-running slots, or host-memory spill.
    """
    if isinstance(pred, ModelFacts):
        pred = predict(cfg, pred)
    step = decode_step_bytes(pred, context_used_tokens)["total"]
    if step <= 0 or bandwidth_gbps <= 0:
        return math.inf
    return cfg.n * bandwidth_gbps * 1e9 / step


def efficiency(measured_tps: float | None, roofline_tps: float | None) -> float | None:
    """Measured / roofline (0..1; None when either is unknown)."""
    if measured_tps is None or not roofline_tps or math.isinf(roofline_tps):
        return None
    return measured_tps / roofline_tps


#: Peak memory bandwidth (GB/s) of common cards, for profiles that do not state one.
KNOWN_BANDWIDTH_GBPS = {"RTX 4090": 1008.0, "RTX 3090": 936.0, "A100 80GB": 2039.0, "A100": 1555.0,
                        "H100": 3350.0, "H200": 4800.0, "L40S": 864.0, "RTX 6000 Ada": 960.0}


def bandwidth_for(device_name: str) -> float | None:
    """Peak bandwidth for a device name as NVML reports it (longest matching key), else None."""
    best = None
    for key, bw in KNOWN_BANDWIDTH_GBPS.items():
        if key.lower() in device_name.lower() and (best is None or len(key) > len(best[0])):
            best = (key, bw)
    return best[1] if best else None
