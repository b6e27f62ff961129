"""The async streaming client: one ``httpx.AsyncClient`` sized to the concurrency.

Every request is timed from its *scheduled* send time, so client-side queueing is never hidden.
Chunks are not tokens (llama-server merges incomplete UTF-8 into later chunks): token counts come
from the server's ``usage``. To leave the CPU to the server it measures, the client parses JSON only
for the chunks that carry usage or an error; other chunks get a cheap structural check.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import httpx


class ErrorClass(str, Enum):
    CONNECT = "connect"
    TIMEOUT = "timeout"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    STREAM_CUT = "stream_cut"
    MALFORMED = "malformed_chunk"
    SERVER_ERROR = "server_error"
    CANCELLED = "cancelled_at_deadline"


@dataclass
class RequestRecord:
    """One chat turn as the client saw it. Times are ``time.monotonic()`` seconds."""

    agent: int
    role: str
    turn: int
    scheduled: float
    sent: float = 0.0
    headers: float | None = None
    first_content: float | None = None
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    timings: dict[str, Any] | None = None
    finish_reason: str | None = None
    status: int | None = None
    error: ErrorClass | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def e2e_s(self) -> float | None:
        return None if self.end is None else self.end - self.scheduled

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_content is None else self.first_content - self.scheduled

    @property
    def decode_s(self) -> float | None:
        if self.first_content is None or self.end is None:
            return None
        return self.end - self.first_content

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (the first token is excluded by definition)."""
        d, n = self.decode_s, self.completion_tokens
        return d / (n - 1) if d is not None and n and n > 1 else None


_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    """One verifying context shared by every client: httpx builds one per client otherwise (~30 ms
    of CPU each), which the agent-connection ramp (one client per agent, up to 2048 a step) pays per agent."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        try:
            import certifi

            _SSL_CONTEXT = ssl.create_default_context(cafile=certifi.where())
        except ImportError:
            _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


class StreamingClient:
    """OpenAI-compatible ``/v1/chat/completions`` with ``stream: true`` and usage in the last chunk.

    Connections are not reused: llama-server closes a kept-alive socket after a streamed response,
    and a reused socket then fails the next request (see FINDINGS); a fresh connection per request
    loses none.
    """

    def __init__(self, base_url: str, concurrency: int, timeout_s: float = 900.0, rtt_s: float = 0.0,
                 api_key: str | None = None, model: str = "gpucap") -> None:
        limits = httpx.Limits(max_connections=max(1, concurrency), max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=base_url, limits=limits, headers=headers, verify=_ssl_context(),
                                         timeout=httpx.Timeout(timeout_s, connect=30.0))
        self.rtt_s = rtt_s
        self.model = model

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> "StreamingClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def chat(self, rec: RequestRecord, messages: list[dict[str, str]], max_tokens: int,
                   thinking: bool = True, extra: dict[str, Any] | None = None) -> RequestRecord:
        """Send one streamed turn and fill ``rec``; never raises for server or network faults."""
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True,
            "chat_template_kwargs": {"enable_thinking": thinking},
        }
        if extra:
            body.update(extra)
        try:
            if self.rtt_s:  # inside the try: a turn cut at the deadline during its RTT is cancelled, not failed
                await asyncio.sleep(self.rtt_s)
            rec.sent = time.monotonic()
            async with self._client.stream("POST", "/v1/chat/completions", json=body) as resp:
                rec.status = resp.status_code
                rec.headers = time.monotonic()
                if resp.status_code >= 400:
                    await resp.aread()
                    rec.error = ErrorClass.HTTP_5XX if resp.status_code >= 500 else ErrorClass.HTTP_4XX
                    rec.detail = resp.text[:300]
                    return rec
                await self._read_stream(resp, rec)
        except httpx.TimeoutException as exc:
            rec.error, rec.detail = ErrorClass.TIMEOUT, repr(exc)
        except httpx.ConnectError as exc:
            rec.error, rec.detail = ErrorClass.CONNECT, repr(exc)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            rec.error = ErrorClass.CONNECT if rec.status is None else ErrorClass.STREAM_CUT
            rec.detail = repr(exc)
        except asyncio.CancelledError:
            rec.error, rec.detail = ErrorClass.CANCELLED, "run deadline"
            raise
        return rec

    async def _read_stream(self, resp: httpx.Response, rec: RequestRecord) -> None:
        buf = b""
        done = False
        async for data in resp.aiter_bytes():
            now = time.monotonic()
            buf += data
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                event = event.strip()
                if not event:
                    continue
                if not event.startswith(b"data: "):
                    if event.startswith(b":"):
                        continue  # SSE comment
                    rec.error, rec.detail = ErrorClass.MALFORMED, event[:200].decode("utf-8", "replace")
                    return
                payload = event[6:]
                if payload == b"[DONE]":
                    done = True
                    continue
                if not (payload.startswith(b"{") and payload.endswith(b"}")):
                    rec.error, rec.detail = ErrorClass.MALFORMED, payload[:200].decode("utf-8", "replace")
                    return
                rec.chunk_times.append(now)
                if rec.first_content is None:
                    # llama-server sends the role-only first chunk together with the first token
                    # (measured <= 0.04 ms apart), while random-weight output may hold back content
                    # chunks for incomplete UTF-8; the first data chunk is the fair TTFT mark.
                    rec.first_content = now
                if b'"usage"' in payload or b'"error"' in payload or b'"finish_reason":"' in payload:
                    if not self._parse_tail(payload, rec):
                        return
        rec.end = time.monotonic()
        if not done:
            rec.error = ErrorClass.STREAM_CUT
            rec.detail = "stream ended without [DONE]"

    @staticmethod
    def _parse_tail(payload: bytes, rec: RequestRecord) -> bool:
        try:
            chunk = json.loads(payload)
        except ValueError:
            rec.error, rec.detail = ErrorClass.MALFORMED, payload[:200].decode("utf-8", "replace")
            return False
        if "error" in chunk:
            rec.error, rec.detail = ErrorClass.SERVER_ERROR, json.dumps(chunk["error"])[:300]
            return False
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                rec.finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if usage:
            rec.prompt_tokens = usage.get("prompt_tokens")
            rec.completion_tokens = usage.get("completion_tokens")
            rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        if chunk.get("timings"):
            rec.timings = chunk["timings"]
            if rec.cached_tokens is None:
                rec.cached_tokens = rec.timings.get("cache_n")
        return True
