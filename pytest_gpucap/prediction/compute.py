"""The compute buffer, estimated: the one large allocation llama.cpp does not size from the config alone.

Its size is the peak of a graph the allocator plans at boot, so it cannot be derived exactly here;
the estimate follows the shape of that graph and is fitted on this build's CPU backend. A per-host
calibration (:mod:`.calibration`) scales it from measured runs.
"""

from __future__ import annotations

from typing import Sequence

from ..matrix import CapacityConfig
from .facts import ModelFacts
from .kv import KvCachePrediction, kv_layout, predict_kv

#: Coefficients of the compute-buffer estimate, in f32 rows of n_ubatch tokens (see
#: estimate_compute_bytes). Fitted on llama.cpp b11434's CPU backend over 30 generated shapes x
#: {FA on, off} x n_ubatch {128, 256, 512} x 512-8192 cells: max error 13%, mean 6% (FA on) / 2% (off).
COMPUTE_COEF = {
    True: {"q": 1.5, "kv": 2.0, "embd_attn": 4.5, "ff": 3.0, "embd_ffn": 3.5},
    False: {"q": 2.0, "kv": 2.0, "embd_attn": 4.0, "ff": 2.0, "embd_ffn": 0.0},
}


def estimate_compute_bytes(cfg: CapacityConfig, facts: ModelFacts, caches: Sequence[KvCachePrediction] | None = None
                           ) -> int:
    """Estimate llama.cpp's compute buffer: the peak of its worst-case prompt graph.

    ``sched_reserve`` sizes the buffer for a ubatch of ``T = n_ubatch`` tokens over a full KV cache
    (``n_kv`` = every cell of a stream). The graph allocator reuses memory, so the buffer is the
    largest set of tensors alive at once, which is one of two stages of a layer:

    * attention: Q/K/V and their RoPE'd copies and the attention output, ``T x (a·n_head·d_k +
      b·n_head_kv·d_k + c·n_embd)`` f32; without flash attention also the score matrix
      ``KQ = T x cells x n_head`` f32 (this is what grows with the *allocated* slot context);
    * feed-forward (not computed for all tokens in the last layer, so only when n_layer >= 2):
      ``T x (d·n_ff + e·n_embd)`` f32;

    plus the attention masks, alive throughout: ``T x cells`` (f16 with flash attention, f32 without)
    for each cache (base and SWA), and the logits of one output per slot. It does not depend on the
    number of slots: non-unified streams split the ubatch, they do not multiply it.
    """
    lay = kv_layout(cfg)
    caches = predict_kv(cfg, facts) if caches is None else caches
    T, f32 = lay.n_ubatch, 4
    c = COMPUTE_COEF[lay.flash_attn]
    n_head = max(facts.n_head, default=0)
    q = n_head * facts.head_dim_k
    kv = max(facts.n_head_kv, default=0) * facts.head_dim_k
    cells = [k.cells for k in caches if k.layers]
    mask = T * sum(cells) * (2 if lay.flash_attn else 4)
    attn = T * f32 * (c["q"] * q + c["kv"] * kv + c["embd_attn"] * facts.n_embd)
    if not lay.flash_attn and cells:
        attn += T * max(cells) * n_head * f32
    ffn = T * f32 * (c["ff"] * facts.n_ff + c["embd_ffn"] * facts.n_embd) if facts.n_layer >= 2 else 0
    logits = lay.n_seq * facts.n_vocab * f32
    return int(max(attn, ffn) + mask + logits)
