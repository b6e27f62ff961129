"""The async streaming client: one ``aiohttp.ClientSession`` sized to the concurrency.

Every request is timed from its *scheduled* send time, so client-side queueing is never hidden.
Chunks are not tokens (llama-server merges incomplete UTF-8 into later chunks): token counts come
from the server's ``usage``. To leave the CPU to the server it measures, the client parses JSON only
for the chunks that carry usage or an error; other chunks get a cheap structural check. With
``keep_text`` (agent workflows, whose history holds the server's reply) the raw payloads are kept in
the hot loop and decoded in one ``json.loads`` after the stream ends.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import aiohttp


class ErrorClass(str, Enum):
    CONNECT = "connect"
    TIMEOUT = "timeout"
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    STREAM_CUT = "stream_cut"
    MALFORMED = "malformed_chunk"
    SERVER_ERROR = "server_error"
    CANCELLED = "cancelled_at_deadline"
    STALLED = "stalled"


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
    thinking: bool = False  # the request asked for thinking (enable_thinking)
    compactions: int = 0  # history compactions done before this turn (agent workflows)
    # keep_text only: the decoded reply, and when its first reasoning / content text arrived
    text: str | None = None
    reasoning_text: str | None = None
    first_reasoning: float | None = None
    first_text: float | None = None
    reasoning_tokens: int | None = None  # usage.completion_tokens_details, else reasoning chunks

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None

    @property
    def progress_at(self) -> float:
        """When this turn last received anything (or was sent): what a stall is measured from."""
        return max(self.chunk_times[-1] if self.chunk_times else 0.0, self.headers or 0.0, self.sent)

    @property
    def e2e_s(self) -> float | None:
        return self._since_scheduled(self.end)

    @property
    def ttft_s(self) -> float | None:
        return self._since_scheduled(self.first_content)

    @property
    def ttft_reasoning_s(self) -> float | None:
        return self._since_scheduled(self.first_reasoning)

    @property
    def ttft_text_s(self) -> float | None:
        """First *content* token (after any reasoning): what a user of a thinking model waits for."""
        return self._since_scheduled(self.first_text)

    def _since_scheduled(self, t: float | None) -> float | None:
        """Seconds from the scheduled send to ``t`` (None: it never happened)."""
        return None if t is None else t - self.scheduled

    @property
    def itl_s(self) -> list[float]:
        """Gaps between data chunks (chunks, not tokens: llama-server merges incomplete UTF-8)."""
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

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
    """One verifying context shared by every client: building one costs ~30 ms of CPU, which the
    agent-connection ramp would otherwise pay per client."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        try:
            import certifi

            _SSL_CONTEXT = ssl.create_default_context(cafile=certifi.where())
        except ImportError:
            _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


async def sleep_until(when: float) -> None:
    """Sleep to a monotonic time, never waking early: uvloop rounds timers to the millisecond, and a
    turn must not be sent before its scheduled time (nor before its injected RTT has passed)."""
    while (left := when - time.monotonic()) > 0:
        await asyncio.sleep(left + 0.0005)


def _dumps(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"))


class StreamingClient:
    """OpenAI-compatible ``/v1/chat/completions`` with ``stream: true`` and usage in the last chunk.

    The load path runs on aiohttp (its C HTTP parser) because the client's CPU per token caps what it
    can measure: measured at about a third of httpx's cost per streamed token (tests/test_client_benchmark.py).
    Connections are not reused: llama-server closes a kept-alive socket after a streamed response,
    and a reused socket then fails the next request (see FINDINGS); a fresh connection per request
    loses none and cost no more CPU per token than reuse when measured. A stream that receives nothing
    for ``stall_s`` ends as ``stalled``.
    """

    def __init__(self, base_url: str, concurrency: int, timeout_s: float = 900.0, rtt_s: float = 0.0,
                 api_key: str | None = None, model: str = "gpucap", stall_s: float | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.concurrency = max(1, concurrency)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s
        self.stall_s = stall_s
        self.rtt_s = rtt_s
        self.model = model
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        """The session is made on first use: aiohttp binds it to the running event loop."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.concurrency, force_close=True, ssl=_ssl_context(),
                                             ttl_dns_cache=None)
            timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=30.0, sock_read=self.stall_s)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=self.headers,
                                                  skip_auto_headers=("User-Agent",), json_serialize=_dumps)
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> "StreamingClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def chat(self, rec: RequestRecord, messages: list[dict[str, str]], max_tokens: int,
                   thinking: bool = True, extra: dict[str, Any] | None = None,
                   keep_text: bool = False) -> RequestRecord:
        """Send one streamed turn and fill ``rec``; never raises for server or network faults.
        ``keep_text``: also decode the reply (``rec.text``, ``rec.reasoning_text``) and split TTFT into
        first reasoning and first content text; a failed turn keeps what arrived."""
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True,
            "chat_template_kwargs": {"enable_thinking": thinking},
        }
        if extra:
            body.update(extra)
        rec.thinking = thinking
        payloads: list[bytes] | None = [] if keep_text else None
        session = self._open()
        try:
            if self.rtt_s:  # inside the try: a turn cut at the deadline during its RTT is cancelled, not failed
                await sleep_until(time.monotonic() + self.rtt_s)
            rec.sent = time.monotonic()
            async with session.post(self.base_url + "/v1/chat/completions", json=body) as resp:
                rec.status = resp.status
                rec.headers = time.monotonic()
                if resp.status >= 400:
                    text = await resp.text(errors="replace")
                    rec.error = ErrorClass.HTTP_5XX if resp.status >= 500 else ErrorClass.HTTP_4XX
                    rec.detail = text[:300]
                    return rec
                await self._read_stream(resp.content, rec, payloads)
        except aiohttp.SocketTimeoutError as exc:  # sock_read: nothing received for stall_s
            rec.error, rec.detail = ErrorClass.STALLED, f"nothing received for {self.stall_s:g} s ({exc!r})"
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            rec.error, rec.detail = ErrorClass.CONNECT, repr(exc)
        except asyncio.TimeoutError as exc:  # the turn's total budget (request_timeout_s)
            rec.error, rec.detail = ErrorClass.TIMEOUT, repr(exc)
        except (aiohttp.ClientError, ConnectionError) as exc:  # reset, disconnected, payload cut, ...
            rec.error = ErrorClass.CONNECT if rec.status is None else ErrorClass.STREAM_CUT
            rec.detail = repr(exc)
        except asyncio.CancelledError:
            if rec.sent and self.stall_s is not None and time.monotonic() - rec.progress_at >= self.stall_s:
                rec.error, rec.detail = ErrorClass.STALLED, f"no progress for {self.stall_s:g} s at the run deadline"
            else:
                rec.error, rec.detail = ErrorClass.CANCELLED, "run deadline"
            raise
        finally:
            if payloads is not None:
                decode_text(payloads, rec)
        return rec

    async def _read_stream(self, content: aiohttp.StreamReader, rec: RequestRecord,
                           payloads: list[bytes] | None = None) -> None:
        """Raw chunks, split into SSE events; JSON is parsed only for the tail (usage, finish, error)."""
        buf = b""
        done = False
        chunk_times = rec.chunk_times
        monotonic = time.monotonic
        while True:
            data = await content.readany()
            if not data:
                break
            now = monotonic()
            if buf:
                data = buf + data
            events = data.split(b"\n\n")
            buf = events.pop()
            for event in events:
                if not event.startswith(b"data: {"):
                    event = event.strip()
                    if not event or event.startswith(b":"):
                        continue  # keep-alive blank line or SSE comment
                    if event == b"data: [DONE]":
                        done = True
                        continue
                    if not event.startswith(b"data: "):
                        rec.error, rec.detail = ErrorClass.MALFORMED, event[:200].decode("utf-8", "replace")
                        return
                payload = event[6:].rstrip()
                if not (payload.startswith(b"{") and payload.endswith(b"}")):
                    rec.error, rec.detail = ErrorClass.MALFORMED, payload[:200].decode("utf-8", "replace")
                    return
                chunk_times.append(now)
                if payloads is not None:
                    payloads.append(payload)
                if rec.first_content is None:
                    # llama-server sends the role-only first chunk together with the first token
                    # (measured <= 0.04 ms apart), while random-weight output may hold back content
                    # chunks for incomplete UTF-8; the first data chunk is the fair TTFT mark.
                    rec.first_content = now
                if b'"usage"' in payload or b'"error"' in payload or b'"finish_reason":"' in payload:
                    if not self._parse_tail(payload, rec):
                        return
        rec.end = monotonic()
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
        if usage and (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") is not None:
            rec.reasoning_tokens = usage["completion_tokens_details"]["reasoning_tokens"]
        return True


def decode_text(payloads: list[bytes], rec: RequestRecord) -> None:
    """The reply's content and reasoning text from the kept payloads (one ``json.loads`` for all), and
    the times of the first chunk of each (payloads line up with ``chunk_times``). Reasoning comes as
    ``delta.reasoning_content`` (llama-server with a thinking template, vLLM) or ``delta.reasoning``;
    without ``usage`` reasoning tokens, the reasoning chunks are counted instead."""
    try:
        chunks = json.loads(b"[" + b",".join(payloads) + b"]")
    except ValueError:
        chunks = []
        for payload in payloads:  # one bad chunk (already recorded as malformed) must not lose the rest
            try:
                chunks.append(json.loads(payload))
            except ValueError:
                chunks.append({})
    text: list[str] = []
    reasoning: list[str] = []
    for i, chunk in enumerate(chunks):
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            content = delta.get("content")
            thought = delta.get("reasoning_content") or delta.get("reasoning")
            if content:
                text.append(content)
                if rec.first_text is None and i < len(rec.chunk_times):
                    rec.first_text = rec.chunk_times[i]
            if thought:
                reasoning.append(thought)
                if rec.first_reasoning is None and i < len(rec.chunk_times):
                    rec.first_reasoning = rec.chunk_times[i]
    rec.text, rec.reasoning_text = "".join(text), "".join(reasoning)
    if rec.reasoning_tokens is None and reasoning:
        rec.reasoning_tokens = len(reasoning)
