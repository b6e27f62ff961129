"""Co-tenants: processes that share the host with every config, as they will in production.

One that already answers its health check is someone else's: it is measured, never stopped. One
that is down is started by the plugin on the process core the servers use (own session, owner tag,
parent-death signal), kept up for the session, and stopped at its end, so it leaves no orphan. A
co-tenant's memory (host RSS of its process tree; on a GPU its per-process NVML use) is read by the
port its health URL names, so one the plugin did not start is attributed too.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from .backends.process import ManagedProcess, ServerError, wait_healthy
from .hostspec import CotenantSpec
from .probes import MemoryProbe, process_tree_rss_mib, tree_pids
from .services import is_up


def listening_pid(url: str) -> int | None:
    """The process listening on the URL's port (the co-tenant behind a health URL)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for conn in conns:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


@dataclass
class Cotenant:
    """One co-tenant in this session: found running, or started (and later stopped) by the plugin."""

    spec: CotenantSpec
    process: ManagedProcess | None = None
    boot_s: float | None = None
    load: "LoadLoop | None" = None

    @property
    def started(self) -> bool:
        return self.process is not None

    def pid(self) -> int | None:
        if self.process is not None and self.process.alive():
            return self.process.pid
        return listening_pid(self.spec.health.url) if self.spec.health.url else None

    def memory(self, probe: MemoryProbe | None) -> dict[str, Any]:
        """Its memory now: host RSS of the process tree, and device MiB on an NVML probe."""
        pid = self.pid()
        out: dict[str, Any] = {"name": self.spec.name, "pid": pid,
                               "state": "started by gpucap" if self.started else "found running",
                               "rss_mib": process_tree_rss_mib(pid)}
        if probe is not None and probe.kind == "nvml" and pid is not None:
            out["device_mib"] = probe.device(tree_pids(pid)).server_mib
        if self.load is not None:
            out["load"] = self.load.counts()
        return out

    def stop(self) -> None:
        if self.load is not None:
            self.load.stop()
        if self.process is not None:
            self.process.stop()


def bring_up(spec: CotenantSpec, log_dir: Path, owner_token: str) -> Cotenant:
    """Leave a running co-tenant alone; start one that is down and wait for its health URL."""
    if is_up(spec.health):
        cotenant = Cotenant(spec)
    else:
        if not spec.health.url:
            raise ServerError(f"co-tenant {spec.name!r}: the plugin starts co-tenants only with a health URL")
        proc = ManagedProcess(spec.argv, log_dir / f"cotenant-{spec.name}.log", {**os.environ, **dict(spec.env)},
                              owner_token)
        proc.start()
        try:
            boot = wait_healthy(proc, spec.health.url, spec.timeout_s, what=f"co-tenant {spec.name!r}")
        except BaseException:
            proc.stop()
            raise
        cotenant = Cotenant(spec, proc, boot)
    if spec.load is not None:
        cotenant.load = LoadLoop(spec.load.url, spec.load.every_s, spec.load.body).start()
    return cotenant


@dataclass
class LoadLoop:
    """A background thread sending the co-tenant's light load: one request every ``every_s``."""

    url: str
    every_s: float
    body: str
    sent: int = 0
    failed: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "LoadLoop":
        self._thread = threading.Thread(target=self._run, name="gpucap-cotenant-load", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(timeout=30.0) as client:
            while True:
                try:
                    ok = client.post(self.url, content=self.body,
                                     headers={"Content-Type": "application/json"}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.sent += 1
                self.failed += 0 if ok else 1
                if self._stop.wait(self.every_s):
                    return

    def counts(self) -> dict[str, int]:
        return {"sent": self.sent, "failed": self.failed}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=35)
