"""Random-weight Llama models in Hugging Face layout, so the vLLM backend runs without a model hub.

A model is a directory: ``config.json``, ``model.safetensors``, ``generation_config.json``, and a
byte-level BPE tokenizer trained here on synthetic code-like text (``tokenizer.json`` +
``tokenizer_config.json`` with a ChatML chat template). The bytes depend only on the shape (seed
included), and directories are cached by a shape key like ``modelgen.ensure_model``.

Writing needs ``numpy``, ``safetensors`` and ``tokenizers``. vLLM's own environment always has them
(vLLM depends on all three); the plugin's environment may not. ``ensure_hf_model(..., python=...)``
therefore generates in-process when it can and otherwise runs this module with the given
interpreter (``.venv-vllm/bin/python -m pytest_gpucap.hfmodel OUT_DIR ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import build_once

# Bumped whenever the files written for a given shape change, so cached directories are regenerated.
GENERATOR_VERSION = 1
#: vLLM's CPU attention kernels need head size >= 32: with 16 the engine dies at the first request
#: while /health still answers 200 (FINDINGS).
MIN_HEAD_DIM = 32
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # special tokens + the byte-level alphabet
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WEIGHT_TYPES = {"f16": ("float16", "float16"), "f32": ("float32", "float32")}  # numpy dtype, torch_dtype
REQUIRED_MODULES = ("numpy", "safetensors", "tokenizers")
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Code-like words (the workload's prompt vocabulary) so the tokenizer learns useful merges.
_WORDS = (
    "def", "return", "self", "import", "class", "for", "in", "if", "else", "None", "True", "False",
    "value", "result", "config", "request", "response", "buffer", "index", "count", "error", "path",
    "print", "yield", "async", "await", "with", "open", "data", "items", "key", "len", "range", "dict",
    "list", "str", "int", "float", "raise", "except", "try", "lambda", "assert", "cache", "slot", "token",
    "You", "are", "a", "coding", "agent", "Read", "the", "tool", "results", "and", "continue", "task",
    "TOOL", "RESULT", "Continue", "Hello", "system", "user", "assistant",
)
_PUNCT = ("(", ")", ":", ",", ".", "=", "[", "]", "{", "}", "\n", "    ", " ", " ", " ", " ", "_", "0", "1")


#: modelgen.ModelShape field → HfModelShape field, so one ``[models.NAME]`` table serves both backends.
_MODELGEN_KEYS = {"n_embd": "hidden_size", "n_ff": "intermediate_size", "n_ctx_train": "max_position_embeddings"}


@dataclass(frozen=True)
class HfModelShape:
    """Shape of a generated Llama (``LlamaForCausalLM``) in Hugging Face layout."""

    n_layer: int = 2
    hidden_size: int = 256
    n_head: int = 4
    n_head_kv: int = 2
    intermediate_size: int = 512
    n_vocab: int = 1024
    max_position_embeddings: int = 32768
    head_dim: int | None = None
    weight_type: str = "f16"
    rope_theta: float = 10000.0
    seed: int = 0
    name: str = "gpucap-hf-tiny"

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.n_head

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V for one token over all layers at ``dtype_bytes`` per element."""
        return 2 * self.n_layer * self.n_head_kv * self.head_size * dtype_bytes

    def validate(self, servable: bool = True) -> None:
        """Reject impossible shapes; with ``servable`` also shapes vLLM loads but cannot run."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "weight_type", "rope_theta") or (f.name == "head_dim" and value is None):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
        for key in ("n_layer", "hidden_size", "n_head", "n_head_kv", "intermediate_size", "n_vocab",
                    "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.n_head_kv > self.n_head or self.n_head % self.n_head_kv != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        if self.head_dim is None and self.hidden_size % self.n_head != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by n_head ({self.n_head}) "
                             "or set head_dim")
        if self.head_size <= 0 or self.head_size % 2 != 0:
            raise ValueError(f"head_dim must be a positive even number (RoPE), got {self.head_size}")
        if servable and self.head_size < MIN_HEAD_DIM:
            raise ValueError(f"head_dim {self.head_size} < {MIN_HEAD_DIM}: vLLM's CPU attention dies at the first "
                             f"request (write e.g. hidden_size = {MIN_HEAD_DIM * self.n_head})")
        if self.n_vocab < MIN_VOCAB:
            raise ValueError(f"n_vocab must be >= {MIN_VOCAB} (special tokens + 256 byte tokens), got {self.n_vocab}")
        if self.weight_type not in WEIGHT_TYPES:
            raise ValueError(f"weight_type must be one of {sorted(WEIGHT_TYPES)}, got {self.weight_type!r}")
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\\0"):
            raise ValueError(f"name must be a non-empty file-name-safe string, got {self.name!r}")

    def key(self) -> str:
        """Short stable hash of all fields (and the generator version) for cache directory names."""
        payload = json.dumps({"v": GENERATOR_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], servable: bool = True) -> HfModelShape:
        valid = [f.name for f in dataclasses.fields(cls)]
        for k in data:
            if k not in valid:
                raise ValueError(f"unknown HF model shape key {k!r}; valid keys: {', '.join(valid)}")
        shape = cls(**dict(data))
        shape.validate(servable)
        return shape

    @classmethod
    def from_model_table(cls, data: Mapping[str, Any], servable: bool = True) -> HfModelShape:
        """Build from a matrix ``[models.NAME]`` table written for the GGUF generator (``n_embd``,
        ``n_ff``, ``n_ctx_train``, ...) or with this class's own field names."""
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("sliding_window", "swa_every"):
                if key == "sliding_window" and value:
                    raise ValueError("sliding_window is not supported by the Hugging Face generator (Llama only)")
                continue
            out[_MODELGEN_KEYS.get(key, key)] = value
        return cls.from_mapping(out, servable)

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Hugging Face Llama tensor names and shapes ([out, in] for linear layers), in file order."""
        e, ff, v = self.hidden_size, self.intermediate_size, self.n_vocab
        q, kv = self.n_head * self.head_size, self.n_head_kv * self.head_size
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, e))]
        for il in range(self.n_layer):
            b = f"model.layers.{il}."
            out += [(b + "input_layernorm.weight", (e,)),
                    (b + "self_attn.q_proj.weight", (q, e)), (b + "self_attn.k_proj.weight", (kv, e)),
                    (b + "self_attn.v_proj.weight", (kv, e)), (b + "self_attn.o_proj.weight", (e, q)),
                    (b + "post_attention_layernorm.weight", (e,)),
                    (b + "mlp.gate_proj.weight", (ff, e)), (b + "mlp.up_proj.weight", (ff, e)),
                    (b + "mlp.down_proj.weight", (e, ff))]
        out += [("model.norm.weight", (e,)), ("lm_head.weight", (v, e))]
        return out

    def approx_bytes(self) -> int:
        size = 2 if self.weight_type == "f16" else 4
        total = 0
        for _, dims in self.tensor_shapes():
            count = 1
            for d in dims:
                count *= d
            total += count * size
        return total


def missing_modules() -> list[str]:
    """Which of the generator's imports this interpreter lacks."""
    import importlib.util

    return [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]


# ---------------------------------------------------------------- writing

def _corpus(shape: HfModelShape) -> Iterator[str]:
    """Seeded code-like text: the workload's words plus pseudo-identifiers, so BPE finds enough merges."""
    rng = random.Random(f"hf-tokenizer:{shape.seed}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    idents = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(2 * shape.n_vocab)]
    words = list(_WORDS) * 20 + idents
    for _ in range(max(2000, shape.n_vocab // 2)):
        yield "".join(rng.choice(words) + rng.choice(_PUNCT) for _ in range(rng.randint(8, 40)))


def _train_tokenizer(shape: HfModelShape) -> Any:
    """Byte-level BPE trained on the corpus, padded with reserved special tokens to exactly n_vocab
    (a random model samples every id of its embedding; each must decode)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=shape.n_vocab, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(shape), trainer=trainer)
    short = shape.n_vocab - tok.get_vocab_size()
    if short > 0:
        tok.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True, normalized=False)
                                for i in range(short)])
    return tok


def _config(shape: HfModelShape, ids: Mapping[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.n_layer,
        "num_attention_heads": shape.n_head,
        "num_key_value_heads": shape.n_head_kv,
        "head_dim": shape.head_size,
        "vocab_size": shape.n_vocab,
        "max_position_embeddings": shape.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": shape.rope_theta,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[BOS_TOKEN],
        "torch_dtype": WEIGHT_TYPES[shape.weight_type][1],
        "use_cache": True,
        "gpucap_generator": {"version": GENERATOR_VERSION, "shape": dataclasses.asdict(shape)},
    }


def _tokenizer_config(shape: HfModelShape, ids: Mapping[str, int]) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": BOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.max_position_embeddings,
        "chat_template": CHATML_TEMPLATE,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}
            for t in SPECIAL_TOKENS
        },
    }


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_files(shape: HfModelShape, out: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    tok = _train_tokenizer(shape)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if tok.get_vocab_size() > shape.n_vocab:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens > n_vocab {shape.n_vocab}")
    tok.save(str(out / "tokenizer.json"), pretty=False)
    _dump(out / "tokenizer_config.json", _tokenizer_config(shape, ids))
    _dump(out / "special_tokens_map.json", {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": BOS_TOKEN})
    _dump(out / "config.json", _config(shape, ids))
    _dump(out / "generation_config.json", {"bos_token_id": ids[BOS_TOKEN], "eos_token_id": ids[EOS_TOKEN],
                                           "pad_token_id": ids[BOS_TOKEN], "do_sample": False})
    wdtype = np.dtype(WEIGHT_TYPES[shape.weight_type][0])
    rng = np.random.default_rng(shape.seed)
    tensors: dict[str, Any] = {}
    for name, dims in shape.tensor_shapes():
        if len(dims) == 1:
            tensors[name] = np.ones(dims, dtype=wdtype)
        else:
            data = rng.standard_normal(dims, dtype=np.float32)
            data *= 0.02
            tensors[name] = data.astype(wdtype, copy=False)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def write_hf_model(shape: HfModelShape, out_dir: Path, servable: bool = True) -> Path:
    """Write the model directory atomically: build it in a sibling temp dir, then rename it into place.

    ``servable=False`` allows shapes vLLM cannot run (head_dim < 32), for tests of that failure.
    An existing ``out_dir`` is replaced.
    """
    shape.validate(servable)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _write_files(shape, tmp)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def cached_path(shape: HfModelShape, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{shape.name}-{shape.key()}"


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in FILES)


def _package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def ensure_hf_model(shape: HfModelShape, cache_dir: Path, python: str | None = None,
                    servable: bool = True, timeout_s: float = 300.0) -> Path:
    """The cached model directory, generated once even when several xdist workers ask at once.

    Generates in this interpreter when it has numpy, safetensors and tokenizers; otherwise runs
    ``python -m pytest_gpucap.hfmodel`` with ``python`` (e.g. vLLM's venv interpreter).
    """
    target = cached_path(shape, cache_dir)
    if _complete(target):
        return target
    shape.validate(servable)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    missing = missing_modules()
    if missing and not python:
        raise RuntimeError(f"generating a Hugging Face model needs {', '.join(missing)} in {sys.executable}: "
                           "install them, or pass the python of vLLM's environment (GPUCAP_VLLM_PYTHON)")
    if missing:
        assert python is not None
        argv = [python, "-m", "pytest_gpucap.hfmodel", str(target), "--shape-json",
                json.dumps(dataclasses.asdict(shape))]
        if not servable:
            argv.append("--allow-unservable")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_package_root()), env.get("PYTHONPATH")]))
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0 or not _complete(target):
            raise RuntimeError(f"model generation with {python} failed (exit {done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-2000:]}")
        return target
    return build_once(target, lambda: write_hf_model(shape, target, servable), _complete)


def main(argv: list[str] | None = None) -> int:
    """``python -m pytest_gpucap.hfmodel OUT_DIR [--layers ...]`` (run it with vLLM's python)."""
    d = HfModelShape()
    p = argparse.ArgumentParser(prog="python -m pytest_gpucap.hfmodel",
                                description="Write a small random-weight Llama in Hugging Face layout for vLLM.")
    p.add_argument("out", type=Path, metavar="OUT_DIR")
    p.add_argument("--layers", type=int, default=d.n_layer)
    p.add_argument("--hidden", type=int, default=d.hidden_size)
    p.add_argument("--heads", type=int, default=d.n_head)
    p.add_argument("--kv-heads", type=int, default=d.n_head_kv)
    p.add_argument("--ff", type=int, default=d.intermediate_size)
    p.add_argument("--vocab", type=int, default=d.n_vocab)
    p.add_argument("--max-pos", type=int, default=d.max_position_embeddings)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--weight-type", choices=sorted(WEIGHT_TYPES), default=d.weight_type)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--name", default=d.name)
    p.add_argument("--shape-json", default=None, help="all shape fields as JSON (overrides the flags)")
    p.add_argument("--allow-unservable", action="store_true", help="allow head_dim < 32 (for failure tests)")
    a = p.parse_args(argv)
    servable = not a.allow_unservable
    try:
        if a.shape_json:
            shape = HfModelShape.from_mapping(json.loads(a.shape_json), servable)
        else:
            shape = HfModelShape(n_layer=a.layers, hidden_size=a.hidden, n_head=a.heads, n_head_kv=a.kv_heads,
                                 intermediate_size=a.ff, n_vocab=a.vocab, max_position_embeddings=a.max_pos,
                                 head_dim=a.head_dim, weight_type=a.weight_type, seed=a.seed, name=a.name)
        missing = missing_modules()
        if missing:
            p.error(f"{sys.executable} lacks {', '.join(missing)}; run this with vLLM's python")
        out: Path = a.out
        # --shape-json is how ensure_hf_model calls us: keep a complete cached directory.
        build_once(out, lambda: write_hf_model(shape, out, servable),
                   _complete if a.shape_json else (lambda _: False))
    except ValueError as exc:
        p.error(str(exc))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out} {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
