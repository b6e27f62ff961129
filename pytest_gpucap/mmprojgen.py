"""Random-weight vision projector (mmproj) GGUFs so ``mmproj = true`` configs run on generated models.

The file is a llava-1.5-style CLIP: a small ViT (patch conv, position embeddings, pre-LN, ``n_layer``
blocks) followed by llama.cpp's ``mlp`` projector (``mm.0`` → GELU → ``mm.2``). That projector type
needs no special image tokens in the text vocab and no tiling, so it pairs with any generated text
model whose ``n_embd`` equals ``projection_dim`` (mtmd refuses the pair otherwise). Key and tensor
names are llama.cpp's (tools/mtmd/clip-impl.h), not an upstream checkpoint's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .files import ensure_file, write_atomically
from .modelgen import ModelShape, write_random_tensors

# Bumped whenever the bytes written for a given shape change, so cached files are regenerated.
GENERATOR_VERSION = 1
PROJECTOR_TYPE = "mlp"  # PROJECTOR_TYPE_MLP: llava-1.5, fixed-size preprocessing, no image marker tokens
MAX_IMAGE_SIZE = 8192  # clip.cpp rejects larger image_size (n_patches must fit int32)
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation, as real llava projectors carry
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
_WEIGHT_DTYPES = {"f16": np.float16, "f32": np.float32}


@dataclass(frozen=True)
class ProjectorShape:
    """Why: ``mmproj = true`` configs must boot end to end without downloading a vision projector.

    ``projection_dim`` is the width the projector hands to the text model, so it must equal the text
    model's ``n_embd``; build it with :meth:`for_model` to get that right. The defaults keep the
    projector's weights and its warmup compute buffer around a MiB (64x64 image, 16 patches).
    """

    image_size: int = 64
    patch_size: int = 16
    n_embd: int = 64
    n_ff: int = 128
    n_layer: int = 2
    n_head: int = 4
    projection_dim: int = 256
    weight_type: str = "f16"
    seed: int = 0
    name: str = "gpucap-tiny-mmproj"

    @classmethod
    def for_model(cls, model: ModelShape, **overrides: Any) -> ProjectorShape:
        """The projector for a generated text model: its ``n_embd``, its seed and a matching name."""
        fields: dict[str, Any] = {"projection_dim": model.n_embd, "seed": model.seed, "name": f"{model.name}-mmproj"}
        fields.update(overrides)
        shape = cls(**fields)
        shape.validate()
        return shape

    @property
    def n_patches(self) -> int:
        """Image tokens per image: the fixed-size preprocessor scales every image to image_size."""
        return (self.image_size // self.patch_size) ** 2

    def validate(self) -> None:
        """Reject shapes clip.cpp could never load or run, with a one-line reason."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "weight_type"):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
        for f_name in ("image_size", "patch_size", "n_embd", "n_ff", "n_layer", "n_head", "projection_dim"):
            if getattr(self, f_name) <= 0:
                raise ValueError(f"{f_name} must be > 0, got {getattr(self, f_name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be <= {MAX_IMAGE_SIZE} (clip.cpp limit), got {self.image_size}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.weight_type not in _WEIGHT_DTYPES:
            raise ValueError(f"weight_type must be one of {sorted(_WEIGHT_DTYPES)}, got {self.weight_type!r}")
        if not isinstance(self.name, str) or not self.name or any(c in self.name for c in "/\\\0"):
            raise ValueError(f"name must be a non-empty file-name-safe string, got {self.name!r}")

    def key(self) -> str:
        """Short stable hash of all fields (and the generator version) for cache file names."""
        payload = json.dumps({"v": GENERATOR_VERSION, "proj": PROJECTOR_TYPE, **dataclasses.asdict(self)},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Tensor names and numpy shapes (ggml order reversed), in file order."""
        e, ff, p, out = self.n_embd, self.n_ff, self.patch_size, self.projection_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("v.patch_embd.weight", (e, 3, p, p)),
            ("v.position_embd.weight", (self.n_patches, e)),
            ("v.pre_ln.weight", (e,)), ("v.pre_ln.bias", (e,)),
        ]
        for il in range(self.n_layer):
            b = f"v.blk.{il}."
            shapes += [(b + "ln1.weight", (e,)), (b + "ln1.bias", (e,))]
            for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
                shapes += [(b + proj + ".weight", (e, e)), (b + proj + ".bias", (e,))]
            shapes += [(b + "ln2.weight", (e,)), (b + "ln2.bias", (e,)),
                       (b + "ffn_up.weight", (ff, e)), (b + "ffn_up.bias", (ff,)),
                       (b + "ffn_down.weight", (e, ff)), (b + "ffn_down.bias", (e,))]
        shapes += [("mm.0.weight", (out, e)), ("mm.0.bias", (out,)),
                   ("mm.2.weight", (out, out)), ("mm.2.bias", (out,))]
        return shapes

    def tensor_dtype(self, name: str, dims: tuple[int, ...]) -> np.dtype[Any]:
        """Matrices (and the patch conv kernel) in weight_type; vectors and position embeddings f32."""
        if len(dims) == 1 or name == "v.position_embd.weight":
            return np.dtype(np.float32)
        return np.dtype(_WEIGHT_DTYPES[self.weight_type])

    def approx_bytes(self) -> int:
        """Size of the tensors, which is what clip reports as its model size."""
        return sum(int(np.prod(s)) * self.tensor_dtype(n, s).itemsize for n, s in self.tensor_shapes())


def write_mmproj(shape: ProjectorShape, path: Path) -> Path:
    """Write atomically (temp file in the same dir, then os.replace) so readers never see a partial file."""
    import gguf

    shape.validate()
    return write_atomically(Path(path), lambda tmp: _write_gguf(shape, tmp, gguf))


def _write_gguf(shape: ProjectorShape, path: Path, gguf: Any) -> None:
    """The keys clip.cpp's loader requires for a vision projector, then the tensors, streamed."""
    w = gguf.GGUFWriter(path, "clip")
    w.add_name(shape.name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if shape.weight_type == "f16" else gguf.LlamaFileType.ALL_F32)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(PROJECTOR_TYPE)
    w.add_vision_image_size(shape.image_size)
    w.add_vision_patch_size(shape.patch_size)
    w.add_vision_embedding_length(shape.n_embd)
    w.add_vision_feed_forward_length(shape.n_ff)
    w.add_vision_block_count(shape.n_layer)
    w.add_vision_head_count(shape.n_head)
    w.add_vision_projection_dim(shape.projection_dim)
    w.add_vision_attention_layernorm_eps(1e-5)
    w.add_vision_image_mean(list(IMAGE_MEAN))
    w.add_vision_image_std(list(IMAGE_STD))
    w.add_vision_use_gelu(False)  # CLIP's quick-GELU in the ViT blocks; the mlp projector always uses GELU

    # LayerNorm scales 1, every bias 0: activations stay finite through random blocks.
    norm_scales = ("ln1.weight", "ln2.weight", "pre_ln.weight")
    write_random_tensors(w, shape.tensor_shapes(), shape.seed, shape.tensor_dtype,
                         lambda name: 1.0 if name.endswith(norm_scales) else 0.0)


def ensure_mmproj(shape: ProjectorShape, cache_dir: Path) -> Path:
    """Return the cached projector, generating it once even when several xdist workers ask at the same time."""
    target = Path(cache_dir) / f"{shape.name}-{shape.key()}.gguf"
    return ensure_file(target, shape.validate, lambda path: write_mmproj(shape, path))
