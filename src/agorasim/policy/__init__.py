"""Recommender policies and their registry.

``POLICIES`` maps a config name to a policy class; ``make_policy`` builds one from config
parameters. A new policy registers itself with ``register_policy`` (or by adding to the dict) and
passes ``agorasim.env.conformance.check_policy``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, ValidationError, create_model

from agorasim.policy.base import Policy, RecommendRequest, ScoringPolicy, top_k
from agorasim.policy.baselines import PopularityPolicy, RandomPolicy, RefittingPolicy
from agorasim.policy.bpr import BPRPolicy
from agorasim.policy.generative import GenerativePolicy
from agorasim.policy.grc import GRCPolicy
from agorasim.policy.observation import CatalogueView, LogView, Observation
from agorasim.policy.params import PolicyParams
from agorasim.policy.sasrec import SASRecPolicy

POLICIES: dict[str, type[Policy]] = {
    "random": RandomPolicy,
    "popularity": PopularityPolicy,
    "bpr": BPRPolicy,
    "sasrec": SASRecPolicy,
    "generative": GenerativePolicy,
    "grc": GRCPolicy,
}


def register_policy(name: str, cls: type[Policy]) -> None:
    """Make ``cls`` available to configs as ``name``."""
    if name in POLICIES and POLICIES[name] is not cls:
        raise ValueError(f"policy name {name!r} is already registered to {POLICIES[name].__name__}")
    POLICIES[name] = cls


def params_model(name: str) -> type[PolicyParams]:
    """The parameter model of policy ``name``: its ``Params``, or (a policy registered without
    one) a model of its constructor's keyword arguments, with their defaults."""
    cls = POLICIES[name]
    model = getattr(cls, "Params", None) or _signature_models.get(cls)
    if model is None:
        signature = inspect.signature(cls.__init__)
        fields = {p.name: (Any, Field(p.default if p.default is not p.empty else ...,
                                      description=f"argument {p.name} of {cls.__name__}"))
                  for p in list(signature.parameters.values())[1:]
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        model = _signature_models[cls] = create_model(f"{cls.__name__}Params", __base__=PolicyParams, **fields)
    return model


_signature_models: dict[type, type[PolicyParams]] = {}


def policy_params(name: str) -> dict[str, object]:
    """Parameters of policy ``name`` and their defaults."""
    return {field: info.default for field, info in params_model(name).model_fields.items()}


def parse_policy_params(name: str, params: Mapping | BaseModel | None) -> PolicyParams:
    """``params`` validated by policy ``name``'s model; the first problem is one ``ValueError`` line
    that names the policy and the field."""
    if name not in POLICIES:
        raise ValueError(f"policy: unknown name {name!r}; allowed: {', '.join(sorted(POLICIES))}")
    model = params_model(name)
    if isinstance(params, model):
        return params
    if isinstance(params, BaseModel):
        params = params.model_dump(exclude_unset=True)
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError(f"policy {name!r}: params must be a mapping of parameter: value (got {params!r})")
    unknown = sorted(set(params) - set(model.model_fields))
    if unknown:
        raise ValueError(f"policy {name!r}: unknown parameter(s) {', '.join(map(str, unknown))}; "
                         f"allowed: {', '.join(model.model_fields) or '(none)'}")
    try:
        return model.model_validate(dict(params))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(f"policy {name!r}: {where}: {first['msg']} (got {first.get('input')!r})") from None


def make_policy(name: str, params: PolicyParams | None = None, /, **kwargs) -> Policy:
    """Build policy ``name`` from a parameter model or from keyword parameters; bad names and
    values are explained in one line."""
    if params is not None and kwargs:
        raise TypeError("make_policy: give a parameter model or keyword parameters, not both")
    typed = parse_policy_params(name, params if params is not None else kwargs)
    return POLICIES[name](**{field: getattr(typed, field) for field in type(typed).model_fields})


from agorasim.policy.mindrec import MindRecPolicy  # noqa: E402 - registers after the registry exists

register_policy("mindrec", MindRecPolicy)

__all__ = [
    "CatalogueView",
    "LogView",
    "Observation",
    "POLICIES", "BPRPolicy", "MindRecPolicy", "Policy", "PopularityPolicy", "RandomPolicy", "RecommendRequest",
    "PolicyParams", "RefittingPolicy", "SASRecPolicy", "ScoringPolicy", "make_policy", "params_model",
    "parse_policy_params", "policy_params",
    "register_policy", "top_k",
]
