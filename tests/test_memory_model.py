"""The memory model against the real llama-server: exact KV, weights, compute estimate, calibration.

Each case boots llama-server once (module-scoped, ~0.3 s each) and compares what the model predicts
before boot with what the server prints: the ``llama_kv_cache: size = … MiB`` lines must agree to
the printed hundredth (0 MiB difference), K and V parts included.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from conftest import assert_weights_in_model_buffers
from pytest_gpucap import prediction as mm
from pytest_gpucap.matrix import CACHE_TYPES, CapacityConfig, HostProfile, SLO, load_matrix
from pytest_gpucap.terminal import fit_table
from pytest_gpucap.probes import HostProbe
from pytest_gpucap.modelgen import ModelShape, ensure_model
from pytest_gpucap.ceiling import ceiling_record
from pytest_gpucap.record_calibration import calibrate_from, sample
from pytest_gpucap.backends import LaunchSpec, ServerHandle, llamacpp

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[1]

GQA = ModelShape()  # 2 layers, 4 heads, 2 KV heads, head 64
MHA = ModelShape(n_head_kv=4, name="gpucap-mha")
MQA = ModelShape(n_layer=3, n_head_kv=1, name="gpucap-mqa")
HEAD128 = ModelShape(n_embd=512, n_head=4, n_head_kv=1, head_dim=128, n_vocab=2048, name="gpucap-h128")
HEAD96 = ModelShape(n_embd=192, n_head=6, n_head_kv=3, head_dim=96, name="gpucap-h96")
SWA = ModelShape(sliding_window=256, name="gpucap-swa")  # gemma2: layer 0 SWA, layer 1 full
SWA5 = ModelShape(n_layer=5, sliding_window=100, swa_every=3, name="gpucap-swa5")  # 4 SWA + 1 full

# (shape, cache type, N, ctx per slot, flash attention): 7 shapes x all 9 cache types, odd contexts
CASES = [
    (GQA, "f16", 3, 1000, "on"),  # 3000 -> padded 3072 -> 1024 cells per slot
    (GQA, "q4_1", 2, 1024, "on"),
    (MHA, "q8_0", 2, 2048, "on"),
    (MHA, "f16", 2, 5000, "off"),  # 5120 cells, V transposed
    (MQA, "f32", 1, 512, "off"),
    (MQA, "q5_0", 3, 512, "on"),
    (HEAD128, "q4_0", 4, 700, "on"),  # 768 cells
    (HEAD128, "q5_1", 1, 4000, "on"),
    (HEAD96, "bf16", 5, 300, "auto"),  # 512 cells
    (HEAD96, "iq4_nl", 2, 777, "on"),
    (SWA, "f16", 3, 1000, "on"),  # SWA cache: pad256(min(1024, 256 + 512)) = 768 cells
    (SWA, "q8_0", 2, 4096, "on"),
    (SWA5, "f16", 1, 4000, "off"),
]


@dataclass
class Booted:
    cfg: CapacityConfig
    shape: ModelShape
    facts: mm.ModelFacts
    pred: mm.Prediction
    predict_s: float
    report: llamacpp.ServerMemoryReport
    record: dict[str, Any]


_VERIFY = llamacpp.verify_running


def _verify_padded(cfg: CapacityConfig, props: Any, slots: Any) -> list[str]:
    """llama.cpp rounds each slot's context up to 256; check the server against the predicted slot ctx."""
    return _VERIFY(replace(cfg, ctx=mm.slot_ctx(cfg)), props, slots)


@pytest.fixture(scope="module")
def booted(llama_server_bin: Path, model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Booted]:
    log_dir = tmp_path_factory.mktemp("mm-logs")
    profile = HostProfile(name="cpu", memory_gib=2.0)
    out = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llamacpp, "verify_running", _verify_padded)
        for shape, cache, n, ctx, fa in CASES:
            cfg = CapacityConfig(profile="cpu", n=n, ctx=ctx, cache_type_k=cache, cache_type_v=cache,
                                 flash_attn=fa, threads=1, cache_ram_mib=0, name=f"{shape.name}-n{n}-c{ctx}-{cache}")
            model = ensure_model(shape, model_cache)
            t0 = time.perf_counter()
            facts = mm.read_model_facts(model)
            pred = mm.predict(cfg, facts, profile=profile)
            predict_s = time.perf_counter() - t0
            spec = LaunchSpec(config=cfg, profile=profile, log_dir=log_dir, command=(str(llama_server_bin),), model=model,
                              boot_timeout_s=60, hold_s=0.2)
            handle = ServerHandle(spec, HostProbe(2048))
            try:
                handle.boot()
                handle.hold()
                record, _ = ceiling_record(handle, cfg.id)
            finally:
                handle.stop()
            out.append(Booted(cfg, shape, facts, pred, predict_s, handle.report, record))
    return out


def test_model_facts_from_generated_gguf(model_cache: Path) -> None:
    facts = mm.read_model_facts(ensure_model(SWA5, model_cache))
    assert (facts.architecture, facts.n_layer, facts.n_embd, facts.n_vocab) == ("gemma2", 5, 256, 1024)
    assert facts.n_head == (4,) * 5 and facts.n_head_kv == (2,) * 5
    assert (facts.head_dim_k, facts.head_dim_v, facts.sliding_window) == (64, 64, 100)
    assert facts.swa_layers == tuple(SWA5.swa_layers()) == (True, True, False, True, True)
    assert all(facts.kv_layers) and facts.tied_output and facts.kv_supported
    assert facts.tensor_bytes == SWA5.approx_bytes() < facts.file_bytes
    assert facts == replace(mm.facts_from_shape(SWA5), path=facts.path, file_bytes=facts.file_bytes)
    h = mm.read_model_facts(ensure_model(HEAD128, model_cache))
    assert (h.architecture, h.head_dim_k, h.n_head_kv, h.swa_any, h.tied_output) == ("llama", 128, (1, 1), False, False)
    assert mm.kv_bytes_per_token(h, "f16") == {"full": 2 * 2 * 128 * 2, "swa": 0}
    assert mm.kv_bytes_per_token(h, "q8_0") == {"full": 2 * 2 * 4 * 34, "swa": 0}


def test_kv_prediction_equals_server_report_exactly(booted: list[Booted]) -> None:
    """0 MiB difference: every KV line (size, K, V, cells, layers, seqs) as the server prints it."""
    rows = []
    for b in booted:
        server = [(f"{k.size_mib:.2f}", f"{k.k_mib:.2f}", f"{k.v_mib:.2f}", k.cells, k.layers, k.seqs, k.type_k)
                  for k in b.report.kv]
        predicted = [(*c.printed, c.cells, c.layers, c.seqs, c.type_k) for c in b.pred.kv_caches]
        rows.append(f"{b.cfg.id:<32} predicted {' + '.join(p[0] for p in predicted):>13} MiB   "
                    f"server {' + '.join(s[0] for s in server):>13} MiB")
        assert predicted == server, b.cfg.id
        assert b.report.n_ctx_slot == b.pred.slot_ctx
        # the KV buffer (bytes, incl. both caches) agrees too
        assert b.report.kv_buffer_mib["CPU"] == pytest.approx(sum(c.bytes for c in b.pred.kv_caches) / MIB, abs=0.01)
    print("\nKV agreement (predicted vs llama-server):\n" + "\n".join(rows))
    shapes = {b.shape.name for b in booted}
    caches = {b.cfg.cache_type_k for b in booted}
    assert len(shapes) >= 6 and caches == set(CACHE_TYPES) and any(b.shape.sliding_window for b in booted)


def test_weights_match_model_buffer(booted: list[Booted]) -> None:
    for b in booted:
        assert_weights_in_model_buffers(b.report.model_mib, b.pred.weights_mib)


def test_compute_estimate_and_prediction_error(booted: list[Booted]) -> None:
    """The compute estimate is within 25% of the server's; every config reports its prediction error."""
    lines = []
    for b in booted:
        err = mm.prediction_error(b.pred, sample(b.record))
        assert err["kv"]["exact"] and err["kv"]["diff_mib"] == 0
        server_compute = err["compute"]["server_mib"]
        assert err["compute"]["predicted_mib"] == pytest.approx(server_compute, rel=0.25), b.cfg.id
        t = err["total"]
        # repacked weight copies (AMX / CPU_REPACK buffers on CPUs that have them) are not predicted
        # without a calibration (the next test covers them): leave them out of the measured figure here
        repacked = sum(v for k, v in b.report.model_mib.items() if k != "CPU")
        measured = t["measured_mib"] - repacked
        error = 100 * (t["predicted_mib"] - measured) / measured
        lines.append(f"{b.cfg.id:<32} predicted {t['predicted_mib']:7.1f}  server {t['server_mib']:7.1f}  "
                     f"measured {t['measured_mib']:7.1f} MiB (repacked {repacked:.1f})  error {error:+6.1f}%  "
                     f"(compute est {err['compute']['predicted_mib']:.2f} vs {server_compute:.2f})")
    print("\nprediction error (uncalibrated; measured = server RSS):\n" + "\n".join(lines))
    assert max(abs(float(line.split("error")[1].split("%")[0])) for line in lines) < 15


def test_calibration_learns_and_round_trips(booted: list[Booted], tmp_path: Path) -> None:
    records = [b.record for b in booted]
    cal = calibrate_from(records)
    pc = cal.for_profile("cpu")
    assert pc is not None and pc.n_records == len(booted)
    assert 0.7 < pc.compute_scale < 1.3
    assert 0.0 <= pc.compute_fraction <= 1.5 and 5 < pc.overhead_mib < 60
    path = tmp_path / "calibration.json"
    mm.save_calibration(cal, path)
    assert mm.load_calibration(path) == cal
    assert mm.load_calibration(tmp_path / "missing.json") == mm.Calibration()
    errors = []
    for b in booted:
        pred = mm.predict(b.cfg, b.facts, calibration=cal, profile=HostProfile(name="cpu", memory_gib=2.0))
        assert pred.calibrated and pred.compute_source == "calibrated"
        errors.append(abs(mm.prediction_error(pred, sample(b.record))["total"]["error_pct"]))
    print(f"\ncalibrated total error: max {max(errors):.1f}%, mean {sum(errors) / len(errors):.1f}% ({pc})")
    assert max(errors) < 10


def test_predict_headroom_verdict_and_skip_reason() -> None:
    facts = mm.facts_from_shape(MHA)
    profile = HostProfile(name="cpu", memory_gib=0.25, slo=SLO(headroom_gib=0.05))
    small = mm.predict(CapacityConfig(profile="cpu", n=1, ctx=1024), facts, profile=profile)
    assert small.fits and small.verdict == "Comfortable" and small.skip_reason() is None
    big = mm.predict(CapacityConfig(profile="cpu", n=8, ctx=32768), facts, profile=profile)
    assert not big.fits and big.verdict == "No fit" and "predicted not to fit" in big.skip_reason()
    shared = mm.predict(CapacityConfig(profile="cpu", n=1, ctx=1024), facts, profile=profile, baseline_used_mib=250)
    assert shared.free_mib == pytest.approx(small.free_mib - 250)
    head16 = mm.facts_from_shape(ModelShape(name="h16", n_embd=64, n_head=4, n_head_kv=2))
    q8 = mm.predict(CapacityConfig(profile="cpu", n=1, ctx=512, cache_type_k="q8_0", cache_type_v="q8_0"), head16,
                    profile=profile)
    # a config the server refuses is not skipped: booting it fails the case with the server's words
    assert not q8.fits and q8.skip_reason() is None
    assert any("does not divide n_embd_head_k=16" in p for p in q8.problems)
    off = mm.predict(CapacityConfig(profile="cpu", n=1, ctx=512, cache_type_v="q4_0", flash_attn="off"), facts)
    assert any("requires flash attention" in p for p in off.problems)
    d = big.as_dict()
    assert d["verdict"] == "No fit" and d["kv_lines"][0]["cells"] == 32768


def test_layout_follows_llama_cpp_padding() -> None:
    lay = mm.kv_layout(CapacityConfig(profile="cpu", n=3, ctx=1000))
    assert (lay.n_ctx, lay.n_ctx_seq, lay.n_stream, lay.n_ubatch) == (3072, 1024, 3, 512)
    small = mm.kv_layout(CapacityConfig(profile="cpu", n=1, ctx=300))
    assert (small.n_ctx_seq, small.n_batch, small.n_ubatch) == (512, 300, 300)
    uni = mm.kv_layout(CapacityConfig(profile="cpu", n=4, ctx=1000, extra_args=("--kv-unified", "-ub", "128")))
    assert (uni.unified, uni.n_ctx_seq, uni.n_stream, uni.n_ubatch) == (True, 4096, 1, 128)
    swa = mm.facts_from_shape(SWA)
    full, win = mm.predict_kv(CapacityConfig(profile="cpu", n=2, ctx=8192), swa)
    assert (full.cells, win.cells, win.layers) == (8192, 768, 1)
    full_swa = mm.predict_kv(CapacityConfig(profile="cpu", n=2, ctx=8192, extra_args=("--swa-full",)), swa)
    assert full_swa[1].cells == 8192
    assert mm.printed_mib(1_179_648) == "1.12"  # 1.125 exactly: printf rounds half to even


def test_fit_table_is_fast_and_boots_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--gpucap-predict`` material: the shipped matrix, predicted without starting any process."""
    from pytest_gpucap.backends import process

    def no_boot(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the fit table must not start a server")

    monkeypatch.setattr(process.ManagedProcess, "start", no_boot)
    monkeypatch.setattr(ServerHandle, "boot", no_boot)
    matrix = load_matrix(ROOT / "capacity_tests" / "gpucap.toml")
    t0 = time.perf_counter()
    own, missing = mm.predict_matrix(matrix)  # profiles whose model is a generated one
    # the GPU profiles name no model (it is passed with --gpucap-model): stand in a generated one
    preds, none_missing = mm.predict_matrix(matrix, model="generated:tiny")
    table = fit_table(preds)
    per_config = (time.perf_counter() - t0) / (len(own) + len(preds))
    print(f"\n{table}\n{len(preds)} configs, {per_config * 1000:.2f} ms per config; "
          f"without --gpucap-model: {len(own)} predicted, {len(missing)} need a model")
    assert per_config < 0.1
    llama = [c for c in matrix.configs if c.backend == "llamacpp"]  # vLLM configs are not predicted
    assert all("backend vllm is not predicted" in m for m in none_missing)
    assert len(preds) == len(llama) and len(none_missing) == len(matrix.configs) - len(llama)
    assert len(own) + len(missing) == len(matrix.configs)
    assert all("--gpucap-model" in m or "backend vllm" in m for m in missing)
    # 4090 rows load a projector: with a generated model the plugin generates one, so its size is known
    assert len(table.splitlines()) == len(preds) + 4 and "+?" not in table
    for p in preds:
        assert p.config_id in table and p.verdict in ("Comfortable", "Marginal", "Risky", "No fit")


def _header_only(path: Path, arch: str, n_layer: int, **kv: Any) -> Path:
    """A GGUF with the metadata of ``arch`` and one tensor: enough for read_model_facts."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n_layer)
    w.add_embedding_length(256)
    w.add_context_length(8192)
    for key, value in kv.items():
        full = f"{arch}.{key}"
        if isinstance(value, list):
            w.add_array(full, value)
        else:
            w.add_uint32(full, value)
    w.add_tensor("token_embd.weight", np.zeros((16, 256), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sliding_window_and_shared_kv_rules_per_architecture(tmp_path: Path) -> None:
    """Which layers are SWA / own KV, as llama.cpp's load_arch_hparams decides (header-only GGUFs)."""
    heads = {"attention.head_count": 4, "attention.head_count_kv": 2}
    g3 = mm.read_model_facts(_header_only(tmp_path / "g3.gguf", "gemma3", 12, **heads,
                                          **{"attention.sliding_window": 512}))
    assert g3.swa_layers == tuple(il % 6 < 5 for il in range(12)) and g3.sliding_window == 512
    g3_full = mm.read_model_facts(_header_only(tmp_path / "g3f.gguf", "gemma3", 4, **heads))
    assert not g3_full.swa_any  # gemma3 without a window key: no SWA
    g2 = mm.read_model_facts(_header_only(tmp_path / "g2.gguf", "gemma2", 4, **heads))
    assert g2.swa_layers == (True, False, True, False) and g2.sliding_window == 4096  # gemma2 default
    co = mm.read_model_facts(_header_only(tmp_path / "co.gguf", "cohere2", 8, **heads,
                                          **{"attention.sliding_window": 4096, "attention.sliding_window_pattern": 4}))
    assert co.swa_layers == tuple(il % 4 < 3 for il in range(8))
    g4 = mm.read_model_facts(_header_only(
        tmp_path / "g4.gguf", "gemma4", 6, **heads, **{
            "attention.sliding_window": 1024, "attention.sliding_window_pattern": [True, True, False] * 2,
            "attention.shared_kv_layers": 2, "attention.key_length": 512, "attention.key_length_swa": 256,
            "attention.value_length": 512, "attention.value_length_swa": 256}))
    assert g4.swa_layers == (True, True, False) * 2 and g4.kv_layers == (True,) * 4 + (False,) * 2
    assert (g4.kv_width_k(0), g4.kv_width_k(2)) == (2 * 256, 2 * 512)
    full, swa = mm.predict_kv(CapacityConfig(profile="cpu", n=2, ctx=4096), g4)
    assert (full.layers, swa.layers, swa.cells) == (1, 3, 1536)  # layers 4, 5 read layers 2, 3's KV
    assert full.k_bytes == 2 * 512 * 2 * 4096 * 2 and swa.k_bytes == 3 * 2 * 256 * 2 * 1536 * 2
    per_layer = mm.read_model_facts(_header_only(tmp_path / "pl.gguf", "llama", 3, **{
        "attention.head_count": [8, 8, 8], "attention.head_count_kv": [2, 0, 4]}))
    assert per_layer.n_head_kv == (2, 0, 4) and per_layer.head_dim_k == 32
    assert mm.kv_bytes_per_token(per_layer, "f32")["full"] == (2 * 32 + 4 * 32) * 4 * 2
    unknown = mm.read_model_facts(_header_only(tmp_path / "x.gguf", "mystery", 2, **heads,
                                               **{"attention.sliding_window": 128}))
    assert not unknown.swa_any and not unknown.kv_supported and "not modelled" in unknown.notes[0]


def test_decode_roofline() -> None:
    facts = mm.facts_from_shape(MHA)
    cfg = CapacityConfig(profile="cpu", n=4, ctx=8192)
    pred = mm.predict(cfg, facts)
    full = mm.decode_roofline_tps(pred, cfg, bandwidth_gbps=100.0)
    used = mm.decode_roofline_tps(pred, cfg, bandwidth_gbps=100.0, context_used_tokens=300)
    step = mm.decode_step_bytes(pred)
    per_slot_kv = 8192 * mm.kv_bytes_per_token(facts)["full"]
    weights = facts.tensor_bytes - facts.token_embd_bytes  # llama: untied output, embedding is a row lookup
    assert step["kv"] == 4 * per_slot_kv and step["weights"] == weights and step["scores"] == 0
    assert full == pytest.approx(4 * 100e9 / (weights + 4 * per_slot_kv))
    assert used > full  # reading 512 used cells instead of 8192 allocated ones
    assert mm.decode_roofline_tps(facts, cfg, 100.0) == pytest.approx(full)
    # more slots share the weight read: the aggregate ceiling grows with N
    one = mm.decode_roofline_tps(mm.predict(replace(cfg, n=1), facts), replace(cfg, n=1), 100.0, 300)
    assert used > one
    assert mm.efficiency(full / 2, full) == pytest.approx(0.5)
    assert mm.efficiency(None, full) is None and mm.efficiency(1.0, math.inf) is None
    assert mm.bandwidth_for("NVIDIA GeForce RTX 4090") == 1008.0 and mm.bandwidth_for("cpu") is None
