"""The KV cache, exactly: the cells and bytes llama.cpp allocates for a config.

This is the one part of the prediction that is exact, so it mirrors this build's rules (llama.cpp
b11434, ``src/llama-context.cpp`` and ``src/llama-kv-cache*.cpp``) and nothing else:

- the total context is padded to a multiple of 256; with one stream per slot (``--no-kv-unified``,
  which the plugin passes) each slot gets ``pad256(n_ctx_padded // n_seq)`` cells and the cache holds
  that many cells for every slot (``n_stream = n_seq``); a unified cache holds ``n_ctx`` cells in one
  stream shared by all slots;
- sliding-window layers live in a second cache of ``pad256(min(cells, n_swa * (n_seq if unified
  else 1) + n_ubatch))`` cells (``--swa-full`` makes it as large as the base cache);
- bytes per layer = ``ggml_row_size(type, n_head_kv * head_dim) * cells * n_stream`` for K and for V,
  with row sizes from ``gguf.GGML_QUANT_SIZES`` (block size, bytes per block); without flash
  attention V is stored transposed and every layer uses the widest V row.

The prediction reproduces llama-server's ``llama_kv_cache: size = X MiB`` line to the printed
hundredth (it prints ``(float)bytes / 2**20`` with ``%7.2f``; :func:`~.facts.printed_mib` does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..matrix import CACHE_TYPES, CapacityConfig
from .facts import (DEFAULT_N_BATCH, DEFAULT_N_UBATCH, KV_PAD, MIB, ModelFacts, pad_to, printed_mib, quant_sizes,
                    row_bytes)

_FLAG_VALUE = {"-ub": "ubatch", "--ubatch-size": "ubatch", "-b": "batch", "--batch-size": "batch"}
_FLAG_BOOL = {"-kvu": ("unified", True), "--kv-unified": ("unified", True),
              "--no-kv-unified": ("unified", False), "--swa-full": ("swa_full", True)}


def _extra_flags(args: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        key, eq, inline = args[i].partition("=")
        if key in _FLAG_VALUE:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
            i += 0 if eq else 1
            try:
                out[_FLAG_VALUE[key]] = int(value)
            except ValueError:
                pass
        elif args[i] in _FLAG_BOOL:
            name, val = _FLAG_BOOL[args[i]]
            out[name] = val
        i += 1
    return out


@dataclass(frozen=True)
class KvLayout:
    """The context geometry llama.cpp derives from a config (``llama_context`` constructor)."""

    n_seq: int
    n_ctx: int  # total cells after padding
    n_ctx_seq: int  # cells per slot: what /slots reports as n_ctx
    n_stream: int
    unified: bool
    n_batch: int
    n_ubatch: int
    swa_full: bool
    flash_attn: bool  # as resolved: "auto" counts as on (CPU and CUDA resolve it on); quantized V forces on


def kv_layout(cfg: CapacityConfig) -> KvLayout:
    """Mirror llama_context's padding: ``n_ctx = pad256(N*ctx)``; per slot ``pad256(n_ctx // N)``."""
    flags = _extra_flags(cfg.extra_args)
    unified = bool(flags.get("unified", False))  # the plugin passes --no-kv-unified
    n_ctx_req = cfg.total_ctx
    n_batch = min(n_ctx_req, flags.get("batch") or cfg.batch_size or DEFAULT_N_BATCH)
    n_ubatch = min(n_batch, flags.get("ubatch") or DEFAULT_N_UBATCH)
    n_ctx = pad_to(n_ctx_req, KV_PAD)
    if unified:
        n_ctx_seq = n_ctx
    else:
        n_ctx_seq = pad_to(n_ctx // cfg.n, KV_PAD)
        n_ctx = n_ctx_seq * cfg.n
    quant_v = quant_sizes()[cfg.cache_type_v][0] > 1 if cfg.cache_type_v in CACHE_TYPES else False
    fa = cfg.flash_attn != "off" or quant_v
    return KvLayout(n_seq=cfg.n, n_ctx=n_ctx, n_ctx_seq=n_ctx_seq, n_stream=1 if unified else cfg.n,
                    unified=unified, n_batch=n_batch, n_ubatch=n_ubatch,
                    swa_full=bool(flags.get("swa_full", False)), flash_attn=fa)


def slot_ctx(cfg: CapacityConfig) -> int:
    """The context each slot really gets (``/slots`` ``n_ctx``): ``ctx`` rounded up to 256."""
    return kv_layout(cfg).n_ctx_seq


@dataclass(frozen=True)
class KvCachePrediction:
    """One ``llama_kv_cache`` (a SWA model has two): what its ``size = …`` log line will say."""

    kind: str  # "full" or "swa"
    cells: int  # per stream
    layers: int
    seqs: int
    streams: int
    type_k: str
    type_v: str
    k_bytes: int
    v_bytes: int

    @property
    def bytes(self) -> int:
        return self.k_bytes + self.v_bytes

    @property
    def size_mib(self) -> float:
        return self.bytes / MIB

    @property
    def printed(self) -> tuple[str, str, str]:
        """(size, K, V) exactly as llama-server prints them in MiB."""
        return printed_mib(self.bytes), printed_mib(self.k_bytes), printed_mib(self.v_bytes)


def kv_problems(cfg: CapacityConfig, facts: ModelFacts) -> list[str]:
    """Why llama-server would refuse this cache type at boot (llama_init_from_model checks)."""
    problems = []
    lay = kv_layout(cfg)
    qs = quant_sizes()
    for which, ctype in (("K", cfg.cache_type_k), ("V", cfg.cache_type_v)):
        block = qs[ctype][0]
        if block == 1:
            continue
        if which == "V" and cfg.flash_attn == "off":
            problems.append(f"quantized V cache ({ctype}) requires flash attention; set flash_attn = \"on\"")
        if lay.flash_attn:
            for il in range(facts.n_layer):
                head = facts.head_k(il) if which == "K" else facts.head_v(il)
                if head % block:
                    problems.append(f"{which} cache type {ctype} with block size {block} does not divide "
                                    f"n_embd_head_{which.lower()}={head}")
                    break
    if cfg.ctx * cfg.n <= 0:
        problems.append("n_ctx must be positive")
    return problems


def _cache(kind: str, layers: list[int], cells: int, lay: KvLayout, facts: ModelFacts,
           cfg: CapacityConfig) -> KvCachePrediction:
    v_trans = not lay.flash_attn
    k_bytes = v_bytes = 0
    for il in layers:
        k_bytes += row_bytes(cfg.cache_type_k, facts.kv_width_k(il)) * cells * lay.n_stream
        v_width = facts.kv_width_v_max if v_trans else facts.kv_width_v(il)
        v_bytes += row_bytes(cfg.cache_type_v, v_width) * cells * lay.n_stream
    return KvCachePrediction(kind, cells, len(layers), lay.n_seq, lay.n_stream, cfg.cache_type_k,
                             cfg.cache_type_v, k_bytes, v_bytes)


def predict_kv(cfg: CapacityConfig, facts: ModelFacts) -> tuple[KvCachePrediction, ...]:
    """The KV caches llama.cpp allocates for ``cfg`` (one, or base + SWA), in log order."""
    lay = kv_layout(cfg)
    layers = [il for il in range(facts.n_layer) if facts.kv_layers[il]]
    if not layers and not facts.swa_any:
        return ()
    if not facts.swa_any:
        return (_cache("full", layers, lay.n_ctx_seq, lay, facts, cfg),)
    size_base = lay.n_ctx_seq
    size_swa = pad_to(min(size_base, facts.sliding_window * (lay.n_seq if lay.unified else 1) + lay.n_ubatch),
                      KV_PAD)
    if lay.swa_full:
        size_swa = size_base
    full = [il for il in layers if not facts.swa_layers[il]]
    swa = [il for il in layers if facts.swa_layers[il]]
    return (_cache("full", full, size_base, lay, facts, cfg), _cache("swa", swa, size_swa, lay, facts, cfg))


def kv_bytes_per_token(facts: ModelFacts, cache_type_k: str = "f16", cache_type_v: str | None = None,
                       flash_attn: bool = True) -> dict[str, int]:
    """Bytes one cell (one token of one slot) costs: ``{"full": …, "swa": …}`` summed over layers."""
    cache_type_v = cache_type_v or cache_type_k
    out = {"full": 0, "swa": 0}
    for il in range(facts.n_layer):
        if not facts.kv_layers[il]:
            continue
        v_width = facts.kv_width_v(il) if flash_attn else facts.kv_width_v_max
        b = row_bytes(cache_type_k, facts.kv_width_k(il)) + row_bytes(cache_type_v, v_width)
        out["swa" if facts.swa_layers[il] else "full"] += b
    return out
