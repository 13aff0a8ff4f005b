"""Recommender policies and their registry.

``POLICIES`` maps a config name to a policy class; ``make_policy`` builds one from config
parameters. A new policy registers itself with ``register_policy`` (or by adding to the dict) and
passes ``agorasim.env.conformance.check_policy``.
"""

from __future__ import annotations

import inspect

from pydantic import ValidationError

from agorasim.policy.base import Policy, RecommendRequest, ScoringPolicy, top_k
from agorasim.policy.baselines import PopularityPolicy, RandomPolicy, RefittingPolicy
from agorasim.policy.bpr import BPRPolicy
from agorasim.policy.generative import GenerativePolicy
from agorasim.policy.observation import CatalogueView, LogView, Observation
from agorasim.policy.sasrec import SASRecPolicy

POLICIES: dict[str, type[Policy]] = {
    "random": RandomPolicy,
    "popularity": PopularityPolicy,
    "bpr": BPRPolicy,
    "sasrec": SASRecPolicy,
    "generative": GenerativePolicy,
}


def register_policy(name: str, cls: type[Policy]) -> None:
    """Make ``cls`` available to configs as ``name``."""
    if name in POLICIES and POLICIES[name] is not cls:
        raise ValueError(f"policy name {name!r} is already registered to {POLICIES[name].__name__}")
    POLICIES[name] = cls


def policy_params(name: str) -> dict[str, object]:
    """Parameters of policy ``name`` and their defaults: its ``Params`` model's fields, or (a
    policy registered without one) its constructor's."""
    model = getattr(POLICIES[name], "Params", None)
    if model is not None:
        return {field: info.default for field, info in model.model_fields.items()}
    signature = inspect.signature(POLICIES[name].__init__)
    return {p.name: p.default for p in list(signature.parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def make_policy(name: str, **params) -> Policy:
    """Build policy ``name`` with constructor ``params``; bad names are explained in one line."""
    if name not in POLICIES:
        raise ValueError(f"policy: unknown name {name!r}; allowed: {', '.join(sorted(POLICIES))}")
    allowed = policy_params(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"policy {name!r}: unknown parameter(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(allowed) or '(none)'}")
    model = getattr(POLICIES[name], "Params", None)
    if model is not None:
        try:
            params = model.model_validate(params).model_dump()
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"policy {name!r}: {where}: {first['msg']} (got {first.get('input')!r})") from None
    return POLICIES[name](**params)


__all__ = [
    "CatalogueView",
    "LogView",
    "Observation",
    "POLICIES", "BPRPolicy", "Policy", "PopularityPolicy", "RandomPolicy", "RecommendRequest",
    "RefittingPolicy", "SASRecPolicy", "ScoringPolicy", "make_policy", "policy_params",
    "register_policy", "top_k",
]
