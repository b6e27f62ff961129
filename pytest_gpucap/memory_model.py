"""Predict a capacity configuration's memory before anything boots, and check it against the server.

Three parts, each usable alone:

* **Model facts** (:func:`read_model_facts`): the GGUF metadata that sizes memory, read with the
  ``gguf`` package: layers, width, heads and KV heads (per layer when the file stores arrays), key and
  value head sizes, which layers use a sliding window and how wide it is, which layers own a KV cache
  (Gemma 3n/4 share KV between layers), the training context and the bytes of every tensor.
* **KV cache, exactly** (:func:`predict_kv`): the cells and bytes llama.cpp allocates, mirroring this
  build's rules (llama.cpp b11434, ``src/llama-context.cpp`` and ``src/llama-kv-cache*.cpp``):

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
  hundredth (it prints ``(float)bytes / 2**20`` with ``%7.2f``; :func:`printed_mib` does the same).
* **The rest, estimated** (:func:`predict`): weights (+ projector) + KV + a compute-buffer estimate
  (:func:`estimate_compute_bytes`, derived from how llama.cpp reserves its worst-case prompt graph and
  fitted on this build's CPU backend) + a per-host calibration learned from measured runs
  (:func:`calibrate`), giving predicted used and free device memory and the study's headroom verdict.

Plus the decode roofline (:func:`decode_roofline_tps`) that bounds aggregate decode tokens/s by
memory bandwidth, and :func:`fit_table` for ``--gpucap-predict``.

Weights are assumed to sit on one device: on ``host`` profiles everything is host memory; on ``cuda``
profiles all repeating layers and the output layer are offloaded (llama.cpp keeps the token embedding
on the host, and a tied output matrix is duplicated onto the GPU), unless ``gpu_layers`` says fewer.
Multi-GPU splits are not modelled.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .matrix import CACHE_TYPES, CapacityConfig, HostProfile, SLO
from .verdicts import headroom_class

MIB = 1024 * 1024
KV_PAD = 256  # llama.cpp pads n_ctx, n_ctx_seq and the SWA cache to multiples of 256 (this build)
DEFAULT_N_BATCH = 2048  # llama-server --batch-size default
DEFAULT_N_UBATCH = 512  # llama-server --ubatch-size default


def _pad(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


# ---------------------------------------------------------------- cache types

def _quant_sizes() -> dict[str, tuple[int, int]]:
    import gguf

    out = {}
    for qtype, (block, type_size) in gguf.GGML_QUANT_SIZES.items():
        out[qtype.name.lower()] = (int(block), int(type_size))
    return out


@functools.cache
def quant_sizes() -> dict[str, tuple[int, int]]:
    """``{type name: (block size, bytes per block)}`` from the ``gguf`` package."""
    return _quant_sizes()


def row_bytes(cache_type: str, n_elements: int) -> int:
    """``ggml_row_size``: bytes of ``n_elements`` values of ``cache_type`` (must fill whole blocks)."""
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"unknown KV cache type {cache_type!r} (one of {', '.join(CACHE_TYPES)})")
    block, size = quant_sizes()[cache_type]
    if n_elements % block:
        raise ValueError(f"{cache_type}: {n_elements} values do not fill whole blocks of {block}")
    return n_elements // block * size


def printed_mib(nbytes: int) -> str:
    """How llama.cpp prints a byte count in MiB: ``(float)bytes / (1024.0f*1024.0f)`` with ``%.2f``."""
    return f"{float(np.float32(nbytes)) / MIB:.2f}"


# ---------------------------------------------------------------- model facts

#: Architectures whose sliding-window layout this module models, as llama.cpp decides it
#: (src/models/<arch>.cpp, load_arch_hparams): default pattern period, dense-first, default window.
#: ``set_swa_pattern(n, dense_first=False)`` makes layer il SWA when ``il % n < n - 1`` (every n-th
#: layer is full attention); an array ``{arch}.attention.sliding_window_pattern`` overrides it.
SWA_ARCHS: Mapping[str, dict[str, Any]] = {
    "gemma2": {"pattern": 2, "n_swa": 4096},
    "gemma3": {"pattern": 6, "needs_window": True},
    "gemma3n": {"pattern": 5, "kv_from_start": 20},
    "gemma4": {"pattern": None},  # the array is required; KV shared by the last shared_kv_layers layers
    "cohere2": {"pattern": 4},
    "cohere2moe": {"pattern": 4, "dense_first": True},
    "exaone4": {"pattern": 4, "n_swa": 4096, "only_n_layer": 64},
    "llama4": {"pattern": 4, "n_swa_fixed": 8192, "chunked": True, "off_when_zero": True},
    "afmoe": {"pattern": 4, "needs_window": True},
    "mellum": {"pattern": 4, "needs_window": True},
    "exaone_moe": {"pattern": 4, "n_swa": 128},
}

#: Architectures without a KV cache at all (encoders, embedding models).
NO_KV_ARCHS = frozenset({"bert", "jina-bert-v2", "jina-bert-v3", "nomic-bert", "nomic-bert-moe",
                         "neo-bert", "eurobert", "modern-bert", "gemma-embedding", "wavtokenizer-dec"})


@dataclass(frozen=True)
class ModelFacts:
    """What sizes a model's memory, read from its GGUF header (no tensor data is read)."""

    path: str
    architecture: str
    name: str
    n_layer: int
    n_embd: int
    n_head: tuple[int, ...]  # per layer
    n_head_kv: tuple[int, ...]  # per layer (0 = no attention in that layer)
    head_dim_k: int  # full-attention layers (key_length, else n_embd / n_head)
    head_dim_v: int
    head_dim_k_swa: int  # sliding-window layers (key_length_swa, else head_dim_k)
    head_dim_v_swa: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    sliding_window: int = 0  # n_swa; 0 = no sliding-window layers
    swa_type: str = "none"  # none | standard | chunked
    swa_layers: tuple[bool, ...] = ()
    kv_layers: tuple[bool, ...] = ()  # False: the layer reads another layer's KV (shared, no cache)
    n_expert: int = 0
    n_expert_used: int = 0
    tensor_bytes: int = 0  # all tensors (the weights)
    token_embd_bytes: int = 0
    output_bytes: int = 0  # output.weight (0 when tied to the token embedding) + output_norm
    tied_output: bool = False
    layer_bytes: tuple[int, ...] = ()  # blk.N.* tensors per layer
    expert_bytes: int = 0  # *_exps tensors (MoE experts: only n_expert_used of n_expert read per token)
    file_bytes: int = 0
    notes: tuple[str, ...] = ()  # where the KV layout is not modelled exactly

    @property
    def swa_any(self) -> bool:
        return any(self.swa_layers)

    def head_k(self, il: int) -> int:
        return self.head_dim_k_swa if self.swa_layers[il] else self.head_dim_k

    def head_v(self, il: int) -> int:
        return self.head_dim_v_swa if self.swa_layers[il] else self.head_dim_v

    def kv_width_k(self, il: int) -> int:
        """``n_embd_k_gqa(il)``: K values per token in layer il."""
        return self.head_k(il) * self.n_head_kv[il]

    def kv_width_v(self, il: int) -> int:
        return self.head_v(il) * self.n_head_kv[il]

    @property
    def kv_width_v_max(self) -> int:
        return max((self.kv_width_v(il) for il in range(self.n_layer)), default=0)

    @property
    def kv_supported(self) -> bool:
        return not self.notes

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["swa_layers"] = [i for i, s in enumerate(self.swa_layers) if s]
        d["kv_layers"] = sum(self.kv_layers)
        d.pop("layer_bytes")
        return d


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    return value


def _per_layer(value: Any, n_layer: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n_layer
    if isinstance(value, (list, tuple)):
        vals = [int(v) for v in value]
        if len(vals) < n_layer:
            vals += [vals[-1] if vals else default] * (n_layer - len(vals))
        return tuple(vals[:n_layer])
    return (int(value),) * n_layer


def _swa_pattern(arch: str, rd: Any, n_layer: int, notes: list[str]) -> tuple[str, int, tuple[bool, ...]]:
    """Which layers use a sliding window, as llama.cpp's load_arch_hparams decides for ``arch``."""
    key_window = f"{arch}.attention.sliding_window"
    key_pattern = f"{arch}.attention.sliding_window_pattern"
    window = _field(rd, key_window)
    pattern = _field(rd, key_pattern)
    none = ("none", 0, (False,) * n_layer)
    rule = SWA_ARCHS.get(arch)
    if rule is None:
        if window:
            notes.append(f"architecture {arch!r} declares a sliding window ({window}) but its SWA layout "
                         "is not modelled: KV is predicted as full attention (an over-estimate)")
        return none
    if rule.get("only_n_layer") and n_layer != rule["only_n_layer"]:
        return none
    if rule.get("needs_window") and not window:
        return none
    if rule.get("off_when_zero") and window is not None and int(window) == 0:
        return none
    n_swa = int(window) if window is not None else int(rule.get("n_swa") or 0)
    if rule.get("n_swa_fixed"):
        n_swa = int(rule["n_swa_fixed"])
    if isinstance(pattern, (list, tuple)):
        layers = tuple(bool(v) for v in pattern[:n_layer]) + (False,) * max(0, n_layer - len(pattern))
    else:
        n_pattern = int(pattern) if pattern is not None else rule.get("pattern")
        if n_pattern is None:
            notes.append(f"{arch}: no {key_pattern} array; SWA layers unknown")
            return none
        dense_first = bool(rule.get("dense_first"))
        if dense_first:
            layers = tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
        else:
            layers = tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))
    if not any(layers) or n_swa <= 0:
        return none
    return ("chunked" if rule.get("chunked") else "standard"), n_swa, layers


def _read_facts(path: Path) -> ModelFacts:
    from gguf import GGUFReader

    rd = GGUFReader(path)
    arch = str(_field(rd, "general.architecture", "llama"))
    notes: list[str] = []
    n_layer = int(_field(rd, f"{arch}.block_count", 0))
    n_embd = int(_field(rd, f"{arch}.embedding_length", 0))
    n_head = _per_layer(_field(rd, f"{arch}.attention.head_count"), n_layer, 0)
    n_head_kv = _per_layer(_field(rd, f"{arch}.attention.head_count_kv"), n_layer, n_head[0] if n_head else 0)
    head0 = n_head[0] if n_head else 0
    default_head = n_embd // head0 if head0 else 0
    hk = int(_field(rd, f"{arch}.attention.key_length", default_head))
    hv = int(_field(rd, f"{arch}.attention.value_length", default_head))
    hk_swa = int(_field(rd, f"{arch}.attention.key_length_swa", hk))
    hv_swa = int(_field(rd, f"{arch}.attention.value_length_swa", hv))
    n_ff_raw = _field(rd, f"{arch}.feed_forward_length", 0)
    n_ff = max(_per_layer(n_ff_raw, max(n_layer, 1), 0))
    tokens = rd.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(_field(rd, f"{arch}.vocab_size", 0) or (len(tokens.data) if tokens is not None else 0))
    n_ctx_train = int(_field(rd, f"{arch}.context_length", 0))
    swa_type, n_swa, swa_layers = _swa_pattern(arch, rd, n_layer, notes)

    kv_from_start = n_layer
    rule = SWA_ARCHS.get(arch, {})
    if rule.get("kv_from_start"):
        kv_from_start = min(n_layer, int(rule["kv_from_start"]))
    shared = _field(rd, f"{arch}.attention.shared_kv_layers")
    if shared:
        kv_from_start = n_layer - int(shared)
    nextn = int(_field(rd, f"{arch}.nextn_predict_layers", 0) or 0)
    n_trunk = n_layer - nextn if 0 < nextn < n_layer else n_layer  # MTP head: no KV in the main context
    kv_layers = tuple(il < kv_from_start and il < n_trunk for il in range(n_layer))
    if arch in NO_KV_ARCHS:
        kv_layers = (False,) * n_layer
    if _field(rd, f"{arch}.attention.kv_lora_rank") is not None:
        notes.append(f"{arch}: MLA (compressed KV) is not modelled; KV is predicted as plain K/V")
    if any(k.startswith(f"{arch}.ssm.") for k in rd.fields) or _field(rd, f"{arch}.full_attention_interval"):
        notes.append(f"{arch}: recurrent/hybrid layers are not modelled; KV is predicted for every layer")

    tensor_bytes = token_embd = output = experts = 0
    per_layer = [0] * n_layer
    has_output = False
    blk = re.compile(r"blk\.(\d+)\.")
    for t in rd.tensors:
        nb = int(t.n_bytes)
        tensor_bytes += nb
        if t.name == "token_embd.weight":
            token_embd += nb
        elif t.name in ("output.weight", "output_norm.weight", "output_norm.bias", "output.bias"):
            output += nb
            has_output = has_output or t.name == "output.weight"
        m = blk.match(t.name)
        if m and int(m[1]) < n_layer:
            per_layer[int(m[1])] += nb
        if "_exps." in t.name:
            experts += nb
    return ModelFacts(
        path=str(path), architecture=arch, name=str(_field(rd, "general.name", path.stem)),
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim_k=hk, head_dim_v=hv, head_dim_k_swa=hk_swa, head_dim_v_swa=hv_swa, n_ff=n_ff,
        n_vocab=n_vocab, n_ctx_train=n_ctx_train, sliding_window=n_swa, swa_type=swa_type,
        swa_layers=swa_layers, kv_layers=kv_layers,
        n_expert=int(_field(rd, f"{arch}.expert_count", 0) or 0),
        n_expert_used=int(_field(rd, f"{arch}.expert_used_count", 0) or 0),
        tensor_bytes=tensor_bytes, token_embd_bytes=token_embd, output_bytes=output,
        tied_output=not has_output, layer_bytes=tuple(per_layer), expert_bytes=experts,
        file_bytes=path.stat().st_size, notes=tuple(notes),
    )


@functools.lru_cache(maxsize=64)
def _cached_facts(path: str, mtime_ns: int, size: int) -> ModelFacts:
    return _read_facts(Path(path))


def read_model_facts(path: Path) -> ModelFacts:
    """Read a GGUF model's memory-relevant metadata (cached per file version; header only)."""
    path = Path(path).expanduser().resolve()
    st = path.stat()
    return _cached_facts(str(path), st.st_mtime_ns, st.st_size)


def facts_from_shape(shape: Any) -> ModelFacts:
    """The facts of a ``modelgen.ModelShape`` without writing the file (same arch rules as the GGUF)."""
    from .modelgen import _WEIGHT_DTYPES  # noqa: PLC2701 - the generator's own dtype table

    shape.validate()
    n = shape.n_layer
    swa = tuple(shape.swa_layers())
    wsize = np.dtype(_WEIGHT_DTYPES[shape.weight_type]).itemsize
    per_layer = [0] * n
    tensor_bytes = token_embd = output = 0
    for name, dims in shape.tensor_shapes():
        nb = int(np.prod(dims)) * (4 if len(dims) == 1 else wsize)
        tensor_bytes += nb
        if name == "token_embd.weight":
            token_embd = nb
        elif name.startswith("output"):
            output += nb
        elif name.startswith("blk."):
            per_layer[int(name.split(".")[1])] += nb
    return ModelFacts(
        path=f"generated:{shape.name}", architecture=shape.arch, name=shape.name, n_layer=n,
        n_embd=shape.n_embd, n_head=(shape.n_head,) * n, n_head_kv=(shape.n_head_kv,) * n,
        head_dim_k=shape.head_size, head_dim_v=shape.head_size, head_dim_k_swa=shape.head_size,
        head_dim_v_swa=shape.head_size, n_ff=shape.n_ff, n_vocab=shape.n_vocab,
        n_ctx_train=shape.n_ctx_train, sliding_window=shape.sliding_window if any(swa) else 0,
        swa_type="standard" if any(swa) else "none", swa_layers=swa, kv_layers=(True,) * n,
        tensor_bytes=tensor_bytes, token_embd_bytes=token_embd, output_bytes=output,
        tied_output=shape.arch != "llama", layer_bytes=tuple(per_layer), file_bytes=0,
    )


def mmproj_bytes(path: Path) -> int:
    """Bytes a vision projector occupies: its tensor bytes, or the file size when it is no GGUF."""
    path = Path(path).expanduser()
    try:
        from gguf import GGUFReader

        return int(sum(int(t.n_bytes) for t in GGUFReader(path).tensors))
    except Exception:
        return path.stat().st_size


# ---------------------------------------------------------------- KV layout

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
    n_ctx = _pad(n_ctx_req, KV_PAD)
    if unified:
        n_ctx_seq = n_ctx
    else:
        n_ctx_seq = _pad(n_ctx // cfg.n, KV_PAD)
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

    def log_line(self) -> str:
        size, k, v = self.printed
        return (f"llama_kv_cache: size = {size:>7} MiB ({self.cells:6d} cells, {self.layers:3d} layers, "
                f"{self.seqs:2d}/{self.streams} seqs), K ({self.type_k}): {k:>7} MiB, V ({self.type_v}): {v:>7} MiB")


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
    size_swa = _pad(min(size_base, facts.sliding_window * (lay.n_seq if lay.unified else 1) + lay.n_ubatch), KV_PAD)
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


# ---------------------------------------------------------------- compute buffer

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


# ---------------------------------------------------------------- calibration

@dataclass(frozen=True)
class ProfileCalibration:
    """How one host profile's measured memory relates to the estimate.

    ``compute_scale``: server-reported compute buffer / :func:`estimate_compute_bytes` (median).
    ``weights_scale``: server-reported model buffers / predicted weight bytes (median): above 1 on a
    CPU whose llama.cpp build keeps repacked copies of some weights (AMX, CPU_REPACK buffers).
    The fit ``used - weights - KV - output = compute_fraction * compute + overhead_mib +
    per_slot_mib * N`` explains the rest: on a GPU ``compute_fraction`` is ~1 and ``overhead_mib`` the
    CUDA context; on the host probe (server RSS) untouched compute pages do not count, so the
    fraction is small and the overhead is the process itself.
    """

    profile: str
    compute_scale: float = 1.0
    compute_fraction: float = 1.0
    weights_scale: float = 1.0
    overhead_mib: float = 0.0
    per_slot_mib: float = 0.0
    n_records: int = 0
    max_residual_mib: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Used when a profile has no calibration yet. On a GPU: the compute buffer counted in full plus a
#: rough CUDA context (+ cuBLAS workspace) guess. On the host probe (server RSS): what the calibration
#: learned on this project's CPU runs (llama.cpp b11434): the process itself is ~21 MiB, ~0.07 MiB
#: per slot, and the compute buffer's pages are hardly touched after load (they are under load).
DEFAULT_CALIBRATION = {
    "cuda": ProfileCalibration("default-cuda", overhead_mib=512.0),
    "host": ProfileCalibration("default-host", compute_fraction=0.0, overhead_mib=21.0, per_slot_mib=0.07),
}


@dataclass(frozen=True)
class Calibration:
    """Per host profile corrections (JSON file keyed by profile name)."""

    profiles: Mapping[str, ProfileCalibration] = field(default_factory=dict)

    def for_profile(self, name: str) -> ProfileCalibration | None:
        return self.profiles.get(name)

    def merged(self, other: "Calibration") -> "Calibration":
        return Calibration({**self.profiles, **other.profiles})

    def save_calibration(self, path: Path) -> None:
        save_calibration(self, path)


def save_calibration(calibration: Calibration, path: Path) -> None:
    """Write ``{profile: {...}}`` as JSON (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({k: v.as_dict() for k, v in calibration.profiles.items()}, indent=2,
                              sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def load_calibration(path: Path) -> Calibration:
    """Read a calibration file; a missing file is an empty calibration."""
    path = Path(path)
    if not path.exists():
        return Calibration()
    data = json.loads(path.read_text(encoding="utf-8"))
    return Calibration({k: ProfileCalibration(**v) for k, v in data.items()})


def _config_from_record(record: Mapping[str, Any]) -> CapacityConfig:
    c = dict(record["config"])
    for key in ("extra_args",):
        c[key] = tuple(c.get(key) or ())
    c["env"] = tuple(tuple(x) for x in (c.get("env") or ()))
    return CapacityConfig(**c)


def _facts_for(record: Mapping[str, Any], facts: Any) -> ModelFacts | None:
    if isinstance(facts, ModelFacts):
        return facts
    model = (record.get("server") or {}).get("model")
    if isinstance(facts, Mapping) and model in facts:
        return facts[model]
    if model and Path(model).is_file():
        try:
            return read_model_facts(Path(model))
        except Exception:
            return None
    return None


def is_host_buffer(name: str) -> bool:
    """``CPU``, ``CPU_Mapped``, ``CPU_REPACK``, ``AMX``, ``CUDA0_Host``: buffers in host memory, not on a GPU."""
    return name.upper().startswith("CPU") or name.upper() == "AMX" or name.endswith("_Host")


def _server_sum(d: Any) -> float:
    return float(sum(d.values())) if isinstance(d, Mapping) else float(d or 0.0)


def _record_parts(record: Mapping[str, Any]) -> dict[str, float] | None:
    mem = record.get("memory") or {}
    rep = mem.get("server_report") or {}
    used = mem.get("used_after_load_mib")
    if used is None or not rep:
        return None
    device = mem.get("probe", "host")
    model = rep.get("model_mib") or {}
    compute = rep.get("compute_mib") or {}
    if device == "nvml":  # device buffers only: CUDA0 etc., not the host's
        model_dev = sum(v for k, v in model.items() if not is_host_buffer(k))
        compute_dev = sum(v for k, v in compute.items() if not is_host_buffer(k))
        output = 0.0
    else:
        model_dev, compute_dev, output = _server_sum(model), _server_sum(compute), _server_sum(rep.get("output_mib"))
    return {"used": float(used) - float(mem.get("baseline_used_mib") or 0.0), "weights": model_dev,
            "kv": float(rep.get("kv_mib") or 0.0), "compute": compute_dev, "output": output,
            "n": float(record["config"]["n"])}


def calibrate(records: Sequence[Mapping[str, Any]], facts: Any = None) -> Calibration:
    """Learn each profile's corrections from ceiling records (see ``ceiling.ceiling_record``).

    Uses ``record["memory"]["server_report"]`` (model/KV/compute MiB), ``used_after_load_mib`` minus
    ``baseline_used_mib`` and ``record["config"]``. ``facts`` (one ModelFacts, or a mapping from the
    record's ``server.model`` path) lets it compare the compute estimate; by default the model file
    named in the record is read when it still exists.
    """
    by_profile: dict[str, list[Mapping[str, Any]]] = {}
    for rec in records:
        if rec.get("kind", "ceiling") == "ceiling" and _record_parts(rec) is not None:
            by_profile.setdefault(rec.get("profile") or rec["config"]["profile"], []).append(rec)
    out: dict[str, ProfileCalibration] = {}
    for profile, recs in by_profile.items():
        parts = [_record_parts(r) for r in recs]
        ratios, weight_ratios = [], []
        for rec, p in zip(recs, parts):
            f = _facts_for(rec, facts)
            if f is None or not p:
                continue
            cfg = _config_from_record(rec)
            device = "cuda" if (rec.get("memory") or {}).get("probe") == "nvml" else "host"
            predicted_weights = _device_weights(cfg, f, device)[0] / MIB
            if predicted_weights > 0 and p["weights"] > 0:
                weight_ratios.append(p["weights"] / predicted_weights)
            est = estimate_compute_bytes(cfg, f) / MIB
            if est > 0 and p["compute"]:
                ratios.append(p["compute"] / est)
        scale = statistics.median(ratios) if ratios else 1.0
        weights_scale = statistics.median(weight_ratios) if weight_ratios else 1.0
        y = np.array([p["used"] - p["weights"] - p["kv"] - p["output"] for p in parts])
        x_c = np.array([p["compute"] for p in parts])
        x_n = np.array([p["n"] for p in parts])
        probe = (recs[0].get("memory") or {}).get("probe", "host")
        frac, per_slot = (1.0 if probe == "nvml" else 0.0), 0.0
        if len(parts) >= 3 and np.ptp(x_c) > 0:
            cols = [x_c, np.ones_like(x_c)] + ([x_n] if np.ptp(x_n) > 0 and len(parts) >= 4 else [])
            sol = np.linalg.lstsq(np.stack(cols, axis=1), y, rcond=None)[0]
            frac = float(min(max(sol[0], 0.0), 1.5))
            if len(cols) == 3:
                per_slot = float(max(sol[2], 0.0))
        overhead = float(np.median(y - frac * x_c - per_slot * x_n))
        resid = y - frac * x_c - per_slot * x_n - overhead
        out[profile] = ProfileCalibration(profile, compute_scale=round(scale, 4), compute_fraction=round(frac, 4),
                                          weights_scale=round(weights_scale, 4),
                                          overhead_mib=round(overhead, 2), per_slot_mib=round(per_slot, 3),
                                          n_records=len(parts),
                                          max_residual_mib=round(float(np.max(np.abs(resid))), 2))
    return Calibration(out)


# ---------------------------------------------------------------- prediction

@dataclass(frozen=True)
class Prediction:
    """Predicted memory of one config on one device (MiB unless noted)."""

    config_id: str
    profile: str
    device: str  # cuda | host
    slot_ctx: int  # per-slot context after padding
    weights_mib: float
    mmproj_mib: float
    kv_mib: float
    kv_per_slot_mib: float
    kv_caches: tuple[KvCachePrediction, ...]
    compute_mib: float  # the compute buffer itself (estimate x scale, or as given)
    compute_counted_mib: float  # the part expected in measured memory (x compute_fraction)
    compute_source: str  # estimate | calibrated | given
    output_mib: float
    overhead_mib: float  # fixed + per-slot overhead from the calibration
    total_mib: float  # predicted memory the server uses on the device
    budget_mib: float | None = None
    baseline_used_mib: float = 0.0
    free_mib: float | None = None
    headroom_gib: float | None = None  # the SLO it is judged against
    verdict: str | None = None  # Comfortable | Marginal | Risky | No fit
    problems: tuple[str, ...] = ()  # reasons llama-server would refuse to boot
    notes: tuple[str, ...] = ()
    calibrated: bool = False
    weights_read_bytes: int = 0  # per decode step (roofline)
    kv_cell_bytes: tuple[tuple[int, int], ...] = ()  # per cache: (cells, bytes per cell per slot)
    flash_attn: bool = True
    n: int = 1

    @property
    def fits(self) -> bool:
        """Boots at all: no refusal and predicted free memory >= 0."""
        return not self.problems and (self.free_mib is None or self.free_mib >= 0)

    @property
    def meets_headroom(self) -> bool | None:
        if self.free_mib is None or self.headroom_gib is None:
            return None
        return self.fits and self.free_mib / 1024 >= self.headroom_gib

    def skip_reason(self) -> str | None:
        """A one-line skip reason when the config is predicted not to fit, else None.

        A config the server will refuse (``problems``) is not skipped: it is a mistake in the matrix,
        and booting it fails the case with the server's own words.
        """
        if self.problems:
            return None
        if self.free_mib is not None and self.free_mib < 0:
            return (f"predicted not to fit: {self.total_mib:.0f} MiB needed (weights {self.weights_mib:.0f}"
                    f" + mmproj {self.mmproj_mib:.0f} + KV {self.kv_mib:.0f} + compute {self.compute_counted_mib:.0f}"
                    f" + overhead {self.overhead_mib:.0f}) > {self.budget_mib - self.baseline_used_mib:.0f} MiB "
                    f"available (budget {self.budget_mib:.0f} - in use {self.baseline_used_mib:.0f}); "
                    "--gpucap-no-predict-skip boots it anyway")
        return None

    def as_dict(self) -> dict[str, Any]:
        """For ``record["memory"]["predicted"]``."""
        r = lambda v: None if v is None else round(v, 2)  # noqa: E731
        return {
            "slot_ctx": self.slot_ctx, "weights_mib": r(self.weights_mib), "mmproj_mib": r(self.mmproj_mib),
            "kv_mib": r(self.kv_mib), "kv_per_slot_mib": r(self.kv_per_slot_mib),
            "kv_lines": [{"kind": k.kind, "cells": k.cells, "layers": k.layers, "seqs": k.seqs,
                          "size_mib": k.printed[0], "k_mib": k.printed[1], "v_mib": k.printed[2],
                          "k_bytes": k.k_bytes, "v_bytes": k.v_bytes} for k in self.kv_caches],
            "compute_mib": r(self.compute_mib), "compute_counted_mib": r(self.compute_counted_mib),
            "compute_source": self.compute_source, "output_mib": r(self.output_mib),
            "overhead_mib": r(self.overhead_mib), "total_mib": r(self.total_mib), "budget_mib": r(self.budget_mib),
            "baseline_used_mib": r(self.baseline_used_mib), "free_mib": r(self.free_mib),
            "headroom_gib": self.headroom_gib, "verdict": self.verdict, "fits": self.fits,
            "problems": list(self.problems), "notes": list(self.notes), "calibrated": self.calibrated,
        }


def _device_weights(cfg: CapacityConfig, facts: ModelFacts, device: str) -> tuple[int, str | None]:
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


def predict(cfg: CapacityConfig, facts: ModelFacts, mmproj_bytes: int = 0, compute_mib: float | None = None,
            calibration: Calibration | ProfileCalibration | None = None, profile: HostProfile | None = None,
            baseline_used_mib: float = 0.0, budget_mib: float | None = None) -> Prediction:
    """Predicted device memory for ``cfg``; with ``profile``, also free memory and the headroom verdict.

    ``compute_mib`` (e.g. a compute buffer the server reported for this config earlier) replaces the
    estimate. ``baseline_used_mib`` is memory already in use on the device before boot (a co-tenant);
    ``budget_mib`` overrides ``profile.memory_gib``.
    """
    device = profile.device if profile else "host"
    if isinstance(calibration, ProfileCalibration):
        cal = calibration
    else:
        cal = calibration.for_profile(cfg.profile) if calibration is not None else None
    calibrated = cal is not None
    cal = cal or DEFAULT_CALIBRATION["cuda" if device == "cuda" else "host"]
    lay = kv_layout(cfg)
    problems = tuple(kv_problems(cfg, facts))
    notes = list(facts.notes)
    try:
        caches = predict_kv(cfg, facts)
    except ValueError as exc:  # whole blocks not filled: llama-server refuses too
        caches = ()
        problems += (str(exc),)
    kv_bytes = sum(c.bytes for c in caches)
    weights, wnote = _device_weights(cfg, facts, device)
    weights = int(weights * cal.weights_scale)
    if wnote:
        notes.append(wnote)
    kv_dev_bytes = kv_bytes
    if device == "cuda" and cfg.gpu_layers is not None and cfg.gpu_layers <= facts.n_layer and facts.n_layer:
        kv_dev_bytes = kv_bytes * cfg.gpu_layers // facts.n_layer
    if compute_mib is None:
        est = estimate_compute_bytes(cfg, facts, caches) / MIB
        compute = est * cal.compute_scale
        source = "calibrated" if calibrated else "estimate"
    else:
        compute, source = float(compute_mib), "given"
    counted = compute * cal.compute_fraction
    output = lay.n_seq * facts.n_vocab * 4 / MIB if device != "cuda" else 0.0  # host output buffer
    overhead = cal.overhead_mib + cal.per_slot_mib * cfg.n
    mmproj = mmproj_bytes / MIB if cfg.mmproj else 0.0
    if cfg.mmproj and not mmproj_bytes:
        notes.append("mmproj requested but its size is unknown (pass mmproj_bytes)")
    total = weights / MIB + mmproj + kv_dev_bytes / MIB + counted + output + overhead
    budget = budget_mib if budget_mib is not None else (profile.memory_gib * 1024 if profile else None)
    free = verdict = slo_gib = None
    if budget is not None:
        free = budget - baseline_used_mib - total
        slo: SLO = profile.slo if profile else SLO()
        slo_gib = slo.headroom_gib
        verdict = "No fit" if (free < 0 or problems) else headroom_class(free / 1024, slo)
    cell_bytes = []
    per_tok = kv_bytes_per_token(facts, cfg.cache_type_k, cfg.cache_type_v, lay.flash_attn) if not problems else {}
    for c in caches:
        cell_bytes.append((c.cells, per_tok.get(c.kind, 0)))
    return Prediction(
        config_id=cfg.id, profile=cfg.profile, device=device, slot_ctx=lay.n_ctx_seq,
        weights_mib=weights / MIB, mmproj_mib=mmproj, kv_mib=kv_dev_bytes / MIB,
        kv_per_slot_mib=kv_bytes / MIB / cfg.n, kv_caches=caches, compute_mib=compute,
        compute_counted_mib=counted, compute_source=source, output_mib=output, overhead_mib=overhead,
        total_mib=total, budget_mib=budget, baseline_used_mib=baseline_used_mib, free_mib=free,
        headroom_gib=slo_gib, verdict=verdict, problems=problems, notes=tuple(notes), calibrated=calibrated,
        weights_read_bytes=_weights_read_per_step(facts, cfg.n), kv_cell_bytes=tuple(cell_bytes),
        flash_attn=lay.flash_attn, n=cfg.n,
    )


def predict_for(cfg: CapacityConfig, profile: HostProfile, model: Path | ModelFacts, mmproj: Path | None = None,
                calibration: Calibration | None = None, baseline_used_mib: float = 0.0) -> Prediction:
    """Convenience for the plugin: read (cached) facts and the projector size, then :func:`predict`."""
    facts = model if isinstance(model, ModelFacts) else read_model_facts(Path(model))
    mm = mmproj_bytes(mmproj) if (cfg.mmproj and mmproj is not None) else 0
    return predict(cfg, facts, mm, calibration=calibration, profile=profile, baseline_used_mib=baseline_used_mib)


def prediction_error(pred: Prediction, record: Mapping[str, Any]) -> dict[str, Any]:
    """Predicted vs server-reported vs measured, for one config's ceiling record."""
    mem = record.get("memory") or {}
    rep = mem.get("server_report") or {}
    parts = _record_parts(record) or {}
    kv_lines = rep.get("kv_lines") or []
    server_kv = [f"{line['size_mib']:.2f}" for line in kv_lines]
    predicted_kv = [c.printed[0] for c in pred.kv_caches]
    measured = parts.get("used")

    def row(p: float, s: float | None, m: float | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"predicted_mib": round(p, 2), "server_mib": None if s is None else round(s, 2)}
        if s is not None:
            d["diff_mib"] = round(p - s, 2)
        if m is not None:
            d["measured_mib"] = round(m, 2)
            d["error_mib"] = round(p - m, 2)
            d["error_pct"] = round(100 * (p - m) / m, 2) if m else None
        return d

    server_total = None
    if parts:
        server_total = parts["weights"] + parts["kv"] + parts["compute"] + parts["output"]
    out = {
        "config_id": pred.config_id,
        "kv": row(sum(float(x) for x in predicted_kv), parts.get("kv")) | {
            "lines_predicted": predicted_kv, "lines_server": server_kv, "exact": predicted_kv == server_kv},
        "weights": row(pred.weights_mib, parts.get("weights")),
        "compute": row(pred.compute_mib, parts.get("compute")),
        "total": row(pred.total_mib, server_total, measured),
    }
    if pred.free_mib is not None and mem.get("free_after_load_mib") is not None:
        out["free"] = {"predicted_mib": round(pred.free_mib, 2), "measured_mib": mem["free_after_load_mib"]}
    return out


def facts_for_ref(ref: str, models: Mapping[str, Mapping[str, Any]] | None = None,
                  base_dir: Path | None = None) -> ModelFacts:
    """Facts for a matrix model reference: ``generated:NAME`` (from its shape, no file written) or a path
    (relative to ``base_dir``, the matrix file's folder)."""
    from .matrix import BUILTIN_MODELS, GENERATED_PREFIX
    from .modelgen import ModelShape

    if ref.startswith(GENERATED_PREFIX):
        name = ref.removeprefix(GENERATED_PREFIX)
        return facts_from_shape(ModelShape.from_mapping((models or {}).get(name) or BUILTIN_MODELS[name]))
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return read_model_facts(path)


def predict_matrix(matrix: Any, model: str | None = None, mmproj: str | Path | None = None,
                   calibration: Calibration | None = None,
                   baseline_used_mib: Mapping[str, float] | None = None) -> tuple[list[Prediction], list[str]]:
    """Predict every config of a ``config.Matrix`` without booting (``--gpucap-predict``).

    ``model``/``mmproj`` are the command-line overrides (as ``--gpucap-model``/``--gpucap-mmproj``);
    otherwise each config's or profile's own. Returns the predictions and one line per config that
    could not be predicted (no model named, file missing).
    """
    from .matrix import GENERATED_PREFIX

    base_dir = matrix.path.parent if getattr(matrix, "path", None) else None
    preds: list[Prediction] = []
    missing: list[str] = []
    mm_size: dict[str, int] = {}
    for cfg in matrix.configs:
        profile = matrix.profile(cfg.profile)
        if cfg.backend != "llamacpp":
            missing.append(f"{cfg.id}: backend {cfg.backend} is not predicted")
            continue
        ref = model or cfg.model or profile.model
        if ref is None:
            missing.append(f"{cfg.id}: no model (pass --gpucap-model PATH)")
            continue
        try:
            facts = facts_for_ref(ref, matrix.models, base_dir)
        except (OSError, KeyError, ValueError) as exc:
            missing.append(f"{cfg.id}: model {ref}: {exc}")
            continue
        size = 0
        proj = mmproj or profile.mmproj
        if cfg.mmproj and not proj and ref.startswith(GENERATED_PREFIX):
            size = _generated_mmproj_bytes(ref, matrix.models)  # the plugin generates one next to the model
        elif cfg.mmproj and proj:
            key = str(proj)
            if key not in mm_size:
                try:
                    mm_size[key] = mmproj_bytes(Path(proj))
                except OSError:
                    mm_size[key] = 0
            size = mm_size[key]
        preds.append(predict(cfg, facts, size, calibration=calibration, profile=profile,
                             baseline_used_mib=(baseline_used_mib or {}).get(profile.name, 0.0)))
    return preds, missing


def _generated_mmproj_bytes(ref: str, models: Mapping[str, Mapping[str, Any]] | None) -> int:
    from .matrix import BUILTIN_MODELS, GENERATED_PREFIX
    from .mmprojgen import ProjectorShape
    from .modelgen import ModelShape

    name = ref.removeprefix(GENERATED_PREFIX)
    table = (models or {}).get(name) or BUILTIN_MODELS[name]
    return ProjectorShape.for_model(ModelShape.from_mapping(table)).approx_bytes()


# ---------------------------------------------------------------- fit table

def fit_table(rows: Iterable[Prediction]) -> str:
    """A text table for ``--gpucap-predict``: one line per config, nothing booted."""
    rows = list(rows)
    head = ("config", "slot ctx", "weights", "KV", "KV/slot", "compute", "total", "budget", "free", "verdict")
    lines = []
    for p in rows:
        verdict = p.verdict or "-"
        if p.problems:
            verdict = f"No boot: {p.problems[0]}"
        unknown_mmproj = any(n.startswith("mmproj requested") for n in p.notes)
        weights = f"{p.weights_mib + p.mmproj_mib:.0f}" + ("+?" if unknown_mmproj else "")
        lines.append((p.config_id, str(p.slot_ctx), weights, f"{p.kv_mib:.1f}",
                      f"{p.kv_per_slot_mib:.1f}", f"{p.compute_mib:.0f}", f"{p.total_mib:.0f}",
                      "-" if p.budget_mib is None else f"{p.budget_mib:.0f}",
                      "-" if p.free_mib is None else f"{p.free_mib:.0f}",
                      verdict + ("" if p.calibrated else "*")))
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(head)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 9) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [fmt(head) + "   (MiB; weights incl. mmproj)", fmt(tuple("-" * w for w in widths))]
    out += [fmt(r) for r in lines]
    if any(any(n.startswith("mmproj requested") for n in p.notes) for p in rows):
        out.append("+? the vision projector's size is unknown: pass --gpucap-mmproj PATH")
    if any(not p.calibrated for p in rows):
        out.append("* uncalibrated: compute and overhead are estimates (calibrate from a measured run)")
    if any(p.compute_counted_mib < p.compute_mib for p in rows):
        out.append("total counts the share of the compute buffer seen in memory after load (host RSS: "
                   "pages untouched until the first large batch)")
    return "\n".join(out)


# ---------------------------------------------------------------- decode roofline

def _weights_read_per_step(facts: ModelFacts, n: int) -> int:
    """Weight bytes one decode step streams: every matrix except the token embedding (a row lookup),
    the tied output matrix in full, and for MoE the expected share of experts N tokens route to."""
    base = facts.tensor_bytes - facts.token_embd_bytes + (facts.token_embd_bytes if facts.tied_output else 0)
    if facts.n_expert and facts.n_expert_used and facts.expert_bytes:
        touched = 1 - (1 - facts.n_expert_used / facts.n_expert) ** max(n, 1)
        base -= int(facts.expert_bytes * (1 - touched))
    return base


def decode_step_bytes(pred: Prediction, context_used_tokens: int | None = None) -> dict[str, int]:
    """Bytes one decode step of all N slots reads: weights (shared) + each slot's KV (+ scores).

    ``n_kv``, the cells attention reads per slot, is ``min(cells, max(256, pad256(used)))`` with
    ``used`` the highest occupied cell + 1 of the busiest stream in the batch (llama_kv_cache::get_n_kv):
    *not* the allocated context. ``context_used_tokens=None`` assumes the slots are full.
    """
    kv = scores = 0
    for cells, per_cell in pred.kv_cell_bytes:
        n_kv = cells if context_used_tokens is None else min(cells, max(KV_PAD, _pad(context_used_tokens, KV_PAD)))
        kv += pred.n * n_kv * per_cell
    if not pred.flash_attn and pred.kv_cell_bytes:
        # without flash attention the KQ scores (f32) are written, soft-maxed and read back per layer;
        # approximated as 2 x 4 bytes x cells per slot for every KV byte-row pair (order of magnitude)
        cells = pred.kv_cell_bytes[0][0]
        n_kv = cells if context_used_tokens is None else min(cells, max(KV_PAD, _pad(context_used_tokens, KV_PAD)))
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


__all__ = [
    "Calibration", "KvCachePrediction", "KvLayout", "ModelFacts", "Prediction", "ProfileCalibration",
    "bandwidth_for", "calibrate", "decode_roofline_tps", "decode_step_bytes", "efficiency",
    "estimate_compute_bytes", "facts_for_ref", "facts_from_shape", "fit_table", "kv_bytes_per_token", "kv_layout",
    "kv_problems", "load_calibration", "mmproj_bytes", "predict", "predict_for", "predict_kv", "predict_matrix",
    "prediction_error", "printed_mib", "read_model_facts", "row_bytes", "save_calibration", "slot_ctx",
]
