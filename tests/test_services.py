"""The host routine with real servers: a production llama-server stopped and restored around the
session, a real ``llama-server --embeddings`` co-tenant, in pytester subprocesses.

The production service is run by a small service manager in this test process (like systemd: the
stop and start commands are scripts the test writes that ask it, and it keeps a pid file), so the
service outlives the inner pytest — SIGKILLed included — and is reaped here. Each test checks the
service answers its health URL afterwards and that no process the inner session started is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import tomllib
import time
from pathlib import Path
from typing import Iterator

import httpcore  # noqa: F401  imported before pytester snapshots sys.modules: httpx maps its errors by class
import httpx
import psutil
import pytest

from conftest import ONE_CONFIG, CapacityRun, ChildPytest, matrix_toml, own_server, tagged_processes
from pytest_gpucap.backends.process import free_port
from pytest_gpucap.matrix import MatrixError, load_matrix, parse_matrix


SERVICE_CLIENT = """\
# The service's stop/start command: asks the test's service manager, like systemctl asks systemd.
import os, sys, time
action, home = sys.argv[1], sys.argv[2]
fail = os.path.join(home, "fail-" + action)
if os.path.exists(fail):
    print(action + " refused: " + open(fail).read())
    sys.exit(3)
result = os.path.join(home, "result")
if os.path.exists(result):
    os.unlink(result)
with open(os.path.join(home, "request.tmp"), "w") as out:
    out.write(action)
os.replace(os.path.join(home, "request.tmp"), os.path.join(home, "request"))
deadline = time.monotonic() + 30
while not os.path.exists(result):
    if time.monotonic() > deadline:
        print("the service manager did not answer")
        sys.exit(5)
    time.sleep(0.05)
code, _, text = open(result).read().partition(" ")
print(text)
sys.exit(int(code))
"""


class Production:
    """The production model service: a real llama-server that a manager thread starts and stops on
    request (pid file ``prod.pid``), with stop/start command scripts for the matrix."""

    def __init__(self, home: Path, binary: Path, model: Path) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.health = f"http://127.0.0.1:{self.port}/health"
        self.argv = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                     "-t", "1", "-c", "512"]
        self.client = home / "service.py"
        self.client.write_text(SERVICE_CLIENT)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.watch_port: int | None = None  # a co-tenant's port: is it still up when the service starts?
        self.watched: list[bool] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def command(self, action: str) -> list[str]:
        return [sys.executable, str(self.client), action, str(self.home)]

    def toml(self) -> str:
        return textwrap.dedent(f"""
            [[profiles.cpu.services]]
            name = "prod"
            stop = {json.dumps(self.command("stop"))}
            start = {json.dumps(self.command("start"))}
            health = "{self.health}"
            timeout_s = 30
            """)

    def _serve(self) -> None:
        request = self.home / "request"
        while not self._stop.wait(0.05):
            if not request.exists():
                continue
            action = request.read_text().strip()
            request.unlink()
            answer = self._start() if action == "start" else self._halt()
            (self.home / "result.tmp").write_text(answer)
            os.replace(self.home / "result.tmp", self.home / "result")

    def _start(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return "0 already running"
        if self.watch_port is not None:
            self.watched.append(not _nothing_listens(self.watch_port))
        with open(self.home / "order", "a") as order:
            order.write("prod\n")
        with open(self.home / "prod.log", "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        (self.home / "prod.pid").write_text(str(self.proc.pid))
        self.starts += 1
        return f"0 started pid {self.proc.pid}"

    def _halt(self) -> str:
        if self.proc is None or self.proc.poll() is not None:
            return "0 not running"
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        (self.home / "prod.pid").unlink()
        return "0 stopped"

    def start(self) -> None:
        assert subprocess.run(self.command("start"), timeout=60).returncode == 0
        self.assert_healthy()

    def up(self) -> bool:
        try:
            return httpx.get(self.health, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def assert_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.up():
            assert time.monotonic() < deadline, f"production service not healthy:\n{self.log()}"
            time.sleep(0.1)

    def log(self) -> str:
        path = self.home / "prod.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def production(tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> Iterator[Production]:
    prod = Production(tmp_path / "prod", llama_server_bin, tiny_model)
    try:
        prod.start()
        yield prod
    finally:
        prod.close()


def _embedding_args(port: int) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(port), "--embeddings", "--pooling", "mean", "-t", "1", "-c", "512"]


def cotenant_toml(binary: Path, model: Path, port: int) -> str:
    argv = [str(binary), "--model", str(model), *_embedding_args(port)]
    return textwrap.dedent(f"""
        [[profiles.cpu.cotenants]]
        name = "embed"
        argv = {json.dumps(argv)}
        health = "http://127.0.0.1:{port}/health"
        load = {{ url = "http://127.0.0.1:{port}/v1/embeddings", every_s = 0.5, json = {{ input = "hello" }} }}
        """)


#: The inner test checks what the routine promised: production down, the co-tenant up.
CHECKING_TEST = '''
import os, httpx, pytest

def test_ceiling(gpucap_ceiling):
    with pytest.raises(httpx.HTTPError):
        httpx.get(os.environ["PROD_HEALTH"], timeout=2)
    if os.environ.get("COTENANT_HEALTH"):
        assert httpx.get(os.environ["COTENANT_HEALTH"], timeout=2).status_code == 200
    if os.environ.get("FAIL_START_MARKER"):
        open(os.environ["FAIL_START_MARKER"], "w").write("the unit file is broken")
    assert not os.environ.get("FAIL_THE_TEST"), "a failing capacity test"
    gpucap_ceiling.assert_slos()
'''


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, production: Production) -> pytest.MonkeyPatch:
    monkeypatch.setenv("PROD_HEALTH", production.health)
    monkeypatch.delenv("GPUCAP_STOP_SERVICES", raising=False)
    return monkeypatch


def _lines(result: pytest.RunResult) -> str:
    return result.stdout.str() + result.stderr.str()


def _nothing_listens(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    except httpx.HTTPError:
        return True
    return False


# ---------------------------------------------------------------- sessions that end by themselves

def test_normal_session_stops_restores_and_attributes_the_cotenant(
        capacity_run: CapacityRun, production: Production, env: pytest.MonkeyPatch, tiny_model: Path) -> None:
    """The service is down during the config and back (a new process) after; a co-tenant that was
    down is started, measured with the config and in the write-up's breakdown, and stopped at the end."""
    port = free_port()
    env.setenv("COTENANT_HEALTH", f"http://127.0.0.1:{port}/health")
    first_pid = production.proc.pid if production.proc else None
    production.watch_port = port
    out = capacity_run.pytester.path / "out"
    flag, order = production.home / "flag-up", production.home / "order"
    flag.touch()
    second = textwrap.dedent(f"""
        [[profiles.cpu.services]]  # a second service with a health command: restored before the first
        name = "flag"
        stop = ["rm", "{flag}"]
        start = ["sh", "-c", "echo flag >> '{order}' && touch '{flag}'"]
        health = ["test", "-f", "{flag}"]
        """)
    matrix = matrix_toml(tiny_model, ONE_CONFIG) + production.toml() + second + cotenant_toml(
        capacity_run.server_bin, tiny_model, port)
    result = capacity_run.run(matrix, "--gpucap-stop-services", "--gpucap-report", str(out), test_src=CHECKING_TEST)
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["gpucap: stopped: prod (memory in use * -> * MiB)",
                                 "gpucap: stopped: flag (memory in use * -> * MiB)",
                                 "gpucap: restored: flag (healthy after * s)",
                                 "gpucap: restored: prod (healthy after * s)",
                                 "gpucap: co-tenant embed: started by gpucap (healthy after * s), stopped at the end"])
    production.assert_healthy()
    assert production.starts == 2 and production.proc is not None and production.proc.pid != first_pid
    assert order.read_text().split() == ["prod", "flag", "prod"] and flag.exists()  # reverse order
    assert not (out / "gpucap-services.json").exists()
    assert _nothing_listens(port), "the co-tenant the plugin started is still running"
    assert production.watched == [False], "the co-tenant was not stopped before the service came back"
    record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    (cot,) = record["cotenants"]
    assert cot["name"] == "embed" and cot["rss_mib"] > 1 and cot["pid"] > 0
    assert cot["load"]["sent"] >= 1 and cot["load"]["failed"] == 0
    report = (out / "capacity.md").read_text()
    section = report[report.index("## Host routine"):]
    assert "restored: prod (healthy after" in section and "| cpu | embed | started by gpucap |" in section
    breakdown = section[section.index("Phase 1 breakdown"):]
    row = next(line for line in breakdown.splitlines() if line.startswith("| cpu-n1-ctx1k-f16 | "))
    assert row.split(" | ")[1] == f"{cot['rss_mib']:,.0f}", row  # the co-tenant's memory in the breakdown


def test_without_the_flag_a_running_service_skips_its_profile(
        capacity_run: CapacityRun, production: Production, env: pytest.MonkeyPatch, tiny_model: Path) -> None:
    pid = production.proc.pid if production.proc else None
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG) + production.toml(), test_src=CHECKING_TEST)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *profile 'cpu': production service 'prod' is running "
                                 f"({production.health}); pass --gpucap-stop-services*"])
    assert production.starts == 1 and production.proc is not None and production.proc.pid == pid
    production.assert_healthy()


def test_failing_test_still_restores(capacity_run: CapacityRun, production: Production, env: pytest.MonkeyPatch,
                                     tiny_model: Path) -> None:
    env.setenv("FAIL_THE_TEST", "1")
    out = capacity_run.pytester.path / "out"
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG) + production.toml(), "--gpucap-stop-services",
                              "--gpucap-report", str(out), test_src=CHECKING_TEST)
    result.assert_outcomes(failed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["gpucap: restored: prod (healthy after * s)"])
    production.assert_healthy()
    assert not (out / "gpucap-services.json").exists()


def test_failing_stop_aborts_before_anything_boots(capacity_run: CapacityRun, production: Production,
                                                   env: pytest.MonkeyPatch, tiny_model: Path) -> None:
    """The stop command fails: nothing boots (no server log), the co-tenant is not started, the
    service runs as found, the state file is gone, and the message carries the command's output."""
    (production.home / "fail-stop").write_text("permission denied by policy")
    port = free_port()
    log_dir = capacity_run.pytester.path / "server-logs"
    out = capacity_run.pytester.path / "out"
    matrix = matrix_toml(tiny_model, ONE_CONFIG) + production.toml() + cotenant_toml(capacity_run.server_bin,
                                                                                     tiny_model, port)
    result = capacity_run.run(matrix, "--gpucap-stop-services", "--gpucap-report", str(out),
                              "--gpucap-log-dir", str(log_dir), test_src=CHECKING_TEST)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    text = _lines(result)
    assert "service 'prod': stop command `" in text and "exited 3" in text
    assert "stop refused: permission denied by policy" in text and "nothing was booted" in text
    assert "Traceback" not in text
    assert not log_dir.exists() or not any(log_dir.iterdir()), "a server was booted after the failed stop"
    assert _nothing_listens(port)
    assert production.starts == 1 and production.proc is not None and production.proc.poll() is None
    production.assert_healthy()
    assert not (out / "gpucap-services.json").exists()


def test_failing_start_is_loud_nonzero_and_restore_command_recovers(
        capacity_run: CapacityRun, production: Production, env: pytest.MonkeyPatch, tiny_model: Path) -> None:
    """The start command fails after a passing session: red message with the command's output, exit
    code 1, the state file kept; ``python -m pytest_gpucap restore DIR`` starts the service later."""
    marker = production.home / "fail-start"
    env.setenv("FAIL_START_MARKER", str(marker))  # the inner test breaks the start command
    out = capacity_run.pytester.path / "out"
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG) + production.toml(), "--gpucap-stop-services",
                              "--gpucap-report", str(out), test_src=CHECKING_TEST)
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["gpucap: RESTORE FAILED: prod: start command `* start *` exited 3:",
                                 "start refused: the unit file is broken"])
    assert not production.up()
    assert json.loads((out / "gpucap-services.json").read_text())["services"][0]["name"] == "prod"
    marker.unlink()
    done = subprocess.run([sys.executable, "-m", "pytest_gpucap", "restore", str(out)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("restored: prod (healthy after ")
    production.assert_healthy()
    assert not (out / "gpucap-services.json").exists()


def test_cotenant_already_running_is_left_alone(capacity_run: CapacityRun, production: Production,
                                                env: pytest.MonkeyPatch, tiny_model: Path) -> None:
    log = capacity_run.pytester.path / "embed.log"
    with own_server(capacity_run.server_bin, tiny_model, log, *_embedding_args(0)[4:]) as (proc, url):
        env.setenv("COTENANT_HEALTH", f"{url}/health")
        out = capacity_run.pytester.path / "out"
        matrix = matrix_toml(tiny_model, ONE_CONFIG) + production.toml() + cotenant_toml(
            capacity_run.server_bin, tiny_model, int(url.rsplit(":", 1)[1]))
        result = capacity_run.run(matrix, "--gpucap-stop-services", "--gpucap-report", str(out),
                                  test_src=CHECKING_TEST)
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["gpucap: co-tenant embed: found running, left alone"])
        assert proc.poll() is None, "the plugin stopped a co-tenant it did not start"
        assert httpx.get(f"{url}/health", timeout=2).status_code == 200
        record = json.loads((out / "results.jsonl").read_text().splitlines()[0])
        assert record["cotenants"][0]["pid"] == proc.pid and record["cotenants"][0]["rss_mib"] > 1
    production.assert_healthy()


# ---------------------------------------------------------------- sessions that are ended from outside

class Child(ChildPytest):
    """A capacity session with services and co-tenants, in a pytest child we start and signal ourselves."""

    def wait_for_config_server(self, timeout: float = 90) -> None:
        """Until the config's server (not the co-tenant) runs."""
        deadline = time.monotonic() + timeout
        while not [p for p in tagged_processes(self.run_id) if "--embeddings" not in _cmdline(p)]:
            assert self.proc.poll() is None, f"pytest exited before booting a config:\n{self.output()}"
            assert time.monotonic() < deadline, f"no config server started:\n{self.output()}"
            time.sleep(0.1)
        time.sleep(1.0)  # into the hold


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


@pytest.mark.parametrize(("sig", "said"), [(signal.SIGINT, "KeyboardInterrupt"), (signal.SIGTERM, "gpucap: SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
def test_signal_during_a_config_restores(pytester: pytest.Pytester, llama_server_bin: Path, tiny_model: Path,
                                         production: Production, env: pytest.MonkeyPatch, sig: int, said: str) -> None:
    """Ctrl-C or SIGTERM while a config is held: the server and the co-tenant stop, the service comes back."""
    port = free_port()
    matrix = matrix_toml(tiny_model, ONE_CONFIG) + production.toml() + cotenant_toml(llama_server_bin, tiny_model, port)
    child = Child(pytester, matrix, llama_server_bin, "--gpucap-stop-services", "--gpucap-hold", "60",
                  "--gpucap-report", "out")
    try:
        child.wait_for_config_server()
        assert not production.up()
        child.proc.send_signal(sig)
        assert child.wait() == pytest.ExitCode.INTERRUPTED, child.output()
        text = child.output()
        assert said in text, text
        assert "gpucap: restored: prod (healthy after" in text, text
        production.assert_healthy()
        assert _nothing_listens(port)
        assert not (pytester.path / "out" / "gpucap-services.json").exists()
    finally:
        left = child.kill_all()
    assert not left, f"processes left after {signal.Signals(sig).name}: {left}"


def test_sigkilled_session_is_restored_by_the_next(capacity_run: CapacityRun, production: Production,
                                                   env: pytest.MonkeyPatch, tiny_model: Path) -> None:
    """After SIGKILL no finalizer runs: the state file stays; the next session restores the service
    first and says so (and then runs as asked)."""
    pytester = capacity_run.pytester
    matrix = matrix_toml(tiny_model, ONE_CONFIG) + production.toml()
    child = Child(pytester, matrix, capacity_run.server_bin, "--gpucap-stop-services", "--gpucap-hold", "60",
                  "--gpucap-report", "out")
    try:
        child.wait_for_config_server()
        child.proc.kill()
        child.proc.wait(timeout=10)
        deadline = time.monotonic() + 15  # the config's server follows its parent (parent-death signal)
        while tagged_processes(child.run_id) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        left = child.kill_all()
    assert not left
    assert not production.up() and (pytester.path / "out" / "gpucap-services.json").exists()
    result = capacity_run.run(matrix, "--gpucap-report", "out")
    result.stdout.fnmatch_lines(["gpucap: restored first (left stopped by an earlier session, *gpucap-services.json): "
                                 "restored: prod (healthy after * s)"])
    result.assert_outcomes(skipped=1)  # without the flag this session leaves the (running again) service alone
    production.assert_healthy()
    assert not (pytester.path / "out" / "gpucap-services.json").exists()


# ---------------------------------------------------------------- declaring them

def _profile(extra: dict) -> dict:
    return {"profiles": {"cpu": {"device": "host", **extra}}}


@pytest.mark.parametrize(("extra", "message"), [
    ({"services": [{"name": "p", "stop": "systemctl stop p", "start": ["x"]}]}, "stop must be a non-empty list"),
    ({"services": [{"name": "p", "start": ["x"]}]}, "needs stop = ["),
    ({"services": [{"name": "p", "stop": ["x"], "start": ["x"], "health": "localhost"}]}, "health must be a URL"),
    ({"services": [{"name": "p", "stop": ["x"], "start": ["x"], "when": 1}]}, "unknown key 'when'"),
    ({"cotenants": [{"name": "e", "argv": ["x"]}]}, "needs argv = [\"llama-server\""),
    ({"cotenants": [{"name": "e", "argv": ["x"], "health": "http://h/health", "load": {"every_s": 1}}]},
     "url must be an http(s) URL"),
])
def test_invalid_declarations_name_the_entry_and_the_fix(extra: dict, message: str) -> None:
    with pytest.raises(MatrixError) as exc:
        parse_matrix(_profile(extra), None)
    assert message in str(exc.value) and "profiles.cpu." in str(exc.value)


def test_declarations_parse() -> None:
    matrix = parse_matrix(_profile({
        "services": [{"name": "p", "stop": ["sh", "-c", "stop p"], "start": ["start-p"],
                      "health": "http://127.0.0.1:1/health", "timeout_s": 5}],
        "cotenants": [{"name": "e", "argv": ["srv", "--embeddings"], "health": "http://127.0.0.1:2/health",
                       "env": {"A": "1"}, "load": {"url": "http://127.0.0.1:2/v1/embeddings", "json": {"input": "x"}}}],
    }), None)
    profile = matrix.profile("cpu")
    (svc,) = profile.services
    assert (svc.stop, svc.start, svc.health.url, svc.timeout_s) == (("sh", "-c", "stop p"), ("start-p",),
                                                                     "http://127.0.0.1:1/health", 5.0)
    (cot,) = profile.cotenants
    assert cot.env == (("A", "1"),) and cot.load is not None and json.loads(cot.load.body) == {"input": "x"}
    assert cot.load.every_s == 5.0


def test_stop_services_flag_env_and_ini(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_gpucap.options import resolve_settings

    monkeypatch.delenv("GPUCAP_STOP_SERVICES", raising=False)
    assert resolve_settings(pytester.parseconfig()).stop_services is False
    assert resolve_settings(pytester.parseconfig("--gpucap-stop-services")).stop_services is True
    pytester.makeini("[pytest]\ngpucap_stop_services = true\n")
    assert resolve_settings(pytester.parseconfig()).stop_services is True
    monkeypatch.setenv("GPUCAP_STOP_SERVICES", "0")
    assert resolve_settings(pytester.parseconfig()).stop_services is False


def test_shipped_4090_profile_shows_the_study_routine_commented() -> None:
    """The commented example in the 4090 profile parses once uncommented: the study's stopped service
    and its embedding co-tenant."""
    shipped = Path(__file__).resolve().parents[1] / "capacity_tests" / "gpucap.toml"
    lines = shipped.read_text().splitlines()
    start = lines.index("# [[profiles.4090.services]]")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line.removeprefix("#").removeprefix(" "))
    matrix = parse_matrix(tomllib.loads(shipped.read_text() + "\n" + "\n".join(block)), shipped)
    gpu = matrix.profile("4090")
    assert [s.name for s in gpu.services] == ["gemma4-26b-a4b-q4"]
    assert [c.name for c in gpu.cotenants] == ["vllm-embedding-code"] and gpu.cotenants[0].load is not None
    assert not load_matrix(shipped).profile("4090").services  # commented out: nothing is stopped by default


def test_phase1_breakdown_on_a_gpu_record() -> None:
    """The breakdown arithmetic on a GPU-shaped ceiling record. Figures: the reference study's N3 x 64K
    config (shared/reference/spike-multi-agent-capacity-4090.txt: 21,110 MiB used, 2,972 MiB free, the
    embedding co-tenant 2.5 GB of a 3.4 GB baseline); the buffer split is illustrative, not NVML output."""
    from pytest_gpucap.host_section import breakdown, host_section

    record = {"kind": "ceiling", "config_id": "4090-n3-ctx64k-mmproj-q8", "cotenants": [
        {"name": "vllm-embedding-code", "pid": 4242, "rss_mib": 900.0, "device_mib": 2560.0}],
        "memory": {"probe": "nvml", "baseline_used_mib": 3482.0, "used_after_load_mib": 21110.0, "free_mib": 2972.0,
                   "server_report": {"model_mib": {"CUDA0": 13282.0}, "kv_mib": 3072.0, "compute_mib": {"CUDA0": 500.0}}}}
    b = breakdown(record)
    assert (b["cotenants"], b["other"], b["model"], b["kv"], b["compute"]) == (2560.0, 922.0, 13282.0, 3072.0, 500.0)
    assert b["unattributed"] == 21110.0 - 3482.0 - 13282.0 - 3072.0 - 500.0
    (section,) = host_section([("restored: gemma (healthy after 3.2 s)", False)], {}, [record])
    assert "| 4090-n3-ctx64k-mmproj-q8 | 2,560 | 922 | 13,282 | 3,072 | 500 | 774 | 2,972 |" in section.markdown
    assert "- restored: gemma (healthy after 3.2 s)" in section.markdown
