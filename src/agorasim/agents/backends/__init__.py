"""User-agent backends behind one batched protocol.

``utility`` is the vectorised choice model; ``fake``, ``hf``, ``vllm`` and ``openai`` are
language-model user agents (``llm.py``) over the text engine of that name, ``fake`` being a
deterministic canned-text engine for tests. ``FakeBackend`` is an array-level test double.
"""

from agorasim.agents.backends.base import SlateRequest, UserBackend
from agorasim.agents.backends.fake import FakeBackend
from agorasim.agents.backends.llm import LLMUserBackend, is_llm_user
from agorasim.agents.backends.utility import UtilityBackend


def make_backend(name: str, users_cfg, engines=None, llm_cfg=None, seed: int = 0) -> UserBackend:
    """The user backend ``name``; language-model backends take their engine from ``engines``."""
    if name == "utility":
        return UtilityBackend(users_cfg)
    if name in ("fake", "hf", "vllm", "openai"):
        if engines is None:
            raise ValueError(f"user backend {name!r} needs the market's engines")
        return LLMUserBackend(engines.get(name), users_cfg, llm_cfg, seed)
    raise ValueError(f"unknown user backend {name!r}")


__all__ = ["SlateRequest", "UserBackend", "FakeBackend", "UtilityBackend", "LLMUserBackend", "is_llm_user",
           "make_backend"]
