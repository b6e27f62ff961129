"""An endpoint that already runs: nothing is started or stopped, only attached to and checked.

When the endpoint is a llama-server, ``/props`` and ``/slots`` are checked against the config (a
mismatch skips: the endpoint is someone else's, not broken), and the listening process, when it is
local and visible, stands in for the server process in memory readings.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import httpx
import psutil

from .base import Backend
from .llamacpp import fetch_state, verify_running
from .process import ServerError

if TYPE_CHECKING:
    from .handle import ServerHandle


class EndpointMismatch(ServerError):
    """The endpoint runs, but not the requested config: a reason to skip, not to fail."""


class External(Backend):
    """A running OpenAI-compatible endpoint (``--gpucap-endpoint URL`` or ``endpoint = "…"``)."""

    name = "external"
    server_name = "endpoint"

    def argv(self, handle: "ServerHandle", port: int) -> list[str]:
        return []

    def start(self, handle: "ServerHandle") -> None:
        cfg = handle.config
        handle.url = (handle.spec.endpoint or cfg.endpoint or "").rstrip("/")
        if not handle.url:
            raise ServerError(f"{cfg.id}: the external backend needs --gpucap-endpoint URL or endpoint = \"...\"")
        t0 = time.monotonic()
        try:
            with httpx.Client(timeout=10.0) as client:
                health = client.get(f"{handle.url}/health")
        except httpx.HTTPError as exc:
            raise ServerError(f"endpoint {handle.url} unreachable: {exc}") from None
        if health.status_code != 200:
            raise ServerError(f"endpoint {handle.url}/health answered {health.status_code}")
        handle.boot_s = time.monotonic() - t0
        handle.external_pid = pid_listening_on(handle.url)
        self.verify(handle)

    def verify(self, handle: "ServerHandle") -> None:
        try:
            handle.props, slots = fetch_state(handle.url)
        except (httpx.HTTPError, ValueError):
            return  # not a llama-server: nothing to verify
        problems = verify_running(handle.config, handle.props, slots)
        if problems:
            raise EndpointMismatch(f"endpoint {handle.url} does not run {handle.config.id}: " + "; ".join(problems))


def pid_listening_on(url: str) -> int | None:
    """PID of the local process listening on the endpoint's port, if it is ours to see."""
    port = httpx.URL(url).port
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except psutil.Error:
        return None
    return None
