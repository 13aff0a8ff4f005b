"""The platform agent: re-rankers that build the final slate, and the exposure ledger they read.

``make_reranker(name, **params)`` builds one by its config name (keys of ``RERANKERS``).
"""

from __future__ import annotations

import inspect

from agorasim.platform.base import Reranker, RerankRequest, take_columns
from agorasim.platform.conformance import check_reranker
from agorasim.platform.ledger import ExposureLedger
from agorasim.platform.rerankers import (
    ControllerReranker,
    MMRReranker,
    NewItemBoost,
    NoRerank,
    TriRecReranker,
)

RERANKERS: dict[str, type[Reranker]] = {
    "none": NoRerank,
    "trirec": TriRecReranker,
    "controller": ControllerReranker,
    "mmr": MMRReranker,
    "new-item-boost": NewItemBoost,
}


def reranker_params(name: str) -> list[str]:
    """The parameter names the re-ranker ``name`` accepts (for config validation)."""
    cls = _lookup(name)
    params = _named_params(cls)
    # a wrapper (the controller) passes **params on to the re-ranker it wraps
    inner = getattr(cls, "forwards_to", None)
    if inner is not None:
        params += [p for p in _named_params(inner) if p not in params and p != "fairness_weight"]
    return params


def make_reranker(name: str, **params) -> Reranker:
    """Build the re-ranker registered as ``name`` with ``params``.

    Raises:
        ValueError: unknown name or parameter (the message lists the allowed ones), or a
            parameter value out of range.
    """
    cls = _lookup(name)
    allowed = reranker_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"reranker {name!r} got unknown parameter(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed) or '(none)'}")
    return cls(**params)


def _lookup(name: str) -> type[Reranker]:
    if name not in RERANKERS:
        raise ValueError(f"unknown reranker {name!r}; allowed: {', '.join(RERANKERS)}")
    return RERANKERS[name]


def _named_params(cls: type) -> list[str]:
    signature = inspect.signature(cls.__init__)
    return [p.name for p in signature.parameters.values()
            if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


__all__ = [
    "RERANKERS",
    "ControllerReranker",
    "ExposureLedger",
    "MMRReranker",
    "NewItemBoost",
    "NoRerank",
    "RerankRequest",
    "Reranker",
    "TriRecReranker",
    "check_reranker",
    "make_reranker",
    "take_columns",
    "reranker_params",
]
