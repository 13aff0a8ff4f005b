"""Text engines behind the language-model agents (see ``base.py``)."""

from __future__ import annotations

from pathlib import Path

from agorasim.agents.engines.base import ChatRequest, ChatResponse, Engine, Message, Meter, fill_memo
from agorasim.agents.engines.cache import CachedEngine

ENGINES = ("fake", "hf", "vllm", "openai")


def build_engine(kind: str, llm_cfg) -> Engine:
    """The raw engine of ``kind`` (imports its library only when built)."""
    if kind == "fake":
        from agorasim.agents.engines.fake import FakeEngine
        return FakeEngine()
    if kind == "hf":
        from agorasim.agents.engines.hf import HFEngine
        return HFEngine(llm_cfg.model, batch_size=llm_cfg.batch_size, dtype=llm_cfg.dtype, threads=llm_cfg.threads or None)
    if kind == "vllm":
        from agorasim.agents.engines.vllm import VLLMEngine
        return VLLMEngine(llm_cfg)
    if kind == "openai":
        from agorasim.agents.engines.openai import OpenAIEngine
        return OpenAIEngine(llm_cfg)
    raise ValueError(f"unknown engine {kind!r}; expected one of {ENGINES}")


class EngineFactory:
    """Builds the engine of ``kind`` on first use (a plain class, so a checkpoint holding it can be
    read back by the allow-list unpickler, which refuses ``functools.partial``)."""

    def __init__(self, kind: str, llm_cfg):
        self.kind, self.llm_cfg = kind, llm_cfg

    def __call__(self) -> Engine:
        return build_engine(self.kind, self.llm_cfg)


class Engines:
    """One cached engine per kind, shared by every role that uses it (one model in memory).

    Args:
        llm_cfg: ``agents.llm``; cache_cfg: ``agents.cache``.
        cache_path: the response store (``agents.cache.path`` or the run folder's default).
    """

    def __init__(self, llm_cfg, cache_cfg, cache_path: Path | None = None):
        self.llm_cfg, self.cache_cfg = llm_cfg, cache_cfg
        self.cache_path = Path(cache_cfg.path) if cache_cfg.path else cache_path
        self._engines: dict[str, CachedEngine] = {}

    def get(self, kind: str) -> CachedEngine:
        if kind not in self._engines:
            # the cache key names what changes the answers: hf's weights dtype is part of the model
            model = f"{self.llm_cfg.model}:{self.llm_cfg.dtype}" if kind == "hf" else self.llm_cfg.model
            self._engines[kind] = CachedEngine(EngineFactory(kind, self.llm_cfg), kind, model,
                                               self.cache_cfg.mode, self.cache_path)
        return self._engines[kind]

    def set_default_path(self, path: Path) -> None:
        """Where the store goes when ``agents.cache.path`` is not set (the run folder)."""
        if self.cache_cfg.path is None:
            self.cache_path = Path(path)
            for engine in self._engines.values():
                if engine._store is None:
                    engine.path = self.cache_path

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()


__all__ = ["ChatRequest", "ChatResponse", "Engine", "Message", "Meter", "fill_memo", "CachedEngine", "Engines",
           "build_engine", "ENGINES"]
