"""User-agent backends behind one batched protocol."""

from agorasim.agents.backends.base import SlateRequest, UserBackend
from agorasim.agents.backends.fake import FakeBackend
from agorasim.agents.backends.utility import UtilityBackend


def make_backend(name: str, users_cfg) -> UserBackend:
    if name == "utility":
        return UtilityBackend(users_cfg)
    if name == "fake":
        return FakeBackend()
    raise ValueError(f"unknown user backend {name!r}")


__all__ = ["SlateRequest", "UserBackend", "FakeBackend", "UtilityBackend", "make_backend"]
