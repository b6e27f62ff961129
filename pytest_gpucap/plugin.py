"""pytest hooks and fixtures for pytest-gpucap. Everything else is delegated to the modules it names."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from . import predict_mode, prediction, strict
from .matrix import (
    BACKENDS, DEFAULT_MATRIX, SLO, CapacityConfig, HostProfile, Matrix, MatrixError,
    config_from_mapping, load_matrix, merge_defaults, slo_from_mapping,
)
from .burst import with_burst
from .ceiling import Ceiling, ceiling_record
from .recorder import Recorder
from .probes import HostProbe, MemoryProbe, NvmlError, NvmlProbe, take_snapshot
from .backends import LaunchSpec, PreflightSkip, ServerHandle
from .backends.process import sweep_leftovers
from .resolve import Missing, Resolver
from .xdist_groups import GROUPS_DIR_KEY, ConfigGroupScheduling, write_groups
from . import search_run
from .search_run import SearchRun, SearchSession
from .harness import Harness
from .report_props import as_test_failure, attach, junit_headline_only, progress_sink, record_outcome
from .host_routine import register_host_routine, skip_if_service_up
from .options import Settings, add_options, gpus_setting, resolve_settings
from .pinning import probe_cards, worker_gpu
from .workload.roles import roles_from_matrix


@dataclass
class State:
    """Per-session state kept in ``config.stash``."""

    settings: Settings
    matrix: Matrix
    owner_token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    probes: dict[str, MemoryProbe | str] = field(default_factory=dict)
    handles: list[ServerHandle] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    previous_records: list[dict[str, Any]] = field(default_factory=list)  # the report dir's earlier run
    swept: list[int] | None = None
    grouped: bool = False  # the default xdist --dist was changed to loadgroup for the capacity configs
    groups_dir: Path | None = None  # controller: where workers save their tests' xdist groups
    resolver: Resolver | None = None
    _calibration: Any = None

    @property
    def binary_version(self) -> str:
        """The llama-server build this session used (session facts)."""
        return self.resolver.server_version if self.resolver else ""

    @property
    def calibration(self) -> Any:
        if self._calibration is None and self.settings.calibration_path is not None:
            self._calibration = prediction.load_calibration(self.settings.calibration_path)
        return self._calibration


STATE = pytest.StashKey[State]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspec

    pluginmanager.add_hookspecs(hookspec)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` with ``--gpucap-gpus``: one worker per listed card (each worker then takes its own)."""
    return len(gpus) if (gpus := gpus_setting(config)) else None

# ---------------------------------------------------------------- configure

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpucap(**config): declare a capacity configuration for this test "
                            "(keys as in a matrix entry plus profile=NAME); repeat for several")
    config.addinivalue_line("markers", "gpucap_slo(**budgets): override SLO budgets, e.g. headroom_gib=2.0, "
                            "p95_s={'Dev': 120}, min_agg_tps=100, max_error_rate=0.01")
    config.addinivalue_line("markers", "gpucap_ramp: parametrize only over configs with ramp = true")
    for backend in BACKENDS:
        config.addinivalue_line("markers", f"{backend}: capacity configurations on backend {backend!r} "
                                           f"(e.g. -m 'cpu and {backend}')")
    config.addinivalue_line("markers", "gpucap_search(profile, ns, ctxs, cache_types=['f16'], mmproj=[False], "
                            "base={}, prune, strategy, max_boots, probe={}): the gpucap_search fixture's space "
                            "(without it: the matrix's [profiles.NAME.search] tables)")
    settings = resolve_settings(config)
    try:
        matrix = load_matrix(settings.matrix_path) if settings.matrix_path else DEFAULT_MATRIX
    except MatrixError as exc:
        raise pytest.UsageError(str(exc)) from None
    for name in matrix.profiles:
        config.addinivalue_line("markers", f"{name}: capacity configurations of host profile {name!r}")
    state = State(settings=settings, matrix=matrix, grouped=_group_configs_per_worker(config))
    config.stash[STATE] = state
    register_host_routine(config, state)
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(Recorder(state, config), "gpucap-recorder")
        if settings.strict:
            config.pluginmanager.register(strict.StrictGate(), "gpucap-strict")


def _dist_given(config: pytest.Config) -> bool:
    """Whether the user chose an xdist distribution mode (command line, PYTEST_ADDOPTS or ini addopts)."""
    words = [*config.invocation_params.args, *os.environ.get("PYTEST_ADDOPTS", "").split(),
             *config.getini("addopts")]
    return any(w in ("--dist", "-d") or w.startswith("--dist=") for w in words)


def _group_configs_per_worker(config: pytest.Config) -> bool:
    """Under ``-n N`` with xdist's default distribution, switch to ``loadgroup``: each config's tests
    then run on one worker (its server boots once) instead of one server per worker. A ``--dist``
    the user gave is left alone."""
    if hasattr(config, "workerinput") or getattr(config.option, "dist", "no") != "load" or _dist_given(config):
        return False
    config.option.dist = "loadgroup"
    return True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: each worker writes its tests' groups where the controller's scheduler reads them."""
    state = node.config.stash.get(STATE, None)
    if state is not None and node.config.getoption("dist", "no") == "loadgroup":
        if state.groups_dir is None:
            state.groups_dir = Path(tempfile.mkdtemp(prefix="gpucap-groups-"))
        node.workerinput[GROUPS_DIR_KEY] = str(state.groups_dir)


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``loadgroup`` (ours or the user's): group by the workers' saved groups (see xdist_groups)."""
    state = config.stash.get(STATE, None)
    if state is None or state.groups_dir is None or config.getoption("dist", "no") != "loadgroup":
        return None
    return ConfigGroupScheduling(config, log, state.groups_dir)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    write_groups(config, items)


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(STATE, None)
    if state is not None and state.grouped:
        return ["gpucap: -n without --dist: capacity configs run with --dist loadgroup (each config's tests on "
                "one worker, its server booted once); one server per device at a time unless a profile sets "
                "exclusive = false"]
    return []


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    """``--gpucap-predict``: the selected configs' predicted fit is printed and nothing runs."""
    if not session.config.getoption("gpucap_predict"):
        return None
    return predict_mode.run(session, session.config.stash[STATE])


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is None:
        return
    for handle in state.handles:
        handle.stop()
    for probe in state.probes.values():
        if not isinstance(probe, str):
            probe.close()
    if state.groups_dir is not None:
        shutil.rmtree(state.groups_dir, ignore_errors=True)


def _marker_configs(metafunc: pytest.Metafunc, matrix: Matrix) -> list[CapacityConfig]:
    configs = []
    for mark in metafunc.definition.iter_markers("gpucap"):
        where = f"@pytest.mark.gpucap on {metafunc.definition.nodeid}"
        kwargs = dict(mark.kwargs)
        profile = kwargs.pop("profile", next(iter(matrix.profiles), "cpu"))
        if profile not in matrix.profiles:
            raise MatrixError(f"{where}: unknown profile {profile!r} (known: {', '.join(matrix.profiles)})")
        defaults = dict(matrix.defaults.get(profile, {}))
        configs.append(config_from_mapping(profile, merge_defaults(defaults, kwargs), where))
    return configs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    state = metafunc.config.stash[STATE]
    search_run.generate(metafunc, state.matrix)
    if "gpucap_config" not in metafunc.fixturenames:
        return
    try:
        configs = _marker_configs(metafunc, state.matrix) or list(state.matrix.configs)
    except MatrixError as exc:
        pytest.fail(str(exc), pytrace=False)
    if metafunc.definition.get_closest_marker("gpucap_ramp"):
        configs = [c for c in configs if c.ramp]
    params = [pytest.param(c, id=c.id, marks=[getattr(pytest.mark, c.profile), getattr(pytest.mark, c.backend),
                                              pytest.mark.xdist_group(c.id)])
              for c in configs]
    metafunc.parametrize("gpucap_config", params, indirect=True, scope="session")


# ---------------------------------------------------------------- launching

def _probe(state: State, profile: HostProfile, cards: tuple[int | str, ...] = ()) -> MemoryProbe:
    """One probe per profile and set of pinned cards; a GPU profile on a host without a usable GPU skips."""
    key = f"{profile.name}@{','.join(map(str, cards))}"
    cached = state.probes.get(key)
    if cached is None:
        if profile.device == "cuda":
            try:
                cached = _nvml_probe(cards or (profile.gpu_index,), profile.memory_gib * 1024)
            except NvmlError as exc:
                cached = f"profile {profile.name!r} needs an NVIDIA GPU: {exc}"
        else:
            cached = HostProbe(profile.memory_gib * 1024)
        state.probes[key] = cached
    if isinstance(cached, str):
        pytest.skip(cached)
    return cached


def _nvml_probe(cards: tuple[int | str, ...], budget_mib: float) -> MemoryProbe:
    """The one place that picks the cards NVML reads for a pinned server: all of them, by index or UUID."""
    return NvmlProbe(devices=list(cards), budget_mib=budget_mib)


def _resolver(request: pytest.FixtureRequest) -> Resolver:
    """The session's resolver: model cache in the pytest cache, logs under the session's basetemp."""
    state = request.config.stash[STATE]
    if state.resolver is None:
        cache = getattr(request.config, "cache", None)
        cache_dir = Path(cache.mkdir("gpucap-models")) if cache else Path.home() / ".cache" / "pytest-gpucap"
        basetemp = request.getfixturevalue("tmp_path_factory").getbasetemp()
        # xdist workers' basetemps share a parent: the device locks live there (pytest-xdist's own advice)
        worker = getattr(request.config, "workerinput", None)
        lock_dir = (basetemp.parent if worker is not None else basetemp) / "gpucap-devices"
        state.resolver = Resolver(state.settings, state.matrix, cache_dir, basetemp / "gpucap-logs",
                                  state.owner_token, progress_sink(request.config), lock_dir=lock_dir,
                                  worker_gpu=worker_gpu(state.settings.gpus or (), (worker or {}).get("workerid")))
    return state.resolver


def launch_spec(request: pytest.FixtureRequest, cfg: CapacityConfig) -> LaunchSpec:
    """Resolve command, model, projector and limits for one config, skipping when one is missing."""
    try:
        return _resolver(request).spec(cfg)
    except Missing as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------- fixtures

def _ensure_swept(state: State) -> None:
    """Remove servers of dead earlier sessions once, before this session's first boot."""
    if state.swept is None:
        state.swept = sweep_leftovers() if state.settings.sweep else []


def _predict(state: State, handle: ServerHandle) -> Any:
    """The memory model's prediction for a config about to boot (None when it cannot be made)."""
    spec = handle.spec
    if spec.model is None or not handle.backend.predicted:
        return None
    baseline = take_snapshot(handle.probe, None).device.used_mib if handle.is_gpu else 0.0
    try:
        return prediction.predict_for(spec.config, spec.profile, spec.model, spec.mmproj,
                                      state.calibration, baseline_used_mib=baseline)
    except (OSError, ValueError, KeyError) as exc:  # an unreadable or unusual GGUF: boot to find out
        return _Unpredictable(str(exc))


@dataclass(frozen=True)
class _Unpredictable:
    """Stands in for a prediction the memory model could not make; never skips."""

    why: str

    def skip_reason(self) -> None:
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.why}


@pytest.fixture(scope="session")
def gpucap_config(request: pytest.FixtureRequest) -> CapacityConfig:
    """The capacity configuration of this test case (parametrized from the matrix or markers)."""
    if not hasattr(request, "param"):
        pytest.skip("no capacity configuration: this test is not parametrized by pytest-gpucap")
    return request.param


@pytest.fixture(scope="session")
def gpucap_server(request: pytest.FixtureRequest, gpucap_config: CapacityConfig) -> Iterator[ServerHandle]:
    """A booted, verified server for this config, shared by its tests and torn down after them."""
    state = request.config.stash[STATE]
    _ensure_swept(state)
    skip_if_service_up(request.config, gpucap_config.profile)
    spec = launch_spec(request, gpucap_config)
    cards = probe_cards(spec.visible_devices.split(",")) if spec.visible_devices else ()
    handle = ServerHandle(spec, _probe(state, spec.profile, cards))
    handle.prediction = _predict(state, handle)
    if handle.prediction is not None and state.settings.predict_skip:
        reason = handle.prediction.skip_reason()
        if reason:
            pytest.skip(reason)
    state.handles.append(handle)
    try:
        with as_test_failure():
            handle.boot()
    except PreflightSkip as exc:
        handle.stop()
        pytest.skip(str(exc))
    except BaseException:
        handle.stop()
        raise
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def gpucap_slo(request: pytest.FixtureRequest, gpucap_config: CapacityConfig) -> SLO:
    """The SLO budgets of this test: profile defaults, overridden by a ``gpucap_slo`` marker."""
    return _marked_slo(request, request.config.stash[STATE].matrix.profile(gpucap_config.profile).slo)


def _marked_slo(request: pytest.FixtureRequest, slo: SLO) -> SLO:
    """``slo`` with the test's ``gpucap_slo`` markers applied, nearest last (a mistake is one line)."""
    for mark in reversed(list(request.node.iter_markers("gpucap_slo"))):
        try:
            slo = slo_from_mapping(mark.kwargs, "@pytest.mark.gpucap_slo", base=slo)
        except MatrixError as exc:
            pytest.fail(str(exc), pytrace=False)
    return slo


@pytest.fixture
def gpucap_ceiling(request: pytest.FixtureRequest, gpucap_server: ServerHandle, gpucap_slo: SLO) -> Ceiling:
    """Hold the booted server, sample memory, and record the Phase-1 figures for this config."""
    with as_test_failure():
        gpucap_server.hold()
    record, verdicts = ceiling_record(gpucap_server, request.node.nodeid, gpucap_slo)
    with as_test_failure():  # the burst ceiling: headroom judged under load ([profiles.NAME.burst])
        record, verdicts = with_burst(gpucap_server, record, verdicts, gpucap_slo)
    attach(request.node, record)
    return Ceiling(record, verdicts)


@pytest.fixture
def gpucap_workload(request: pytest.FixtureRequest, gpucap_server: ServerHandle, gpucap_slo: SLO) -> Harness:
    """Runs agent workflows, fixed-concurrency, Poisson and ramp loads on this config's server.

    Each run is recorded on the test report. Skips when free memory after boot is under the
    profile's post-boot floor.
    """
    reason = gpucap_server.post_boot_skip_reason()
    if reason:
        pytest.skip(reason)
    state = request.config.stash[STATE]
    settings = state.settings
    workload = gpucap_server.profile.workload
    changes: dict[str, Any] = {}
    if settings.duration_s is not None:
        changes["duration_s"] = settings.duration_s
    if settings.rtt_s is not None:
        changes["rtt_s"] = settings.rtt_s
    if settings.ramp_ceiling is not None:
        changes["ramp_ceiling"] = settings.ramp_ceiling
    node = request.node

    def record(rec: dict[str, Any]) -> None:
        attach(node, rec)

    return Harness(gpucap_server, gpucap_slo, replace(workload, **changes), roles_from_matrix(state.matrix.roles),
                   dict(state.matrix.workflows), node.nodeid, record, progress_sink(request.config),
                   client_procs=settings.client_procs, repeat=settings.repeat)


def _search_session(request: pytest.FixtureRequest, base: CapacityConfig) -> SearchSession:
    """What a capacity search borrows from the session: lookups, the probe, the records so far."""
    state = request.config.stash[STATE]
    _ensure_swept(state)
    node = request.node
    return SearchSession(spec_for=lambda cfg: launch_spec(request, cfg),
                         probe=_probe(state, state.matrix.profile(base.profile)),
                         attach=lambda record: attach(node, record), test_id=node.nodeid,
                         calibration=state.calibration, previous_records=state.previous_records,
                         records=state.records, roles=roles_from_matrix(state.matrix.roles),
                         workflows=dict(state.matrix.workflows), progress=progress_sink(request.config))


@pytest.fixture
def gpucap_search(request: pytest.FixtureRequest) -> SearchRun:
    """Capacity search of the matrix's ``[profiles.NAME.search]`` (or the test's marker), judged on the
    profile's SLO with the test's ``gpucap_slo`` markers applied; see ``SearchRun.run``."""
    matrix = request.config.stash[STATE].matrix
    decl = search_run.declared(request, matrix)
    skip_if_service_up(request.config, decl.profile)
    assert decl.base is not None
    return SearchRun(decl, lambda: _search_session(request, decl.base),
                     slo=_marked_slo(request, matrix.profile(decl.profile).slo))


# ---------------------------------------------------------------- reporting

@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """A server that dies under a test fails it with the server's message, not our stack."""
    with as_test_failure():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    handle = getattr(item, "funcargs", {}).get("gpucap_server")
    if report.failed and isinstance(handle, ServerHandle) and handle.process is not None:
        tail = handle.process.log_tail(30)
        if tail.splitlines()[-1:] and tail.splitlines()[-1] not in report.longreprtext:
            report.sections.append(("gpucap server log (tail)", tail))
    if report.when in ("setup", "call") and not report.passed:
        record_outcome(item, call, report)
    if report.when == "teardown":
        junit_headline_only(report)
    strict.tag(item, report)
    return report
