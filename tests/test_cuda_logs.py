"""The memory parsers on real CUDA server output (no GPU here): every figure equals the one printed.

Fixtures under ``tests/fixtures/cuda/`` are log excerpts posted in public issue threads; each file's
header names the thread. The numbers asserted below are read off those lines.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_gpucap.backends.llamacpp import parse_memory_report
from pytest_gpucap.backends.vllm_log import parse_memory_log

FIXTURES = Path(__file__).parent / "fixtures" / "cuda"


def read(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.log")), ids=lambda p: p.name)
def test_every_fixture_names_its_source(path: Path) -> None:
    head = path.read_text().splitlines()[:3]
    assert head[0].startswith("# source: ") and "#" in head[0][len("# source: "):]
    assert head[1].startswith("# url: https://github.com/")


# ---------------------------------------------------------------- llama.cpp

def test_two_gpu_breakdown_keeps_the_last_table_per_device() -> None:
    rep = parse_memory_report(read("llamacpp_breakdown_2gpu.log"))
    assert rep.breakdown_tables == 2
    assert [r.device for r in rep.breakdown] == ["CUDA0 (RTX 5090)", "CUDA1 (RTX 3090)", "Host"]
    cuda0, cuda1, host = (rep.breakdown_row(d) for d in ("CUDA0", "CUDA1", "Host"))
    assert (cuda0.total_mib, cuda0.free_mib, cuda0.model_mib, cuda0.context_mib, cuda0.compute_mib,
            cuda0.unaccounted_mib) == (32606, 30991, 0, 0, 4205, -2590)
    # the second table, not the first (1177 + 15360 + 1292)
    assert (cuda1.total_mib, cuda1.free_mib, cuda1.model_mib, cuda1.context_mib, cuda1.compute_mib,
            cuda1.unaccounted_mib) == (24575, 23332, 1346, 18432, 1292, -19827)
    assert cuda1.self_mib == 21070
    assert (host.model_mib, host.context_mib, host.compute_mib, host.total_mib) == (1333, 18432, 2088, None)


def test_breakdown_unsigned_wraparound_reads_as_negative() -> None:
    rep = parse_memory_report(read("llamacpp_breakdown_1080ti.log"))
    row = rep.breakdown_row("CUDA0")
    assert row.device == "CUDA0 (GTX 1080 Ti)"
    assert (row.total_mib, row.free_mib, row.model_mib, row.context_mib, row.compute_mib) == (
        11165, 8702, 9814, 134, 51)
    assert row.self_mib == 9999  # printed 10001: the table rounds each column on its own
    # printed 17592186036877 = 2**44 - 7539: total - free - self(10001) = -7538, within rounding
    assert row.unaccounted_mib == -7539
    assert rep.breakdown_row("Host").model_mib == 166


def test_single_gpu_breakdown_from_a_server_log() -> None:
    rep = parse_memory_report(read("llamacpp_3090_load.log"))
    row = rep.breakdown_row("CUDA0")
    assert (row.model_mib, row.context_mib, row.compute_mib, row.self_mib) == (15364, 411, 170, 15945)
    assert (row.total_mib, row.free_mib, row.unaccounted_mib) == (24124, 23860, -15681)
    assert [r.device_id for r in rep.breakdown] == ["CUDA0", "Host"]


def test_model_buffers_over_eight_gpus() -> None:
    rep = parse_memory_report(read("llamacpp_8gpu_load.log"))
    devices = rep.per_device()
    assert {d: b.model_mib for d, b in devices.items() if b.model_mib} == {
        "CUDA2": 25338.47, "CUDA3": 22171.16, "CUDA4": 25338.47, "CUDA5": 25338.47, "CUDA6": 25338.47,
        "CUDA7": 19728.83}
    assert {d: b.kv_mib for d, b in devices.items() if b.kv_mib} == {
        "CUDA0": 5824.0, "CUDA1": 5824.0, "CUDA2": 5824.0, "CUDA3": 5096.0}
    assert devices["CUDA2"].total_mib == pytest.approx(25338.47 + 5824.0)


def test_kv_compute_and_output_per_device() -> None:
    rep = parse_memory_report(read("llamacpp_4080s_buffers.log"))
    devices = rep.per_device()
    assert devices["CUDA0"].kv_mib == 144.0 and devices["CUDA0"].compute_mib == 300.75
    assert devices["CUDA_Host"].output_mib == 0.58 and devices["CUDA_Host"].compute_mib == 12.01
    assert set(devices) == {"CUDA0", "CUDA_Host"}


def test_legacy_weight_lines_without_the_word_model() -> None:
    rep = parse_memory_report(read("llamacpp_2gpu_legacy.log"))
    assert rep.model_mib == {"CPU": 1640.62, "CUDA0": 5434.38, "CUDA1": 13989.53}
    assert rep.kv_buffer_mib == {"CUDA0": 1536.0, "CUDA1": 3584.0}
    assert rep.compute_mib == {"CUDA0": 672.01}
    assert rep.output_mib == {"CUDA_Host": 1.95}
    # "ggml ctx size" is not a buffer
    assert sum(rep.model_mib.values()) == pytest.approx(1640.62 + 5434.38 + 13989.53)


def test_mapped_host_weights_group_under_cpu() -> None:
    rep = parse_memory_report(read("llamacpp_ollama_mapped.log"))
    assert rep.model_mib == {"CUDA0": 577.22, "CPU": 520.30}


def test_iswa_kv_lines_and_the_cuda_kv_buffer() -> None:
    rep = parse_memory_report(read("llamacpp_dsv4_kv.log"))
    (line,) = rep.kv
    assert (line.size_mib, line.cells, line.layers, line.seqs, line.type_k) == (0.0, 64000, 0, 1, "bf16")
    assert rep.kv_buffer_mib == {"CUDA0": 182.75}
    assert rep.output_mib == {"CUDA_Host": 0.49}


# ---------------------------------------------------------------- vLLM

def test_vllm_v1_kv_pool_in_gib_tokens_and_concurrency() -> None:
    rep = parse_memory_log(read("vllm_v1_1gpu_kv.log"))
    assert rep.device == "GPU"
    assert rep.kv_cache_gib == 6.51 and rep.kv_sizing == "utilization"
    assert rep.kv_cache_tokens == 42656
    assert rep.max_model_len == 32768 and rep.max_concurrency == 1.30
    assert rep.kv_capacity_sequences() == pytest.approx(42656 / 32768)


def test_vllm_v1_tensor_parallel_weights_per_rank() -> None:
    rep = parse_memory_log(read("vllm_v1_tp2_load.log"))
    per = rep.per_device()
    assert set(per) == {"rank 0", "rank 1"}
    assert per["rank 0"].weights_gib == 11.4384 and per["rank 1"].weights_gib == 11.4384
    assert rep.weights_gib == 11.4384 and rep.weights_load_s == 5.338305


def test_vllm_v0_memory_profiling_per_worker() -> None:
    rep = parse_memory_log(read("vllm_v0_profile_workers.log"))
    per = rep.per_device()
    assert set(per) == {"pid 521", "pid 507", "pid 577"}
    w = per["pid 507"]
    assert (w.weights_gib, w.non_torch_gib, w.activation_peak_gib, w.kv_cache_gib) == (21.21, 0.20, 0.37, 1.57)
    assert (w.gpu_total_gib, w.gpu_memory_utilization, w.budget_gib) == (23.58, 0.99, 23.35)
    assert per["pid 521"].gpu_total_gib is None  # its budget line is not in the excerpt
    assert (rep.kv_cache_gib, rep.weights_gib, rep.gpu_total_gib, rep.non_torch_gib) == (1.57, 21.21, 23.58, 0.20)


def test_vllm_v0_profiling_results_line() -> None:
    rep = parse_memory_log(read("vllm_v0_profile_3090.log"))
    assert rep.weights_gib == 14.9888
    assert (rep.gpu_total_gib, rep.non_torch_gib, rep.kv_cache_gib, rep.gpu_memory_utilization) == (
        23.58, 0.35, 3.81, 0.90)
    assert rep.num_blocks == 1952
    assert rep.max_model_len == 20000 and rep.max_concurrency == 1.56
    assert rep.workers == ()
