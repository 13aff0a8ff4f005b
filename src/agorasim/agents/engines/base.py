"""Text engines: the language models behind the language-model agents, behind one batched call.

An engine turns a batch of chat requests into completions. It knows nothing of users or items:
the agents render prompts and parse answers (``agents/prompts.py``, ``agents/backends/llm.py``).
Implementations: ``fake`` (deterministic canned text), ``hf`` (transformers, the embedded
SmolLM2-135M-Instruct by default), ``vllm`` (offline ``LLM`` engine) and ``openai`` (any
OpenAI-compatible HTTP server). ``CachedEngine`` (``cache.py``) wraps any of them to record and
replay responses, and ``Meter`` counts calls, tokens, latency and price per role and round.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator


def one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line of at most ``limit`` characters (error messages in responses)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GuideSegment(BaseModel):
    """One piece of a guided answer: forced ``text``, one of ``choices``, or up to ``free``
    characters of free text (no quote, backslash or newline) ended by ``stop`` (then emitted)."""

    text: str | None = None
    choices: list[str] | None = None
    free: int | None = Field(None, ge=1)
    stop: str = '"'

    @model_validator(mode="after")
    def _one_kind(self):
        if sum(x is not None for x in (self.text, self.choices, self.free)) != 1:
            raise ValueError("a guide segment is exactly one of text, choices or free")
        return self


_REGEX_SPECIAL = re.compile(r"([\\.^$*+?{}\[\]|()])")


def _literal(text: str) -> str:
    """``text`` as a regex literal: only the metacharacters escaped (grammar engines read plain
    regex syntax, not Python's extensions such as an escaped space)."""
    return _REGEX_SPECIAL.sub(r"\\\1", text)


def guide_regex(guide: list[GuideSegment]) -> str:
    """The guide as a regular expression, for engines that constrain decoding by regex (vLLM):
    forced text literally, choices as alternatives, free text as at most ``free`` characters
    without quotes, backslashes or newlines (what the hf engine's token masks allow), then the
    stop text."""
    parts = []
    for seg in guide:
        if seg.text is not None:
            parts.append(_literal(seg.text))
        elif seg.choices is not None:
            parts.append("(" + "|".join(_literal(c) for c in seg.choices) + ")")
        else:
            parts.append(r'[^"\\\n]' + f"{{0,{seg.free}}}" + _literal(seg.stop))
    return "".join(parts)


class ChatRequest(BaseModel):
    """One chat completion to produce.

    Structured decoding, where the engine has it: ``guide`` (a template of forced text, choices
    and bounded free text, which fits ``json_schema``) for engines that can follow it, hf by token
    masks and vllm as a regex (``guide_regex``); ``json_schema`` for the rest (openai servers that
    accept ``response_format``). Engines without either ignore them and the caller validates.
    ``seed`` makes sampling reproducible per request (ignored when ``temperature`` is 0: greedy
    decoding).
    """

    messages: list[Message]
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    json_schema: dict[str, Any] | None = None
    guide: list[GuideSegment] | None = None

    def key(self, backend: str, model: str) -> str:
        """Cache key: backend, model, prompt, sampling parameters and seed."""
        payload = json.dumps({"backend": backend, "model": model, **self.model_dump()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


class ChatResponse(BaseModel):
    """What came back. ``error`` is set (and ``text`` empty) when the engine could not answer
    (server down, timeout): the caller treats it like malformed output, never as a crash."""

    text: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    latency_s: float = 0.0
    error: str | None = None
    cached: bool = False


class Engine(ABC):
    """A batched text generator. ``backend`` and ``model`` name it in cache keys and reports."""

    backend = "engine"
    model = ""
    progress: Callable[[int], None] | None = None  # told how many requests each finished batch held

    def set_progress(self, callback: Callable[[int], None] | None) -> None:
        """Report finished requests to ``callback`` as batches complete: the HF engine calls it per
        batch and the response store per lookup; for the others the caller counts what
        ``generate`` returned."""
        self.progress = callback

    @abstractmethod
    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        """One response per request, in order. Must not raise on a bad answer or a failed call:
        return a response with ``error`` set instead."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release processes or connections (servers, engines)."""


class Meter:
    """Calls, tokens, latency and price of one role, accumulated until ``flush``.

    Args:
        price_in, price_out: price per million input / output tokens (0: not priced).
    """

    def __init__(self, role: str, price_in: float = 0.0, price_out: float = 0.0):
        self.role = role
        self.price_in, self.price_out = price_in, price_out
        self.totals = {"calls": 0, "tokens_in": 0, "tokens_out": 0, "cache_hits": 0, "errors": 0}
        self.latency_s = 0.0
        self._round = dict(self.totals)
        self._latency = 0.0

    def add(self, responses: list[ChatResponse]) -> None:
        for r in responses:
            self._round["calls"] += 1
            self._round["tokens_in"] += r.tokens_in
            self._round["tokens_out"] += r.tokens_out
            self._round["cache_hits"] += int(r.cached)
            self._round["errors"] += int(r.error is not None)
            if not r.cached:  # a replayed answer cost this run no model time
                self._latency += r.latency_s

    def flush(self) -> tuple[dict[str, float], dict[str, float]]:
        """(metrics, timings) of the round so far, then reset. Metrics hold only what the
        simulation determines (calls, tokens, errors, price), so the same seed gives the same
        metrics.csv whether the answers were generated or replayed from the cache; latency
        (wall-clock) and cache hits (what this machine had stored) go to timings.csv."""
        r, prefix = self._round, f"llm/{self.role}/"
        metrics = {prefix + k: float(v) for k, v in r.items() if k != "cache_hits"}
        if self.price_in or self.price_out:
            metrics[prefix + "cost_usd"] = (r["tokens_in"] * self.price_in + r["tokens_out"] * self.price_out) / 1e6
        timings = {prefix + "latency_s": self._latency, prefix + "cache_hits": float(r["cache_hits"])}
        for k, v in r.items():
            self.totals[k] += v
        self.latency_s += self._latency
        self._round = {k: 0 for k in self.totals}
        self._latency = 0.0
        return metrics, timings


def fill_memo(engine: Engine, meter: Meter, memo: dict, todo: dict, limit: int, clean: Callable[[str], str]) -> None:
    """Answer the requests ``todo`` (key -> ChatRequest) in one batched ``generate`` call, metered,
    into ``memo`` (key -> ``clean(text)``, or None for a failed or empty answer, so the caller falls
    back); ``memo`` is emptied first when it would grow past ``limit`` entries."""
    if not todo:
        return
    if len(memo) + len(todo) > limit:
        memo.clear()
    responses = engine.generate(list(todo.values()))
    meter.add(responses)
    for key, response in zip(todo, responses):
        memo[key] = clean(response.text.strip().strip('"')) if response.error is None and response.text.strip() else None
