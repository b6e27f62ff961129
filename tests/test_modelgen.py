"""Generated GGUF models must be deterministic, cacheable and loadable by a real llama-server."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import httpx
import pytest

from conftest import own_server
from pytest_gpucap.backends.process import free_port
from pytest_gpucap import modelgen
from pytest_gpucap.modelgen import ModelShape, ensure_model, write_model

TINY = ModelShape(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=128, n_vocab=400, name="t")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def test_same_shape_gives_identical_bytes(tmp_path: Path) -> None:
    a = write_model(TINY, tmp_path / "a.gguf")
    b = write_model(TINY, tmp_path / "b.gguf")
    c = write_model(dataclasses.replace(TINY, seed=1), tmp_path / "c.gguf")
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_key_is_stable_and_sensitive_to_every_field() -> None:
    assert TINY.key() == dataclasses.replace(TINY).key()
    assert len(TINY.key()) == 12 and int(TINY.key(), 16) >= 0
    changed: dict[str, Any] = {"n_layer": 3, "n_embd": 128, "n_head": 2, "n_head_kv": 4, "n_ff": 64, "n_vocab": 500,
               "n_ctx_train": 4096, "head_dim": 32, "sliding_window": 64, "swa_every": 3,
               "weight_type": "f32", "seed": 5, "name": "other", "chat_template": "thinking"}
    assert set(changed) == {f.name for f in dataclasses.fields(ModelShape)}
    keys = {dataclasses.replace(TINY, **{k: v}).key() for k, v in changed.items()}
    assert len(keys | {TINY.key()}) == len(changed) + 1


def test_key_changes_with_generator_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = TINY.key()
    monkeypatch.setattr(modelgen, "GENERATOR_VERSION", modelgen.GENERATOR_VERSION + 1)
    assert TINY.key() != before


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_layer": 0}, "n_layer must be > 0"),
        ({"n_embd": -1}, "n_embd must be > 0"),
        ({"n_head": 4, "n_head_kv": 3}, "multiple of n_head_kv"),
        ({"n_head_kv": 8}, "multiple of n_head_kv"),
        ({"n_embd": 66}, "divisible by n_head"),
        ({"head_dim": 15}, "even"),
        ({"n_vocab": 200}, "n_vocab must be >= 261"),
        ({"weight_type": "q4_0"}, "weight_type"),
        ({"sliding_window": 64, "swa_every": 1}, "swa_every"),
        ({"seed": -1}, ">= 0"),
        ({"n_layer": 1000}, "n_layer must be <= 512"),
        ({"name": "a/b"}, "name"),
        ({"n_ff": 1.5}, "n_ff must be an integer"),
    ],
)
def test_validate_rejects_impossible_shapes(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes).validate()


def test_validate_allows_head_dim_16_and_default() -> None:
    ModelShape().validate()
    dataclasses.replace(TINY, head_dim=16).validate()


def test_from_mapping_accepts_fields_and_rejects_unknown_keys() -> None:
    shape = ModelShape.from_mapping({"n_layer": 3, "head_dim": 16, "name": "x"})
    assert (shape.n_layer, shape.head_dim, shape.name) == (3, 16, "x")
    with pytest.raises(ValueError, match=r"'n_layers'.*valid keys: n_layer, n_embd"):
        ModelShape.from_mapping({"n_layers": 3})
    with pytest.raises(ValueError, match="n_head_kv"):
        ModelShape.from_mapping({"n_head_kv": 3})


def test_approx_bytes_matches_tensor_data(tmp_path: Path) -> None:
    for shape in (TINY, dataclasses.replace(TINY, weight_type="f32", sliding_window=32)):
        reader = gguf.GGUFReader(write_model(shape, tmp_path / f"{shape.key()}.gguf"))
        assert sum(int(t.n_bytes) for t in reader.tensors) == shape.approx_bytes()


def test_written_metadata_reads_back(tmp_path: Path) -> None:
    shape = dataclasses.replace(TINY, n_layer=3, n_head=8, n_head_kv=2, head_dim=16)
    reader = gguf.GGUFReader(write_model(shape, tmp_path / "m.gguf"))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.name") == "t"
    assert _field(reader, "llama.block_count") == 3
    assert _field(reader, "llama.attention.head_count") == 8
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.attention.key_length") == 16
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "llama.vocab_size") == 400
    assert _field(reader, "llama.context_length") == shape.n_ctx_train
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert isinstance(tokens, list) and len(tokens) == 400 == len(set(tokens))
    assert tokens[_field(reader, "tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert "<|im_start|>" in tokens and "<0xFF>" in tokens
    assert "<|im_start|>" in str(_field(reader, "tokenizer.chat_template"))
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert list(q.shape) == [64, 8 * 16]


def test_sliding_window_uses_gemma2_pattern(tmp_path: Path) -> None:
    shape = dataclasses.replace(TINY, n_layer=4, sliding_window=128, swa_every=2)
    reader = gguf.GGUFReader(write_model(shape, tmp_path / "swa.gguf"))
    assert _field(reader, "general.architecture") == "gemma2"
    assert _field(reader, "gemma2.attention.sliding_window") == 128
    assert _field(reader, "gemma2.attention.sliding_window_pattern") == [True, False, True, False]


def test_ensure_model_caches(tmp_path: Path) -> None:
    first = ensure_model(TINY, tmp_path)
    assert first == tmp_path / f"t-{TINY.key()}.gguf"
    mtime = first.stat().st_mtime_ns
    time.sleep(0.01)
    assert ensure_model(TINY, tmp_path) == first
    assert first.stat().st_mtime_ns == mtime


def test_ensure_model_concurrent_processes(tmp_path: Path) -> None:
    with ProcessPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(ensure_model, [TINY] * 8, [tmp_path] * 8))
    assert len(set(paths)) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [paths[0].name]
    assert _sha(paths[0]) == _sha(write_model(TINY, tmp_path / "ref.gguf"))


def test_cli_writes_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    assert modelgen.main([str(out), "--layers", "1", "--embd", "64", "--vocab", "300", "--head-dim", "16"]) == 0
    assert str(out) in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert _field(reader, "llama.block_count") == 1
    assert _field(reader, "llama.attention.key_length") == 16
    with pytest.raises(SystemExit):
        modelgen.main([str(out), "--heads", "3"])


def _chat(base: str, max_tokens: int) -> dict[str, object]:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": max_tokens, "ignore_eos": True}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.content.decode("utf-8", "replace")
    data: dict[str, object] = r.json()
    return data


@pytest.mark.parametrize(
    "shape",
    [ModelShape(), dataclasses.replace(TINY, head_dim=16), dataclasses.replace(TINY, n_layer=4, sliding_window=64)],
    ids=["default", "head_dim16", "swa"],
)
def test_llama_server_serves_generated_model(shape: ModelShape, tmp_path: Path, llama_server_bin: Path) -> None:
    model = ensure_model(shape, tmp_path)
    log = tmp_path / "server.log"
    with own_server(llama_server_bin, model, log, "-c", "2048", "-np", "1", "-fit", "off", "-lv", "4") as (_, base):
        usage = _chat(base, 16)["usage"]
        assert isinstance(usage, dict) and usage["completion_tokens"] == 16
    text = log.read_text(errors="replace")
    assert ("llama_kv_cache_iswa" in text) == (shape.sliding_window > 0)


def test_llama_server_rejects_q8_kv_for_head_dim_16(tmp_path: Path, llama_server_bin: Path) -> None:
    """The server exits by itself at boot; it never listens, so a plain bounded run is enough."""
    model = ensure_model(dataclasses.replace(TINY, head_dim=16), tmp_path)
    done = subprocess.run([str(llama_server_bin), "-m", str(model), "--host", "127.0.0.1", "--port", str(free_port()),
                           "-c", "2048", "-np", "1", "-fit", "off", "-ctk", "q8_0", "-ctv", "q8_0"],
                          capture_output=True, text=True, errors="replace", timeout=60)
    assert done.returncode != 0
    assert "does not divide n_embd_head_k=16" in done.stdout + done.stderr
