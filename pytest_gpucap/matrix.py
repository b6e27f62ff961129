"""Capacity configurations and host profiles, and the matrix file that declares them (the SLO and
workload budgets they carry are in ``budgets``).

Everything here is a frozen dataclass so a configuration can key a session-scoped fixture and be
written into a result record unchanged. Validation errors are ``MatrixError`` with one line naming
the file, the entry and the fix; the plugin turns them into ``pytest.UsageError``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .budgets import (  # re-exported: the budgets are read as matrix.SLO, matrix.Workload, ...
    COMFORTABLE_FACTOR, HEADROOM_CLASSES, SLO, Burst, Preflight, WatchdogLimits, Workload,
)
from .hostspec import CotenantSpec, ServiceSpec, cotenants_from, services_from
from .load_keys import BUILTIN_WORKFLOWS, ROLE_IMAGE_KEYS, burst_from_mapping, check_role_images

if TYPE_CHECKING:
    from .search_space import SearchDecl

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
BACKENDS = ("llamacpp", "vllm", "external")
DEVICES = ("cuda", "host")
FLASH_ATTN = ("on", "off", "auto")
GENERATED_PREFIX = "generated:"


class MatrixError(ValueError):
    """A matrix file or marker declares something invalid; the message is one line."""


@dataclass(frozen=True)
class HostProfile:
    """A kind of host the suite targets: its memory, floors and SLO defaults.

    ``device = "host"`` makes host memory stand in for device memory, with ``memory_gib`` as the
    budget; on ``cuda`` a ``memory_gib`` smaller than the card caps it, so a larger GPU can stand
    in for a smaller one.
    """

    name: str
    device: str = "host"
    memory_gib: float = 8.0
    gpu_index: int = 0
    model: str | None = None
    mmproj: str | None = None
    boot_timeout_s: float = 120.0
    hold_s: float = 2.0
    bandwidth_gbps: float | None = None  # memory bandwidth for the decode roofline (GPU: looked up by name)
    exclusive: bool = True  # one server at a time on this profile's device, across xdist workers
    preflight: Preflight = Preflight()
    watchdog: WatchdogLimits = WatchdogLimits()
    slo: SLO = SLO()
    workload: Workload = Workload()
    burst: Burst = Burst()  # the burst ceiling after the hold ([profiles.NAME.burst])
    services: tuple[ServiceSpec, ...] = ()  # stopped before the first boot, restored at the end (hostspec)
    cotenants: tuple[CotenantSpec, ...] = ()  # run beside every config (hostspec)

    @property
    def device_key(self) -> str:
        """The device a config of this profile occupies: ``host`` or ``gpu<index>``."""
        return "host" if self.device == "host" else f"gpu{self.gpu_index}"


@dataclass(frozen=True)
class CapacityConfig:
    """One capacity configuration: one test case, one server boot."""

    profile: str
    n: int
    ctx: int
    backend: str = "llamacpp"
    mmproj: bool = False
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: str = "auto"
    threads: int | None = None
    gpu_layers: int | None = None
    cache_ram_mib: int | None = None
    batch_size: int | None = None
    model: str | None = None
    endpoint: str | None = None
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    name: str | None = None
    ramp: bool = False  # run the agent-connection ramp on this config
    workflows: tuple[str, ...] = ()  # Phase-2 workflows run on this config (empty: the suite's A and B)
    chat_template_kwargs: str | None = None  # JSON object: llama-server --chat-template-kwargs, vLLM's default
    # vLLM knobs (backend = "vllm"): N -> --max-num-seqs, ctx -> --max-model-len
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool | None = None
    tensor_parallel_size: int | None = None
    dtype: str | None = None
    quantization: str | None = None
    served_model_name: str | None = None
    enforce_eager: bool | None = None
    api_key_env: str | None = None  # name of the environment variable holding the API key
    gpus: tuple[int, ...] = ()  # the cards the server is pinned to (empty: the profile's gpu_index on cuda)

    @property
    def total_ctx(self) -> int:
        return self.n * self.ctx

    @property
    def id(self) -> str:
        """Stable, readable test id such as ``4090-n3-ctx64k-mmproj-q8``."""
        if self.name:
            return self.name
        parts = [self.profile]
        if self.backend != "llamacpp":
            parts.append(self.backend)
        parts += [f"n{self.n}", f"ctx{_short_ctx(self.ctx)}"]
        if self.mmproj:
            parts.append("mmproj")
        if self.backend == "vllm" and self.enable_prefix_caching is False:
            parts.append("nopc")  # otherwise a caching-on/off pair would share one id
        if self.backend != "vllm":  # vLLM's KV dtype follows the model (or --kv-cache-dtype in extra_args)
            k, v = _short_cache(self.cache_type_k), _short_cache(self.cache_type_v)
            parts.append(k if k == v else f"{k}-{v}")
        if self.gpus:
            parts.append("gpu" + "+".join(map(str, self.gpus)))
        return "-".join(parts)


def _short_ctx(ctx: int) -> str:
    return f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx)


def _short_cache(cache_type: str) -> str:
    return cache_type.removesuffix("_0")


@dataclass(frozen=True)
class Matrix:
    """What a matrix file declares."""

    path: Path | None
    profiles: Mapping[str, HostProfile]
    configs: tuple[CapacityConfig, ...]
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    roles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    workflows: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    searches: Mapping[str, SearchDecl] = field(default_factory=dict)  # [profiles.NAME.search], by profile

    def profile(self, name: str) -> HostProfile:
        return self.profiles[name]


# ---------------------------------------------------------------- validation helpers

_CONFIG_KEYS = {f.name for f in fields(CapacityConfig)} - {"profile", "cache_type_k", "cache_type_v"}
_CONFIG_KEYS |= {"cache_type", "cache_type_k", "cache_type_v"}
_PROFILE_KEYS = {f.name for f in fields(HostProfile)} - {"name"} | {"defaults", "configs", "search"}


def _fail(where: str, message: str) -> MatrixError:
    return MatrixError(f"{where}: {message}")


def _check_keys(data: Mapping[str, Any], valid: set[str], where: str) -> None:
    for key in data:
        if key not in valid:
            raise _fail(where, f"unknown key {key!r} (valid keys: {', '.join(sorted(valid))})")


def _positive_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(where, f"{key} must be a positive integer, got {value!r} (write e.g. {key} = 4096)")
    return value


def _number(value: Any, key: str, where: str, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise _fail(where, f"{key} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _choice(value: Any, key: str, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise _fail(where, f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _section(cls: type, data: Any, where: str) -> Any:
    """Build a small all-float dataclass (Preflight, WatchdogLimits, SLO) from a table."""
    if not isinstance(data, Mapping):
        raise _fail(where, f"must be a table, got {data!r}")
    valid = {f.name for f in fields(cls)}
    _check_keys(data, valid, where)
    return cls(**{k: _number(v, k, where) for k, v in data.items()})


def config_from_mapping(profile: str, data: Mapping[str, Any], where: str) -> CapacityConfig:
    """Validate one configuration entry (matrix table or marker kwargs)."""
    _check_keys(data, _CONFIG_KEYS, where)
    if "n" not in data or "ctx" not in data:
        raise _fail(where, "needs n (parallel slots) and ctx (context per slot), e.g. n = 2, ctx = 4096")
    kw: dict[str, Any] = {"profile": profile}
    kw["n"] = _positive_int(data["n"], "n", where)
    kw["ctx"] = _positive_int(data["ctx"], "ctx", where)
    kw["backend"] = _choice(data.get("backend", "llamacpp"), "backend", BACKENDS, where)
    cache = data.get("cache_type", "f16")
    kw["cache_type_k"] = _choice(data.get("cache_type_k", cache), "cache_type", CACHE_TYPES, where)
    kw["cache_type_v"] = _choice(data.get("cache_type_v", cache), "cache_type", CACHE_TYPES, where)
    fa = data.get("flash_attn", "auto")
    if isinstance(fa, bool):
        fa = "on" if fa else "off"
    kw["flash_attn"] = _choice(fa, "flash_attn", FLASH_ATTN, where)
    for key in ("mmproj", "ramp"):
        flag = data.get(key, False)
        if not isinstance(flag, bool):
            raise _fail(where, f"{key} must be true or false, got {flag!r}")
        kw[key] = flag
    for key in ("threads", "gpu_layers", "cache_ram_mib", "batch_size"):
        if key in data:
            value = data[key]
            if key in ("gpu_layers", "cache_ram_mib") and value == 0:
                kw[key] = 0
            else:
                kw[key] = _positive_int(value, key, where)
    for key in ("model", "endpoint", "name"):
        if key in data:
            if not isinstance(data[key], str) or not data[key]:
                raise _fail(where, f"{key} must be a non-empty string")
            kw[key] = data[key]
    args = data.get("extra_args", ())
    if isinstance(args, str) or not all(isinstance(a, str) for a in args):
        raise _fail(where, 'extra_args must be a list of strings, e.g. extra_args = ["--no-mmap"]')
    kw["extra_args"] = tuple(args)
    env = data.get("env", {})
    if not isinstance(env, Mapping) or not all(isinstance(v, str) for v in env.values()):
        raise _fail(where, 'env must be a table of strings, e.g. env = { GGML_CUDA_NO_PINNED = "1" }')
    kw["env"] = tuple(sorted(env.items()))
    if "gpus" in data:
        kw["gpus"] = _gpus(data["gpus"], where)
    if "workflows" in data:
        wf = data["workflows"]
        if isinstance(wf, str) or not isinstance(wf, (list, tuple)) or not all(isinstance(w, str) and w for w in wf):
            raise _fail(where, f'workflows must be a list of workflow names, got {wf!r} (write e.g. workflows = ["A"])')
        kw["workflows"] = tuple(wf)
    if "chat_template_kwargs" in data:
        if not isinstance(data["chat_template_kwargs"], Mapping):
            raise _fail(where, "chat_template_kwargs must be a table, e.g. "
                               "chat_template_kwargs = { enable_thinking = true }")
        kw["chat_template_kwargs"] = json.dumps(dict(data["chat_template_kwargs"]), sort_keys=True,
                                                separators=(",", ":"))
    if kw["backend"] == "external" and data.get("mmproj"):
        raise _fail(where, "the external backend cannot load an mmproj; drop mmproj")
    vllm_keys = [k for k in _VLLM_KEYS if k in data]
    if vllm_keys and kw["backend"] != "vllm":
        raise _fail(where, f"{', '.join(vllm_keys)} apply to backend = \"vllm\" only")
    if kw["backend"] == "vllm":
        if "cache_type" in data or "cache_type_k" in data or "cache_type_v" in data:
            raise _fail(where, 'vLLM picks its KV dtype from the model: drop cache_type '
                               '(or pass extra_args = ["--kv-cache-dtype", "fp8"])')
        for key in ("gpu_memory_utilization",):
            if key in data:
                value = _number(data[key], key, where)
                if not 0 < value <= 1:
                    raise _fail(where, f"{key} must be in (0, 1], got {value!r}")
                kw[key] = value
        for key in ("kv_cache_memory_bytes", "max_num_batched_tokens", "tensor_parallel_size"):
            if key in data:
                kw[key] = _positive_int(data[key], key, where)
        tp, gpus = kw.get("tensor_parallel_size"), kw.get("gpus", ())
        if tp is not None and gpus and tp != len(gpus):
            raise _fail(where, f"tensor_parallel_size = {tp} but gpus lists {len(gpus)} card(s): drop "
                               "tensor_parallel_size (it follows gpus)")
        for key in ("enable_prefix_caching", "enforce_eager"):
            if key in data:
                if not isinstance(data[key], bool):
                    raise _fail(where, f"{key} must be true or false")
                kw[key] = data[key]
        for key in ("dtype", "quantization", "served_model_name", "api_key_env"):
            if key in data:
                if not isinstance(data[key], str) or not data[key]:
                    raise _fail(where, f"{key} must be a non-empty string")
                kw[key] = data[key]
    return CapacityConfig(**kw)


def _gpus(value: Any, where: str) -> tuple[int, ...]:
    """``gpus = [0]`` or ``[0, 1]``: distinct card indices (as the caller's CUDA_VISIBLE_DEVICES numbers them)."""
    if (isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in value)
            or len(set(value)) != len(value)):
        raise _fail(where, f"gpus must be a non-empty list of distinct card indices, got {value!r} "
                           "(write e.g. gpus = [0] or gpus = [0, 1])")
    return tuple(value)


#: llama.cpp-only keys: profile defaults do not pass them to vLLM entries (where they mean nothing).
_LLAMACPP_KEYS = ("cache_type", "cache_type_k", "cache_type_v", "flash_attn", "threads", "gpu_layers",
                  "cache_ram_mib", "batch_size")


def merge_defaults(defaults: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """Profile defaults under an entry (matrix or marker), where they mean something: llama.cpp knobs
    are not inherited by vLLM entries, nor vLLM knobs by llama.cpp entries."""
    backend = entry.get("backend", defaults.get("backend", "llamacpp"))
    foreign = _LLAMACPP_KEYS if backend == "vllm" else _VLLM_KEYS
    return {**{k: v for k, v in defaults.items() if k not in foreign}, **entry}


_VLLM_KEYS = ("gpu_memory_utilization", "kv_cache_memory_bytes", "max_num_batched_tokens", "enable_prefix_caching",
              "tensor_parallel_size", "dtype", "quantization", "served_model_name", "enforce_eager", "api_key_env")


def profile_from_mapping(name: str, data: Mapping[str, Any], where: str) -> HostProfile:
    """Validate one ``[profiles.NAME]`` table (without its configs)."""
    _check_keys(data, _PROFILE_KEYS, where)
    kw: dict[str, Any] = {"name": name}
    if "device" in data:
        kw["device"] = _choice(data["device"], "device", DEVICES, where)
    for key in ("memory_gib", "boot_timeout_s", "hold_s", "bandwidth_gbps"):
        if key in data:
            kw[key] = _number(data[key], key, where, minimum=0.0)
    if "workload" in data and not isinstance(data["workload"], Mapping):
        raise _fail(where, "workload must be a table")
    if "gpu_index" in data:
        kw["gpu_index"] = int(_number(data["gpu_index"], "gpu_index", where))
    if "exclusive" in data:
        if not isinstance(data["exclusive"], bool):
            raise _fail(where, f"exclusive must be true or false, got {data['exclusive']!r}")
        kw["exclusive"] = data["exclusive"]
    for key in ("model", "mmproj"):
        if key in data:
            if not isinstance(data[key], str) or not data[key]:
                raise _fail(where, f"{key} must be a path or 'generated:NAME'")
            kw[key] = data[key]
    kw["preflight"] = _section(Preflight, data.get("preflight", {}), f"{where}.preflight")
    kw["watchdog"] = _section(WatchdogLimits, data.get("watchdog", {}), f"{where}.watchdog")
    if kw["watchdog"].interval_s <= 0:
        raise _fail(f"{where}.watchdog", "interval_s must be > 0 (seconds between memory samples)")
    kw["slo"] = slo_from_mapping(data.get("slo", {}), f"{where}.slo")
    kw["workload"] = _workload(data.get("workload", {}), f"{where}.workload")
    try:  # issue 11: the host routine's services and co-tenants; issue 12: the burst ceiling
        kw["burst"] = burst_from_mapping(data.get("burst", {}), f"{where}.burst")
        kw["services"] = services_from(data.get("services", []), f"{where}.services")
        kw["cotenants"] = cotenants_from(data.get("cotenants", []), f"{where}.cotenants")
    except ValueError as exc:
        raise MatrixError(str(exc)) from None
    return HostProfile(**kw)


def slo_from_mapping(data: Any, where: str, base: SLO = SLO()) -> SLO:
    """Validate SLO budgets (matrix ``[profiles.X.slo]`` table or ``gpucap_slo`` marker kwargs)."""
    if not isinstance(data, Mapping):
        raise _fail(where, f"must be a table, got {data!r}")
    _check_keys(data, {f.name for f in fields(SLO)}, where)
    kw: dict[str, Any] = {}
    for key, value in data.items():
        if key == "p95_s":
            if not isinstance(value, Mapping):
                raise _fail(where, 'p95_s must be a table of role = seconds, e.g. p95_s = { Dev = 120 }')
            kw[key] = tuple(sorted((str(r), _number(v, f"p95_s.{r}", where)) for r, v in value.items()))
        else:
            kw[key] = _number(value, key, where)
    if kw.get("min_goodput", 0.0) > 1:
        raise _fail(where, f"min_goodput is a share of turns in [0, 1], got {kw['min_goodput']!r} (write e.g. 0.9)")
    return replace(base, **kw)


def _workload(data: Any, where: str) -> Workload:
    if not isinstance(data, Mapping):
        raise _fail(where, "must be a table")
    _check_keys(data, {f.name for f in fields(Workload)}, where)
    kw: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("max_turns", "seed", "ramp_ceiling", "ramp_max_tokens", "ramp_context_tokens", "depth_ctx_tokens"):
            kw[key] = (value if key in ("seed", "ramp_context_tokens", "depth_ctx_tokens") and value == 0
                       else _positive_int(value, key, where))
        else:
            kw[key] = _number(value, key, where)
    return Workload(**kw)


def parse_matrix(data: Mapping[str, Any], path: Path | None) -> Matrix:
    """Validate a parsed matrix document."""
    label = str(path) if path else "<matrix>"
    _check_keys(data, {"profiles", "models", "roles", "workflows"}, label)
    roles = data.get("roles", {})
    if not isinstance(roles, Mapping) or not all(isinstance(r, Mapping) for r in roles.values()):
        raise _fail(f"{label}: roles", "each [roles.NAME] must be a table: cadence_s, max_tokens, tool_tokens, thinking")
    for rname, role in roles.items():
        _check_keys(role, {"cadence_s", "max_tokens", "tool_tokens", "thinking", *ROLE_IMAGE_KEYS},
                    f"{label}: roles.{rname}")
        for key in ("max_tokens", "tool_tokens"):
            _positive_int(role.get(key), key, f"{label}: roles.{rname}")
        if problem := check_role_images(role, f"{label}: roles.{rname}"):
            raise MatrixError(problem)
    workflows = data.get("workflows", {})
    if not isinstance(workflows, Mapping) or not all(
            isinstance(w, list) and all(isinstance(x, str) for x in w) for w in workflows.values()):
        raise _fail(f"{label}: workflows", 'each workflow is a list of role names, e.g. A = ["TL", "Dev", "QA"]')
    models = data.get("models", {})
    if not isinstance(models, Mapping) or not all(isinstance(m, Mapping) for m in models.values()):
        raise _fail(f"{label}: models", "each [models.NAME] must be a table of model shape fields")
    profiles: dict[str, HostProfile] = {}
    all_defaults: dict[str, Mapping[str, Any]] = {}
    configs: list[CapacityConfig] = []
    raw_profiles = data.get("profiles", {})
    if not isinstance(raw_profiles, Mapping):
        raise _fail(label, "profiles must be tables: [profiles.cpu]")
    for name, raw in raw_profiles.items():
        where = f"{label}: profiles.{name}"
        if not isinstance(raw, Mapping):
            raise _fail(where, "must be a table")
        profile = profile_from_mapping(name, raw, where)
        _check_model_ref(profile.model, models, where)
        profiles[name] = profile
        defaults = raw.get("defaults", {})
        if not isinstance(defaults, Mapping):
            raise _fail(f"{where}.defaults", "must be a table")
        _check_keys(defaults, _CONFIG_KEYS - {"n", "ctx", "name"}, f"{where}.defaults")
        all_defaults[name] = dict(defaults)
        entries = raw.get("configs", [])
        if not isinstance(entries, list):
            raise _fail(where, "configs must be an array of tables: [[profiles.NAME.configs]]")
        for i, entry in enumerate(entries):
            ewhere = f"{where}.configs[{i}]"
            if not isinstance(entry, Mapping):
                raise _fail(ewhere, "must be a table")
            cfg = config_from_mapping(name, merge_defaults(defaults, entry), ewhere)
            _check_model_ref(cfg.model, models, ewhere)
            configs.append(cfg)
    known_workflows = {*BUILTIN_WORKFLOWS, *workflows}
    seen: dict[str, int] = {}
    for cfg in configs:
        unknown = [w for w in cfg.workflows if w not in known_workflows]
        if unknown:
            raise _fail(label, f"{cfg.id}: workflows names {unknown}, not built in nor in [workflows] "
                               f"(known: {', '.join(sorted(known_workflows))})")
        if cfg.id in seen:
            raise _fail(label, f"two configurations share the id {cfg.id!r}; give one a distinct name = \"...\"")
        seen[cfg.id] = 1
    from .search_space import searches_from  # same layer; it builds on config_from_mapping above

    return Matrix(path=path, profiles=profiles, configs=tuple(configs), models=dict(models),
                  defaults=all_defaults, roles=dict(roles),
                  workflows={k: tuple(v) for k, v in workflows.items()},
                  searches=searches_from(raw_profiles, all_defaults, label))


def _check_model_ref(model: str | None, models: Mapping[str, Any], where: str) -> None:
    if model and model.startswith(GENERATED_PREFIX):
        name = model.removeprefix(GENERATED_PREFIX)
        if name not in models and name not in BUILTIN_MODELS:
            known = ", ".join(sorted({*models, *BUILTIN_MODELS}))
            raise _fail(where, f"model {model!r} names no [models.{name}] table (known: {known})")


def load_matrix(path: Path) -> Matrix:
    """Read and validate a TOML matrix file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MatrixError(f"{path}: matrix file not found (pass --gpucap-matrix PATH)") from None
    except tomllib.TOMLDecodeError as exc:
        raise MatrixError(f"{path}: not valid TOML: {exc}") from None
    return parse_matrix(data, path)


#: Model shapes available as ``generated:NAME`` without a ``[models.NAME]`` table.
BUILTIN_MODELS: Mapping[str, Mapping[str, Any]] = {
    "tiny": {"name": "gpucap-tiny", "n_layer": 2, "n_embd": 256, "n_head": 4, "n_head_kv": 2,
             "n_ff": 512, "n_vocab": 1024},
}

DEFAULT_MATRIX = Matrix(
    path=None,
    profiles={"cpu": HostProfile(name="cpu", model="generated:tiny")},
    configs=(),
    models={},
)
