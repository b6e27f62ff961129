"""Generated vision projectors must be deterministic, cacheable and loadable by a real llama-server."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import struct
import textwrap
import zlib
from pathlib import Path
from typing import Any, Iterator

import gguf
import httpx
import numpy as np
import pytest

from conftest import CapacityRun, plugin_server
from pytest_gpucap import mmprojgen, prediction, records
from pytest_gpucap.matrix import CapacityConfig, HostProfile
from pytest_gpucap.probes import HostProbe
from pytest_gpucap.mmprojgen import ProjectorShape, ensure_mmproj, write_mmproj
from pytest_gpucap.modelgen import ModelShape
from pytest_gpucap.backends import LaunchSpec, ServerError, ServerHandle
from pytest_gpucap.backends.llamacpp import parse_memory_report

SMALL = ProjectorShape(image_size=32, patch_size=8, n_embd=32, n_ff=64, n_layer=2, n_head=2, projection_dim=64,
                       name="p")
MIB = 1024 * 1024


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png(width: int = 32, height: int = 32) -> bytes:
    """A gradient RGB PNG built with zlib alone (no Pillow in the test environment)."""
    rows = b"".join(b"\x00" + b"".join(bytes((x * 8 % 256, y * 8 % 256, 128)) for x in range(width))
                    for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- the file


def test_file_has_the_keys_and_tensors_clip_reads(tmp_path: Path) -> None:
    path = write_mmproj(SMALL, tmp_path / "p.gguf")
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.architecture"] == "clip"
    assert fields["clip.has_vision_encoder"] is True
    assert fields["clip.projector_type"] == "mlp"
    expected = {"image_size": 32, "patch_size": 8, "embedding_length": 32, "feed_forward_length": 64,
                "block_count": 2, "attention.head_count": 2, "projection_dim": 64}
    assert {k: fields[f"clip.vision.{k}"] for k in expected} == expected
    assert fields["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert len(fields["clip.vision.image_mean"]) == len(fields["clip.vision.image_std"]) == 3

    tensors = {t.name: t for t in reader.tensors}
    plan = SMALL.tensor_shapes()
    assert list(tensors) == [name for name, _ in plan]
    for name, dims in plan:
        t = tensors[name]
        assert tuple(int(d) for d in reversed(t.shape)) == dims, name  # GGUFReader reports ggml order
        want = gguf.GGMLQuantizationType.F16 if SMALL.tensor_dtype(name, dims) == np.float16 else \
            gguf.GGMLQuantizationType.F32
        assert t.tensor_type == want, name
    assert tuple(int(d) for d in tensors["v.patch_embd.weight"].shape) == (8, 8, 3, 32)
    assert tuple(int(d) for d in tensors["v.position_embd.weight"].shape) == (32, SMALL.n_patches)
    # mtmd checks the projector's output width (mm.2.weight ne[1]) against the text model's n_embd
    assert int(tensors["mm.2.weight"].shape[1]) == SMALL.projection_dim
    assert prediction.mmproj_bytes(path) == SMALL.approx_bytes() < path.stat().st_size


def test_same_shape_gives_identical_bytes(tmp_path: Path) -> None:
    a = write_mmproj(SMALL, tmp_path / "a.gguf")
    b = write_mmproj(SMALL, tmp_path / "b.gguf")
    c = write_mmproj(dataclasses.replace(SMALL, seed=1), tmp_path / "c.gguf")
    assert _sha(a) == _sha(b) != _sha(c)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_key_is_stable_and_sensitive_to_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    changed: dict[str, Any] = {"image_size": 64, "patch_size": 16, "n_embd": 64, "n_ff": 32, "n_layer": 3,
                               "n_head": 4, "projection_dim": 128, "weight_type": "f32", "seed": 5, "name": "o"}
    assert set(changed) == {f.name for f in dataclasses.fields(ProjectorShape)}
    keys = {dataclasses.replace(SMALL, **{k: v}).key() for k, v in changed.items()}
    assert len(keys | {SMALL.key()}) == len(changed) + 1
    before = SMALL.key()
    monkeypatch.setattr(mmprojgen, "GENERATOR_VERSION", mmprojgen.GENERATOR_VERSION + 1)
    assert SMALL.key() != before


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 0}, "image_size must be > 0"),
        ({"projection_dim": -1}, "projection_dim must be > 0"),
        ({"image_size": 30}, "multiple of patch_size"),
        ({"image_size": 8200, "patch_size": 8}, "image_size must be <= 8192"),
        ({"n_head": 3}, "divisible by n_head"),
        ({"weight_type": "q8_0"}, "weight_type"),
        ({"seed": -1}, "seed"),
        ({"n_ff": 1.5}, "n_ff must be an integer"),
        ({"name": "a/b"}, "name"),
    ],
)
def test_validate_rejects_impossible_shapes(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, **changes).validate()


def test_for_model_matches_the_text_width() -> None:
    text = ModelShape(n_embd=128, n_head=4, n_head_kv=2, seed=3, name="m")
    shape = ProjectorShape.for_model(text)
    assert (shape.projection_dim, shape.seed, shape.name) == (128, 3, "m-mmproj")
    assert ProjectorShape.for_model(ModelShape()).projection_dim == ModelShape().n_embd
    assert ProjectorShape.for_model(text, image_size=32, patch_size=8).n_patches == 16
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ProjectorShape.for_model(text, image_size=30)


def test_ensure_mmproj_builds_once_and_names_by_key(tmp_path: Path) -> None:
    first = ensure_mmproj(SMALL, tmp_path)
    assert first.name == f"p-{SMALL.key()}.gguf"
    stamp = first.stat().st_mtime_ns
    assert ensure_mmproj(SMALL, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert ensure_mmproj(dataclasses.replace(SMALL, seed=2), tmp_path) != first


def test_default_projector_stays_small() -> None:
    shape = ProjectorShape.for_model(ModelShape())
    assert shape.n_patches == 16
    assert shape.approx_bytes() < MIB


# ---------------------------------------------------------------- the real llama-server


@pytest.fixture(scope="module")
def vision_server(llama_server_bin: Path, tiny_model: Path, model_cache: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """The tiny text model plus its generated projector, booted the way the plugin boots mmproj configs."""
    proj = ensure_mmproj(ProjectorShape.for_model(ModelShape()), model_cache)
    cfg = CapacityConfig(profile="cpu", n=1, ctx=2048, mmproj=True, threads=1, cache_ram_mib=0)
    with plugin_server(llama_server_bin, tiny_model, cfg, tmp_path_factory.mktemp("mmproj-logs"), proj) as handle:
        yield handle


def test_llama_server_loads_the_generated_projector(vision_server: ServerHandle) -> None:
    shape = ProjectorShape.for_model(ModelShape())
    assert vision_server.spec.mmproj is not None
    assert ["--mmproj", str(vision_server.spec.mmproj)] == vision_server.argv[
        vision_server.argv.index("--mmproj"):vision_server.argv.index("--mmproj") + 2]
    assert vision_server.boot_s is not None
    assert httpx.get(f"{vision_server.url}/health", timeout=5).status_code == 200
    assert httpx.get(f"{vision_server.url}/props", timeout=5).json()["modalities"]["vision"] is True

    assert vision_server.log_path is not None
    log = vision_server.log_path.read_text(errors="replace")
    assert "loaded multimodal model" in log
    assert "clip_model_loader: has vision encoder" in log
    assert re.search(r"load_hparams: projector: +mlp", log)
    size = re.search(r"load_hparams: model size: +([0-9.]+) MiB", log)
    assert size and float(size[1]) == pytest.approx(shape.approx_bytes() / MIB, abs=0.01)
    assert re.search(r"reserve_compute_meta: +CPU compute buffer size = +[0-9.]+ MiB", log)
    # the text model's own report still parses with the projector loaded
    report = parse_memory_report(log)
    assert report.kv and report.n_slots == 1 and report.model_mib


def test_image_request_is_answered_with_usage(vision_server: ServerHandle) -> None:
    url = f"{vision_server.url}/v1/chat/completions"
    image = "data:image/png;base64," + base64.b64encode(_png()).decode()
    text = {"type": "text", "text": "describe"}
    with_image = {"messages": [{"role": "user", "content": [text, {"type": "image_url", "image_url": {"url": image}}]}],
                  "max_tokens": 4}
    without = {"messages": [{"role": "user", "content": [text]}], "max_tokens": 4}
    r = httpx.post(url, json=with_image, timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] > 0
    baseline = httpx.post(url, json=without, timeout=60).json()["usage"]
    # every image becomes n_patches embeddings (fixed-size preprocessing, no marker tokens for mlp)
    assert usage["prompt_tokens"] - baseline["prompt_tokens"] >= ProjectorShape.for_model(ModelShape()).n_patches


def test_projector_compute_is_not_counted_as_text_compute(vision_server: ServerHandle) -> None:
    assert vision_server.log_path is not None
    log = vision_server.log_path.read_text(errors="replace")
    text_compute = sum(float(m[1]) for m in re.finditer(r"sched_reserve: +CPU compute buffer size = +([0-9.]+)", log))
    report = parse_memory_report(log)
    assert report.compute_mib.get("CPU") == pytest.approx(text_compute)
    # the projector's own figures are kept apart: its weights and its warmup compute buffer
    assert report.mmproj_model_mib == pytest.approx(0.39, abs=0.01)
    assert 0 < report.mmproj_compute_mib.get("CPU", 0) < 1


def test_projector_width_mismatch_fails_boot(llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> None:
    proj = ensure_mmproj(ProjectorShape(projection_dim=128, name="narrow"), tmp_path)
    cfg = CapacityConfig(profile="cpu", n=1, ctx=512, mmproj=True, threads=1, cache_ram_mib=0)
    spec = LaunchSpec(config=cfg, profile=HostProfile(name="cpu", memory_gib=2.0), log_dir=tmp_path,
                      command=(str(llama_server_bin),), model=tiny_model, mmproj=proj, boot_timeout_s=60, hold_s=0.2)
    handle = ServerHandle(spec, HostProbe(2048))
    try:
        mismatch = r"mismatch between text model \(n_embd = 256\) and mmproj \(n_embd = 128\)"
        with pytest.raises(ServerError, match=mismatch):
            handle.boot()
    finally:
        handle.stop()


def test_mmproj_config_runs_on_a_generated_model(capacity_run: CapacityRun) -> None:
    """``mmproj = true`` on a generated model: the plugin generates the projector, the server loads it,
    and the record and the prediction both account for it (nothing skips for want of a file)."""
    matrix = textwrap.dedent("""
        [profiles.cpu]
        device = "host"
        memory_gib = 2.0
        model = "generated:tiny"
        hold_s = 0.5
        [profiles.cpu.slo]
        headroom_gib = 0.5
        [profiles.cpu.defaults]
        threads = 1
        cache_ram_mib = 0
        [[profiles.cpu.configs]]
        n = 2
        ctx = 1024
        mmproj = true
        """)
    result = capacity_run.run(matrix, "--gpucap-report", "rep")
    result.assert_outcomes(passed=1)
    (record,) = records.read_jsonl(capacity_run.pytester.path / "rep" / "results.jsonl")
    assert record["config_id"] == "cpu-n2-ctx1k-mmproj-f16"
    argv = record["server"]["argv"]
    projector = Path(argv[argv.index("--mmproj") + 1])
    assert projector.is_file() and projector.name.startswith("gpucap-tiny-mmproj-")
    expected = ProjectorShape.for_model(ModelShape()).approx_bytes() / MIB
    assert record["memory"]["server_report"]["mmproj_model_mib"] == pytest.approx(expected, abs=0.01)
    assert record["memory"]["predicted"]["mmproj_mib"] == pytest.approx(expected, abs=0.01)
    predicted = capacity_run.run(matrix, "--gpucap-predict")
    assert "mmproj requested but its size is unknown" not in predicted.stdout.str()
    predicted.stdout.fnmatch_lines(["cpu-n2-ctx1k-mmproj-f16 *Comfortable*"])
