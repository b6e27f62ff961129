"""The boot deadline each backend gives its server: a quiet server times out, a busy one is waited for.

The slow and hung servers here are small Python stand-ins, because a real server cannot be made to
boot slowly, hang silently or log forever on demand; the real vLLM case (a first boot that outlasts
the profile's timeout) is ``tests/test_vllm.py::TestPrefixOffWithKey``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from pytest_gpucap.backends import LaunchSpec, backend_for
from pytest_gpucap.backends.process import ManagedProcess, Readiness, ServerError, free_port, wait_healthy
from pytest_gpucap.matrix import CapacityConfig, HostProfile

#: Logs a line every 0.1 s for ``busy`` seconds (forever when negative), then answers /health.
SLOW_SERVER = r"""
import http.server, sys, time
port, busy = int(sys.argv[1]), float(sys.argv[2])
t0 = time.monotonic()
while busy < 0 or time.monotonic() - t0 < busy:
    print("loading", time.monotonic() - t0, flush=True)
    time.sleep(0.1)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _start(tmp_path: Path, busy: float) -> tuple[ManagedProcess, str]:
    port = free_port()
    proc = ManagedProcess([sys.executable, "-u", "-c", SLOW_SERVER, str(port), str(busy)], tmp_path / "server.log")
    proc.start()
    return proc, f"http://127.0.0.1:{port}/health"


def test_a_busy_boot_is_waited_for_past_the_timeout(tmp_path: Path) -> None:
    proc, url = _start(tmp_path, busy=3.0)
    notes: list[str] = []
    try:
        boot_s = wait_healthy(proc, url, Readiness(1.0, extend_while_busy=True, idle_s=2.0, hard_cap_s=30.0),
                              what="slow server", progress=notes.append)
    finally:
        proc.stop(grace_s=2)
    assert boot_s > 2.5
    assert notes and "still starting" in notes[0] and "waiting up to 30 s" in notes[0]


def test_a_fixed_deadline_does_not_wait_for_a_busy_boot(tmp_path: Path) -> None:
    proc, url = _start(tmp_path, busy=5.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(ServerError, match=r"slow server not healthy after 1 s \(raise boot_timeout_s"):
            wait_healthy(proc, url, Readiness(1.0), what="slow server")
    finally:
        proc.stop(grace_s=2)
    assert time.monotonic() - t0 < 4


def test_a_silent_server_times_out_once_idle(tmp_path: Path) -> None:
    """Hung: no log line, no CPU. The extension ends ``idle_s`` after the last sign of work."""
    proc = ManagedProcess([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "hung.log")
    proc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(ServerError, match=r"idle for [0-9]+ s"):
            wait_healthy(proc, f"http://127.0.0.1:{free_port()}/health",
                         Readiness(1.0, extend_while_busy=True, idle_s=1.5, hard_cap_s=30.0), what="hung server")
    finally:
        proc.stop(grace_s=2)
    assert time.monotonic() - t0 < 8


def test_a_server_busy_forever_stops_at_the_hard_cap(tmp_path: Path) -> None:
    proc, url = _start(tmp_path, busy=-1)
    t0 = time.monotonic()
    try:
        with pytest.raises(ServerError, match=r"still busy at the 3 s cap"):
            wait_healthy(proc, url, Readiness(1.0, extend_while_busy=True, idle_s=5.0, hard_cap_s=3.0),
                         what="busy server")
    finally:
        proc.stop(grace_s=2)
    assert 2.9 < time.monotonic() - t0 < 7


def test_each_backend_names_its_rule(tmp_path: Path) -> None:
    """llama-server boots in seconds or is stuck; vLLM's first boot can take minutes while busy."""
    profile = HostProfile(name="cpu")
    llama = LaunchSpec(config=CapacityConfig(profile="cpu", n=1, ctx=512), profile=profile, log_dir=tmp_path,
                       boot_timeout_s=60)
    vllm = LaunchSpec(config=CapacityConfig(profile="cpu", backend="vllm", n=1, ctx=512), profile=profile,
                      log_dir=tmp_path, boot_timeout_s=60)
    assert backend_for("llamacpp").readiness(llama) == Readiness(60)
    rule = backend_for("vllm").readiness(vllm)
    assert rule.timeout_s == 60 and rule.extend_while_busy and rule.hard_cap_s >= 600
