"""Random-weight GGUF models so the capacity suite runs end to end without downloading a model."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .files import ensure_file, write_atomically

# Bumped whenever the bytes written for a given shape change, so cached files are regenerated.
GENERATOR_VERSION = 1
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS in llama.cpp
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
MIN_VOCAB = len(SPECIAL_TOKENS) + 256
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: Opens a ``<think>`` block unless ``enable_thinking`` is false, and renders an assistant message's
#: ``reasoning_content`` back where it was: llama-server (``--reasoning-format auto``) then streams a
#: random-weight model's whole reply as ``delta.reasoning_content`` (it never writes ``</think>``).
THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content is defined and message.reasoning_content %}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"
)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "thinking": THINKING_TEMPLATE}
_WEIGHT_DTYPES = {"f16": np.float16, "f32": np.float32}


@dataclass(frozen=True)
class ModelShape:
    """Why: the capacity suite must run end to end without downloading a model."""

    n_layer: int = 2
    n_embd: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 512
    n_vocab: int = 1024
    n_ctx_train: int = 131072
    head_dim: int | None = None
    sliding_window: int = 0
    swa_every: int = 2
    weight_type: str = "f16"
    seed: int = 0
    name: str = "gpucap-tiny"
    chat_template: str = "chatml"  # a CHAT_TEMPLATES key: "thinking" opens a <think> block

    @property
    def head_size(self) -> int:
        """Per-head K/V width; quantized KV caches need a multiple of 32."""
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def arch(self) -> str:
        """llama.cpp reads sliding-window layers for gemma2 but not for llama."""
        return "gemma2" if self.sliding_window > 0 else "llama"

    def swa_layers(self) -> list[bool]:
        """Same rule as llama.cpp's set_swa_pattern: every swa_every-th layer is full attention."""
        if self.sliding_window <= 0:
            return [False] * self.n_layer
        return [il % self.swa_every < self.swa_every - 1 for il in range(self.n_layer)]

    def validate(self) -> None:
        """Reject shapes llama.cpp could never load, with a one-line reason."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "weight_type", "chat_template") or (f.name == "head_dim" and value is None):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
        for f_name in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab", "n_ctx_train", "swa_every"):
            if getattr(self, f_name) <= 0:
                raise ValueError(f"{f_name} must be > 0, got {getattr(self, f_name)}")
        if self.sliding_window < 0 or self.seed < 0:
            raise ValueError("sliding_window and seed must be >= 0")
        if self.n_layer > MAX_LAYERS:
            raise ValueError(f"n_layer must be <= {MAX_LAYERS} (llama.cpp limit), got {self.n_layer}")
        if self.n_head_kv > self.n_head or self.n_head % self.n_head_kv != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) or set head_dim")
        if self.head_size <= 0 or self.head_size % 2 != 0:
            raise ValueError(f"head_dim must be a positive even number (RoPE), got {self.head_size}")
        if self.n_vocab < MIN_VOCAB:
            raise ValueError(f"n_vocab must be >= {MIN_VOCAB} (special + 256 byte tokens), got {self.n_vocab}")
        if self.chat_template not in CHAT_TEMPLATES:
            raise ValueError(f"chat_template must be one of {sorted(CHAT_TEMPLATES)}, got {self.chat_template!r}")
        if self.weight_type not in _WEIGHT_DTYPES:
            raise ValueError(f"weight_type must be one of {sorted(_WEIGHT_DTYPES)}, got {self.weight_type!r}")
        if self.sliding_window > 0 and self.swa_every < 2:
            raise ValueError("swa_every must be >= 2 so that some layers use full attention")
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\\0"):
            raise ValueError(f"name must be a non-empty file-name-safe string, got {self.name!r}")

    def key(self) -> str:
        """Short stable hash of all fields (and the generator version) for cache file names."""
        fields_ = dataclasses.asdict(self)
        if fields_["chat_template"] == "chatml":
            del fields_["chat_template"]  # the default keeps the cache names models had before it existed
        payload = json.dumps({"v": GENERATOR_VERSION, **fields_}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ModelShape:
        """Build from config data (ini/CLI/JSON); typos must fail loudly rather than be ignored."""
        valid = [f.name for f in dataclasses.fields(cls)]
        for k in data:
            if k not in valid:
                raise ValueError(f"unknown model shape key {k!r}; valid keys: {', '.join(valid)}")
        shape = cls(**dict(data))
        shape.validate()
        return shape

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Tensor names and numpy shapes (ggml order reversed), in file order."""
        e, q, kv, ff = self.n_embd, self.n_head * self.head_size, self.n_head_kv * self.head_size, self.n_ff
        out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (self.n_vocab, e))]
        for il in range(self.n_layer):
            b = f"blk.{il}."
            out += [(b + "attn_norm.weight", (e,)), (b + "attn_q.weight", (q, e)),
                    (b + "attn_k.weight", (kv, e)), (b + "attn_v.weight", (kv, e)),
                    (b + "attn_output.weight", (e, q))]
            if self.arch == "gemma2":
                out.append((b + "post_attention_norm.weight", (e,)))
            out += [(b + "ffn_norm.weight", (e,)), (b + "ffn_gate.weight", (ff, e)),
                    (b + "ffn_up.weight", (ff, e)), (b + "ffn_down.weight", (e, ff))]
            if self.arch == "gemma2":
                out.append((b + "post_ffw_norm.weight", (e,)))
        out.append(("output_norm.weight", (e,)))
        if self.arch == "llama":
            out.append(("output.weight", (self.n_vocab, e)))
        return out

    def approx_bytes(self) -> int:
        """Size of the weights (norms are f32, everything else weight_type)."""
        wsize = np.dtype(_WEIGHT_DTYPES[self.weight_type]).itemsize
        return sum(int(np.prod(s)) * (4 if len(s) == 1 else wsize) for _, s in self.tensor_shapes())


def _filler_pieces() -> Iterator[str]:
    """Unique SentencePiece-style pieces: short strings with and without the word-start marker."""
    alphabet = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    for length in itertools.count(1):
        for combo in itertools.product(alphabet, repeat=length):
            piece = "".join(combo)
            yield "\u2581" + piece
            yield piece


def build_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """SPM vocab: <unk> <s> </s>, 256 byte tokens, ChatML control tokens, then unique fillers."""
    import gguf

    tokens = list(SPECIAL_TOKENS[:3]) + [f"<0x{b:02X}>" for b in range(256)] + list(SPECIAL_TOKENS[3:])
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.CONTROL] * 2
    seen = set(tokens)
    for piece in _filler_pieces():
        if len(tokens) >= n_vocab:
            break
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * MIN_VOCAB + [-float(i) for i in range(len(tokens) - MIN_VOCAB)]
    return tokens, scores, [int(t) for t in types]


def write_model(shape: ModelShape, path: Path) -> Path:
    """Write atomically (temp file in the same dir, then os.replace) so readers never see a partial file."""
    import gguf

    shape.validate()
    return write_atomically(Path(path), lambda tmp: _write_gguf(shape, tmp, gguf))


def _write_gguf(shape: ModelShape, path: Path, gguf: Any) -> None:
    """Stream tensors one at a time so large shapes do not need their weights in memory."""
    wdtype = _WEIGHT_DTYPES[shape.weight_type]
    w = gguf.GGUFWriter(path, shape.arch)
    w.add_name(shape.name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if shape.weight_type == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(shape.n_vocab)
    w.add_context_length(shape.n_ctx_train)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_key_length(shape.head_size)
    w.add_value_length(shape.head_size)
    w.add_rope_dimension_count(shape.head_size)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    if shape.arch == "gemma2":
        w.add_sliding_window(shape.sliding_window)
        w.add_sliding_window_pattern(shape.swa_layers())
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    tokens, scores, types = build_vocab(shape.n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_eot_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATES[shape.chat_template])

    write_random_tensors(w, shape.tensor_shapes(), shape.seed,
                         lambda name, dims: np.dtype(np.float32 if len(dims) == 1 else wdtype),
                         lambda name: 1.0)


def write_random_tensors(w: Any, plan: Sequence[tuple[str, Sequence[int]]], seed: int,
                         dtype_of: Callable[[str, Sequence[int]], np.dtype], fill_1d: Callable[[str], float]) -> None:
    """Tensor infos, then the data streamed one tensor at a time (large shapes never sit in memory):
    1-D tensors (norms, biases) constant f32, the rest N(0, 0.02) from ``seed``; closes the writer."""
    for name, dims in plan:
        dt = dtype_of(name, dims)
        w.add_tensor_info(name, dims, dt, int(np.prod(dims)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, dims in plan:
        if len(dims) == 1:
            w.write_tensor_data(np.full(dims, fill_1d(name), dtype=np.float32))
        else:
            data = rng.standard_normal(dims, dtype=np.float32)
            data *= 0.02
            w.write_tensor_data(data.astype(dtype_of(name, dims), copy=False))
    w.close()


def ensure_model(shape: ModelShape, cache_dir: Path) -> Path:
    """Return the cached model, generating it once even when several xdist workers ask at the same time."""
    target = Path(cache_dir) / f"{shape.name}-{shape.key()}.gguf"
    return ensure_file(target, shape.validate, lambda path: write_model(shape, path))



def main(argv: list[str] | None = None) -> int:
    """CLI entry point for `python -m pytest_gpucap genmodel`."""
    d = ModelShape()
    p = argparse.ArgumentParser(prog="python -m pytest_gpucap genmodel",
                                description="Write a small random-weight GGUF model for llama-server.")
    p.add_argument("out", type=Path, metavar="OUT.gguf")
    p.add_argument("--layers", type=int, default=d.n_layer)
    p.add_argument("--embd", type=int, default=d.n_embd)
    p.add_argument("--heads", type=int, default=d.n_head)
    p.add_argument("--kv-heads", type=int, default=d.n_head_kv)
    p.add_argument("--ff", type=int, default=d.n_ff)
    p.add_argument("--vocab", type=int, default=d.n_vocab)
    p.add_argument("--ctx", type=int, default=d.n_ctx_train)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--sliding-window", type=int, default=d.sliding_window)
    p.add_argument("--swa-every", type=int, default=d.swa_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--weight-type", choices=sorted(_WEIGHT_DTYPES), default=d.weight_type)
    p.add_argument("--name", default=d.name)
    a = p.parse_args(argv)
    shape = ModelShape(n_layer=a.layers, n_embd=a.embd, n_head=a.heads, n_head_kv=a.kv_heads, n_ff=a.ff,
                       n_vocab=a.vocab, n_ctx_train=a.ctx, head_dim=a.head_dim, sliding_window=a.sliding_window,
                       swa_every=a.swa_every, weight_type=a.weight_type, seed=a.seed, name=a.name)
    try:
        out = write_model(shape, a.out)
    except ValueError as exc:
        p.error(str(exc))
    print(f"{out} {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
