"""Shared fixtures for the plugin's own tests: the real llama-server, generated models, pytester runs."""

from __future__ import annotations

import os
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import pytest

from pytest_gpucap.modelgen import ModelShape, ensure_model
from pytest_gpucap.servers.llamacpp import find_binary
from pytest_gpucap.servers.process import OWNER_ENV

RUN_ENV = "GPUCAP_TEST_RUN"

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
