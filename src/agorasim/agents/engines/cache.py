"""Record and replay of language-model responses.

The key is a hash of backend, model, prompt, sampling parameters and seed (``ChatRequest.key``).
``record`` answers hits from the store and appends every new response to a JSONL file (one line
per response, flushed as written, so a killed run keeps what it paid for); ``replay`` answers
only from the store and never builds the engine, so a replayed run needs no model. Failed calls
(``error`` set: a server down, a timeout) are stored too: ``replay`` gives them back as they
happened, so the run falls back to the utility model exactly where the recorded run did, while
``record`` asks them again (a later line for the same key replaces the earlier one). A replay miss
is a one-line ``UserInputError``: the store does not belong to this configuration.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from agorasim.agents.engines.base import ChatRequest, ChatResponse, Engine
from agorasim.errors import UserInputError


class CachedEngine(Engine):
    """Wraps an engine factory with a response store.

    Args:
        factory: builds the real engine; called at the first miss (never in ``replay``).
        backend, model: the names the keys are made of.
        mode: ``off`` | ``record`` | ``replay``.
        path: the JSONL store.
    """

    CHUNK = 256  # requests generated (and written) at a time when recording

    def __init__(self, factory: Callable[[], Engine], backend: str, model: str, mode: str, path: Path | None):
        self.factory, self.backend, self.model, self.mode = factory, backend, model, mode
        self.path = Path(path) if path is not None else None
        self._engine: Engine | None = None
        self._store: dict[str, dict] | None = None

    @property
    def store(self) -> dict[str, dict]:
        """The responses on disk, read at first use (the run folder may be set after building)."""
        if self._store is None:
            if self.path is None:
                raise UserInputError(f"agents.cache.mode={self.mode} needs agents.cache.path")
            self._store = load_store(self.path, must_exist=self.mode == "replay")
        return self._store

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self.factory()
            self._engine.set_progress(self.progress)
        return self._engine

    def set_progress(self, callback) -> None:
        super().set_progress(callback)
        if self._engine is not None:
            self._engine.set_progress(callback)

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        if self.mode == "off":
            return self.engine.generate(requests)
        keys = [r.key(self.backend, self.model) for r in requests]
        out: list[ChatResponse | None] = [None] * len(requests)
        missing = []
        for i, key in enumerate(keys):
            entry = self.store.get(key)
            # a stored failure is replayed as it happened, but asked again when recording
            if entry is not None and (self.mode == "replay" or entry.get("error") is None):
                out[i] = ChatResponse(**entry, cached=True)
            else:
                missing.append(i)
        if self.progress is not None and len(requests) > len(missing):
            self.progress(len(requests) - len(missing))  # answered from the store
        if missing and self.mode == "replay":
            raise UserInputError(
                f"agents.cache replay: {len(missing)} of {len(requests)} responses are not in {self.path} "
                f"(it was recorded with another model, prompt or seed); record it again with agents.cache.mode=record")
        for start in range(0, len(missing), self.CHUNK):  # written chunk by chunk: a killed run keeps them
            chunk = missing[start:start + self.CHUNK]
            fresh = self.engine.generate([requests[i] for i in chunk])
            with open(self.path, "a") as f:
                for i, response in zip(chunk, fresh):
                    out[i] = response
                    entry = response.model_dump(exclude={"cached"})
                    self.store[keys[i]] = entry  # a later line for the same key replaces an earlier one
                    f.write(json.dumps({"key": keys[i], **entry}) + "\n")
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()

    def __getstate__(self):  # checkpoints never hold model weights or connections
        state = self.__dict__.copy()
        state["_engine"] = None
        state["_store"] = None
        return state


def load_store(path: Path, must_exist: bool) -> dict[str, dict]:
    """Key -> response fields. A torn last line (a run killed mid-write) is cut off."""
    if not path.exists():
        if must_exist:
            raise UserInputError(f"agents.cache.path {path} does not exist (nothing to replay)")
        path.parent.mkdir(parents=True, exist_ok=True)
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):  # a run killed mid-write: drop the torn tail
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
    store = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
                key = entry.pop("key")
                ChatResponse(**entry)
            except (ValueError, KeyError, TypeError):
                raise UserInputError(f"agents.cache.path {path}: line {n} is not a cached response") from None
            store[key] = entry
    return store
