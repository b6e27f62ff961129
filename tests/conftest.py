"""Shared fixtures for the plugin's own tests: the real llama-server, generated models, pytester runs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import httpx
import psutil
import pytest

from pytest_gpucap.matrix import CapacityConfig, HostProfile
from pytest_gpucap.probes import HostProbe
from pytest_gpucap.modelgen import ModelShape, ensure_model
from pytest_gpucap.backends import LaunchSpec, ServerHandle
from pytest_gpucap.backends.llamacpp import find_binary
from pytest_gpucap.backends.process import OWNER_ENV, free_port

RUN_ENV = "GPUCAP_TEST_RUN"
#: This checkout: subprocess runs import its plugin, not whichever copy the venv has installed.
REPO = Path(__file__).resolve().parents[1]

#: A test file whose every config has three tests (they must share one server per config).
TWO_TESTS_PER_CONFIG = '''
import pytest

def test_ceiling(gpucap_ceiling):
    gpucap_ceiling.assert_slos()

@pytest.mark.parametrize("i", range(2))
def test_again(gpucap_ceiling, i):
    gpucap_ceiling.assert_slos()
'''

#: The smallest cpu config: one slot, 1K context (sessions that only need a server up).
ONE_CONFIG = """
    [[profiles.cpu.configs]]
    n = 1
    ctx = 1024
"""

#: Three small configs of the cpu profile (several tests boot them under xdist).
THREE_CONFIGS = """
    [[profiles.cpu.configs]]
    n = 1
    ctx = 1024
    [[profiles.cpu.configs]]
    n = 2
    ctx = 1024
    [[profiles.cpu.configs]]
    n = 3
    ctx = 1024
"""
CEILING_TEST = '''
def test_ceiling(gpucap_ceiling):
    gpucap_ceiling.assert_slos()
'''


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The real llama-server; CI sets GPUCAP_REQUIRE_SERVER=1 so a missing one fails, not skips."""
    found = find_binary(None)
    if found.path is None:
        if os.environ.get("GPUCAP_REQUIRE_SERVER"):
            pytest.fail(f"llama-server required: {found.source}")
        pytest.skip(found.source)
    return found.path


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_cache: Path) -> Path:
    return ensure_model(ModelShape(), model_cache)


@pytest.fixture(scope="session")
def head16_model(model_cache: Path) -> Path:
    """Head size 16: llama.cpp refuses quantized KV (block size 32) for it at boot."""
    return ensure_model(ModelShape(name="gpucap-head16", n_embd=64, n_head=4, n_head_kv=2), model_cache)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a test-started server's whole process group and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def own_server(binary: Path, model: Path, log: Path, *args: str,
               env: Mapping[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A llama-server the test starts itself (not through the plugin): 127.0.0.1, a free port, its own
    session, healthy before it is yielded, and its group killed afterwards whatever happened."""
    port = free_port()
    argv = [str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ if env is None else env), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama-server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server not healthy after 60 s:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        yield proc, url
    finally:
        kill_group(proc)


def tagged_processes(run_id: str) -> list[psutil.Process]:
    """Processes pytest-gpucap started during the pytester run ``run_id``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if OWNER_ENV in env and env.get(RUN_ENV) == run_id:
            found.append(proc)
    return found


class ChildPytest:
    """A capacity session in a pytest child we start (and signal) ourselves, in the pytester dir.

    ``kill_all`` is safe to call in any state: it SIGKILLs the child and every process it tagged,
    and returns the pids it found still running.
    """

    def __init__(self, pytester: pytest.Pytester, matrix: str, server_bin: Path, *args: str) -> None:
        pytester.makeini("[pytest]\naddopts = --strict-markers\n")
        pytester.makefile(".toml", gpucap=matrix)
        pytester.makepyfile(test_capacity=CEILING_TEST)
        self.run_id = uuid.uuid4().hex
        self.log = pytester.path / "child.log"
        argv = [sys.executable, "-m", "pytest", "--gpucap-matrix", "gpucap.toml", "--gpucap-server-bin",
                str(server_bin), "-p", "no:cacheprovider", "--basetemp", str(pytester.path / "basetemp"), "-v",
                *args]
        env = {**os.environ, RUN_ENV: self.run_id,
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=pytester.path, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_server(self, timeout: float = 60) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while True:
            found = tagged_processes(self.run_id)
            if found:
                return found
            assert self.proc.poll() is None, f"pytest exited before starting a server:\n{self.output()}"
            assert time.monotonic() < deadline, f"no server started:\n{self.output()}"
            time.sleep(0.1)

    def wait_no_server(self, timeout: float) -> list[psutil.Process]:
        deadline = time.monotonic() + timeout
        while (left := tagged_processes(self.run_id)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pytest did not exit within {timeout} s:\n{self.output()}")

    def kill_all(self) -> list[int]:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        left = tagged_processes(self.run_id)
        for proc in left:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                with contextlib.suppress(OSError, psutil.Error):
                    proc.kill()
        return [p.pid for p in left]



def matrix_toml(model: Path, configs: str, profile: str = "cpu", extra: str = "") -> str:
    """A small matrix for one host-memory profile with permissive floors, plus ``extra`` TOML."""
    return textwrap.dedent(f"""
        [profiles.{profile}]
        device = "host"
        memory_gib = 2.0
        model = "{model}"
        boot_timeout_s = 60
        hold_s = 0.5
        [profiles.{profile}.slo]
        headroom_gib = 0.5
        [profiles.{profile}.defaults]
        threads = 1
        cache_ram_mib = 0
        """) + textwrap.dedent(configs) + textwrap.dedent(extra)


@dataclass
class CapacityRun:
    """Runs a capacity suite in a pytester subprocess and checks it left no server behind."""

    pytester: pytest.Pytester
    server_bin: Path
    run_id: str

    def run(self, matrix: str, *args: str, test_src: str = CEILING_TEST,
            timeout: float = 240) -> pytest.RunResult:
        self.pytester.makeini("[pytest]\naddopts = --strict-markers\n")
        self.pytester.makefile(".toml", gpucap=matrix)
        self.pytester.makepyfile(test_capacity=test_src)
        os.environ[RUN_ENV] = self.run_id
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
                result = self.pytester.runpytest_subprocess(
                    "--gpucap-matrix", "gpucap.toml", "--gpucap-server-bin", str(self.server_bin),
                    "-p", "no:cacheprovider", "-rs", *args, timeout=timeout)
        finally:
            os.environ.pop(RUN_ENV, None)
        self.assert_no_orphans()
        return result

    def assert_no_orphans(self) -> None:
        left = tagged_processes(self.run_id)
        for proc in left:
            proc.kill()
        assert not left, f"servers left running: {[p.pid for p in left]}"


@pytest.fixture
def capacity_run(pytester: pytest.Pytester, llama_server_bin: Path) -> CapacityRun:
    return CapacityRun(pytester, llama_server_bin, uuid.uuid4().hex)


MakeMatrix = Callable[..., str]


def assert_weights_in_model_buffers(model_mib: dict[str, float], weights_mib: float, rel: float = 0.01) -> None:
    """The weights are the model buffer. On a CPU with AMX (or another repack buffer type) llama.cpp
    moves some weights into a repacked copy in an extra buffer, so the weights lie between the mapped
    part and the mapped part plus the extra buffers."""
    extra = sum(v for k, v in model_mib.items() if k != "CPU")
    if not extra:
        assert model_mib["CPU"] == pytest.approx(weights_mib, rel=rel), model_mib
    else:
        assert model_mib["CPU"] <= weights_mib * (1 + rel) <= (model_mib["CPU"] + extra) * (1 + 2 * rel), model_mib


@contextlib.contextmanager
def plugin_server(binary: Path, model: Path, cfg: CapacityConfig, log_dir: Path,
                  mmproj: Path | None = None) -> Iterator[ServerHandle]:
    """A llama-server booted through the plugin's own ServerHandle on a 2 GiB host profile, and
    stopped afterwards whatever happened."""
    spec = LaunchSpec(config=cfg, profile=HostProfile(name="cpu", memory_gib=2.0), log_dir=log_dir, command=(str(binary),),
                      model=model, mmproj=mmproj, boot_timeout_s=60, hold_s=0.2)
    handle = ServerHandle(spec, HostProbe(2048))
    try:
        handle.boot()
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def restore_nofile() -> Iterator[None]:
    """The open-file limit as it was before a ramp test raised it."""
    import resource

    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
