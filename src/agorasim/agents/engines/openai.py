"""Engine for any OpenAI-compatible chat server: ``vllm serve``, the llama.cpp server, OpenAI.

Each request is one ``POST {base_url}/chat/completions`` through a shared ``httpx.Client``. A
batch runs on a thread pool with at most ``llm.concurrency`` requests in flight, and a
``RateLimiter`` spaces request starts by ``1 / llm.rate_limit`` seconds when that is set.
Connection errors, timeouts, HTTP 429 and 5xx are retried ``llm.retries`` times with exponential
backoff (``backoff_s * 2**attempt``, or the server's numeric ``Retry-After`` on a 429, capped);
other 4xx are not retried. Nothing raises: a server that is down, too slow or answers garbage
gives ``ChatResponse(text="", error=...)``, which the agents treat like a malformed answer.
When ``llm.structured`` is on, a request's ``json_schema`` is sent as ``response_format`` so that
servers with guided decoding (vLLM) return valid JSON.

``clock`` and ``sleep`` are injectable so tests can check rate limiting and backoff without
waiting; ``client`` is injectable too (and then left open by ``close``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from agorasim.agents.engines.base import ChatRequest, ChatResponse, Engine, one_line

RETRY_AFTER_CAP_S = 30.0


class RateLimiter:
    """At most ``rate`` starts per second, evenly spaced; thread-safe. ``rate <= 0``: no limit.

    Each ``wait`` reserves the next free start slot under a lock, then sleeps until it.
    """

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._next: float | None = None

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            start = now if self._next is None else max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


class OpenAIEngine(Engine):
    """Chat completions from an OpenAI-compatible HTTP server.

    Args:
        cfg: ``agents.llm`` (``LLMConfig``): model, base_url, api_key_env, timeout_s, retries,
            backoff_s, concurrency, rate_limit, structured.
        client: an ``httpx.Client`` to use (tests); by default one is created and owned.
        clock, sleep: time source and sleeper for the rate limiter, backoff and latency.
    """

    backend = "openai"

    def __init__(self, cfg, client: httpx.Client | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self.model = cfg.model
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.clock, self.sleep = clock, sleep
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._owns_client = client is None
        self.client = client if client is not None else httpx.Client(
            timeout=cfg.timeout_s, limits=httpx.Limits(max_connections=cfg.concurrency))
        self.limiter = RateLimiter(cfg.rate_limit, clock, sleep)

    def body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body of one chat completion request."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [m.model_dump() for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
        }
        if request.json_schema is not None and self.cfg.structured:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": request.json_schema}}
        return body

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        workers = min(self.cfg.concurrency, len(requests))
        if workers <= 1:
            return [self._complete(r) for r in requests]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-engine") as pool:
            return list(pool.map(self._complete, requests))

    def close(self) -> None:
        """Close the HTTP client if this engine created it (an injected one is left open)."""
        if self._owns_client:
            self.client.close()

    def _complete(self, request: ChatRequest) -> ChatResponse:
        """One request with retries; never raises."""
        start = self.clock()
        try:
            text, tokens_in, tokens_out, error = self._attempts(self.body(request))
        except Exception as e:  # noqa: BLE001 - the engine contract is to never raise
            text, tokens_in, tokens_out, error = "", 0, 0, one_line(f"{type(e).__name__}: {e}")
        return ChatResponse(text=text, tokens_in=tokens_in, tokens_out=tokens_out,
                            latency_s=self.clock() - start, error=error)

    def _attempts(self, body: dict[str, Any]) -> tuple[str, int, int, str | None]:
        """(text, tokens_in, tokens_out, error) after up to ``1 + retries`` attempts."""
        error, delay = "no attempt made", 0.0
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                self.sleep(delay)
            delay = self.cfg.backoff_s * 2 ** attempt  # the wait before the next attempt
            self.limiter.wait()
            try:
                response = self.client.post(self.url, json=body, headers=self.headers, timeout=self.cfg.timeout_s)
            except httpx.TimeoutException:
                error = f"timeout after {self.cfg.timeout_s:g}s"
                continue
            except httpx.UnsupportedProtocol as e:  # a malformed base_url: retrying will not help
                return "", 0, 0, one_line(f"bad url: {e}")
            except httpx.TransportError as e:
                error = one_line(f"connection error: {type(e).__name__}: {e}")
                continue
            status = response.status_code
            if status == 429 or status >= 500:
                error = one_line(f"HTTP {status}: {response.text}")
                if status == 429:
                    delay = _retry_after(response.headers.get("Retry-After"), delay)
                continue
            if status >= 400:
                return "", 0, 0, one_line(f"HTTP {status}: {response.text}")
            return _parse(response)
        return "", 0, 0, error


def _retry_after(value: str | None, default: float) -> float:
    """A numeric ``Retry-After`` in seconds, capped; otherwise ``default``."""
    try:
        return min(max(float(value), 0.0), RETRY_AFTER_CAP_S)
    except (TypeError, ValueError):
        return default


def _parse(response: httpx.Response) -> tuple[str, int, int, str | None]:
    """(text, tokens_in, tokens_out, error) of a 2xx chat completion body."""
    try:
        data = response.json()
        content = data["choices"][0]["message"].get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "", 0, 0, one_line(f"malformed response: {response.text}")
    if not isinstance(content, str):
        return "", 0, 0, one_line(f"malformed response: content is {type(content).__name__}")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return content, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")), None


def _count(value: Any) -> int:
    """A token count from ``usage``; 0 when missing or not a number."""
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0
