"""What sizes a model's memory, read from its GGUF header, and how llama.cpp sizes a cache type.

Everything else in the prediction package starts from a :class:`ModelFacts` and the byte sizes of
ggml types, so they live here on their own: they need the ``gguf`` package and nothing that boots.
:func:`read_model_facts` reads layers, width, heads and KV heads (per layer when the file stores
arrays), key and value head sizes, which layers use a sliding window and how wide it is, which layers
own a KV cache (Gemma 3n/4 share KV between layers), the training context and the bytes of every
tensor; :func:`facts_from_shape` gives the same for a generated model without writing it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..matrix import CACHE_TYPES

MIB = 1024 * 1024
KV_PAD = 256  # llama.cpp pads n_ctx, n_ctx_seq and the SWA cache to multiples of 256 (this build)
DEFAULT_N_BATCH = 2048  # llama-server --batch-size default
DEFAULT_N_UBATCH = 512  # llama-server --ubatch-size default


def pad_to(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple`` (llama.cpp's GGML_PAD)."""
    return (value + multiple - 1) // multiple * multiple


# ---------------------------------------------------------------- cache types

@functools.cache
def quant_sizes() -> dict[str, tuple[int, int]]:
    """``{type name: (block size, bytes per block)}`` from the ``gguf`` package."""
    import gguf

    out = {}
    for qtype, (block, type_size) in gguf.GGML_QUANT_SIZES.items():
        out[qtype.name.lower()] = (int(block), int(type_size))
    return out


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


def is_host_buffer(name: str) -> bool:
    """``CPU``, ``CPU_Mapped``, ``CPU_REPACK``, ``AMX``, ``CUDA0_Host``: buffers in host memory, not on a GPU."""
    return name.upper().startswith("CPU") or name.upper() == "AMX" or name.endswith("_Host")


# ---------------------------------------------------------------- model facts

#: Architectures whose sliding-window layout this package models, as llama.cpp decides it
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
    return f.contents()


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
    """The facts of a ``modelgen.ModelShape`` without writing the file (same arch rules as the GGUF).

    Norms are f32 and every other tensor ``shape.weight_type`` (f16 or f32), as the generator writes
    them (``ModelShape.validate`` allows nothing else); the element size comes from the ggml type table.
    """
    shape.validate()
    n = shape.n_layer
    swa = tuple(shape.swa_layers())
    wsize = quant_sizes()[shape.weight_type][1]  # f16/f32: blocks of one value
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
    except (ValueError, KeyError, IndexError, OSError):  # not a GGUF the reader knows: count its bytes
        return path.stat().st_size
