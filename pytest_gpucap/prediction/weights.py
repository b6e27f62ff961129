"""Where the weights sit and how many of their bytes one decode step reads.

Both the memory prediction and its calibration need the device's share of the weights, and the
roofline needs the bytes a step streams; kept apart from :mod:`.predict` so calibration does not
depend on the prediction it corrects.

Weights are assumed to sit on one device: on ``host`` profiles everything is host memory; on ``cuda``
profiles all repeating layers and the output layer are offloaded (llama.cpp keeps the token embedding
on the host, and a tied output matrix is duplicated onto the GPU), unless ``gpu_layers`` says fewer.
Multi-GPU splits are not modelled.
"""

from __future__ import annotations

from ..matrix import CapacityConfig
from .facts import ModelFacts


def device_weights(cfg: CapacityConfig, facts: ModelFacts, device: str) -> tuple[int, str | None]:
    """Weight bytes on the device, and a note when only part of the model is offloaded."""
    if device != "cuda":
        return facts.tensor_bytes, None
    ngl = cfg.gpu_layers
    n = facts.n_layer
    if ngl is None or ngl > n:
        extra = facts.token_embd_bytes if facts.tied_output else 0  # tied output duplicated onto the GPU
        return facts.tensor_bytes - facts.token_embd_bytes + extra, None
    start = max(n - ngl, 0)  # llama.cpp offloads the last ngl repeating layers
    return sum(facts.layer_bytes[start:]), f"partial offload: {ngl}/{n} layers on the GPU, output on the host"


def weights_read_per_step(facts: ModelFacts, n: int) -> int:
    """Weight bytes one decode step streams: every matrix except the token embedding (a row lookup),
    the tied output matrix in full, and for MoE the expected share of experts N tokens route to."""
    base = facts.tensor_bytes - facts.token_embd_bytes + (facts.token_embd_bytes if facts.tied_output else 0)
    if facts.n_expert and facts.n_expert_used and facts.expert_bytes:
        touched = 1 - (1 - facts.n_expert_used / facts.n_expert) ** max(n, 1)
        base -= int(facts.expert_bytes * (1 - touched))
    return base
