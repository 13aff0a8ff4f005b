"""Typed parameters of each registered policy: what ``policy.params`` may hold, with a description
on every field.

Each policy class names its model as ``Params``. ``policy.params`` in a config is the model of the
policy that ``policy.name`` names (a union discriminated by the name, resolved through the
registry by ``agorasim.policy.parse_policy_params``): it is validated when the config is, with one
line naming the field on bad input, stored as that model (so a run's ``config.yaml`` lists every
parameter the policy was built with) and passed to the constructor as is. A policy registered
without a ``Params`` model gets one built from its constructor's signature.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from agorasim.config import ComponentParams


class PolicyParams(ComponentParams):
    """Base of the policies' parameter models: unknown keys and non-finite numbers are refused."""


class RandomParams(PolicyParams):
    """The random policy has no parameters."""


class RefitParams(PolicyParams):
    refit_every: int = Field(5, ge=1, description="rounds between refits on the log (after rounds "
                             "refit_every - 1, 2 refit_every - 1, ...); policy.refit_every fills it")


class PopularityParams(RefitParams):
    """Click counts as of the last refit."""


class BPRParams(RefitParams):
    """Matrix factorisation trained with the BPR pairwise loss (Rendle et al. 2009)."""

    dim: int = Field(32, ge=1, description="factor dimension")
    lr: float = Field(0.05, gt=0, description="SGD learning rate")
    reg: float = Field(1e-3, ge=0, description="L2 weight on the factors and biases")
    epochs: int = Field(10, ge=1, description="passes over the clicks per refit")
    batch_size: int = Field(1024, ge=1, description="(user, clicked, sampled) triples per step")
    init_std: float = Field(0.1, ge=0, description="standard deviation of the initial factors")


class SASRecParams(RefitParams):
    """Self-attentive sequential recommender (Kang and McAuley 2018)."""

    dim: int = Field(32, ge=1, description="embedding width (a multiple of n_heads)")
    n_blocks: int = Field(2, ge=1, description="transformer blocks")
    n_heads: int = Field(1, ge=1, description="attention heads")
    max_len: int = Field(20, ge=1, description="history window read (market.history_length fills it)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout rate in training")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate")
    epochs: int = Field(3, ge=1, description="passes over the click sequences per refit")
    batch_size: int = Field(128, ge=1, description="sequences per step")
    threads: int | None = Field(1, ge=1, description="torch threads while training (None: torch's default)")


class UpgradeParams(PolicyParams):
    """One model upgrade of the generative policy (PUMA's scenario: the platform replaces its LM)."""

    round: int = Field(..., ge=1, description="first round served by the new model (it is built, SFT-trained on the "
                       "log and the users' prompts migrated after round - 1)")
    hidden: int = Field(..., ge=1, description="width of the new LM (a multiple of heads)")
    layers: int = Field(..., ge=1, description="transformer layers of the new LM")
    heads: int | None = Field(None, ge=1, description="attention heads of the new LM (None: the current model's)")
    seed: int = Field(..., ge=0, description="seed of the new LM's initial weights (a different seed: an "
                      "incompatible model)")


class PumaParams(PolicyParams):
    """Per-user soft prompts and their migration across model upgrades (PUMA, arXiv 2601.12034;
    ``policy/puma.py``). Off by default: the policy then has no prompts and ``upgrades`` swap the
    model only."""

    enabled: bool = Field(False, description="learn one soft prompt per user (rating prediction on the user's "
                          "own ratings) and re-score the served beams by it")
    rescore_weight: float = Field(1.0, ge=0, description="served score = beam log-probability + this x the "
                                  "predicted stars under the user's prompt (users with a trained prompt)")
    ratings_per_user: int = Field(40, ge=2, description="most recent ratings kept per user (the prompts' data)")
    holdout: float = Field(0.2, ge=0, lt=1, description="share of each user's ratings held out of training "
                           "(puma/rmse and the offline protocol read them)")
    prompt_lr: float = Field(1e-2, gt=0, description="Adam learning rate of the prompts and the rating head")
    prompt_epochs: int = Field(15, ge=1, description="epochs of the full prompt training (the first model's, "
                               "and every user's prompt again in the retrain arm; PUMA stage 1: 15)")
    online_epochs: int = Field(1, ge=0, description="epochs each round over the round's visitors' ratings "
                               "(0: prompts frozen between upgrades)")
    batch: int = Field(256, ge=1, description="ratings per optimiser step of prompt and adapter training")
    rating_sft_epochs: int = Field(2, ge=0, description="epochs of population rating SFT of each new LM (no "
                                   "user prompt) before it is frozen, so its rating tokens mean stars")
    arm: Literal["cold", "retrain", "puma", "puma-random"] = Field(
        "puma", description="migration at an upgrade: cold (new prompts, untrained: no personalisation until "
        "visits retrain them), retrain (every user's prompt trained again on the new model), puma (adapter "
        "trained on selected users maps every old prompt), puma-random (the adapter on random users)")
    budget: int = Field(200, ge=1, description="users whose ratings train the adapter (PUMA's user budget)")
    clusters: int = Field(15, ge=1, description="k-means clusters of the source prompts in user selection")
    bins: int = Field(5, ge=1, description="rating-variance bins per cluster in user selection")
    min_per_cluster: int = Field(50, ge=0, description="users taken from every cluster first (at most its size)")
    adapter_hidden: int = Field(256, ge=1, description="hidden width of the adapter's MLPs (the paper: 4096)")
    adapter_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the adapter and the new rating head")
    adapter_epochs: int = Field(20, ge=1, description="epochs over the selected users' ratings")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout of the adapter's MLPs")
    upgrades: list[UpgradeParams] = Field(default_factory=list, description="model upgrades in round order (two: "
                                          "a chained A -> B -> C migration)")

    @model_validator(mode="after")
    def _ordered(self) -> PumaParams:
        rounds = [u.round for u in self.upgrades]
        if rounds != sorted(set(rounds)):
            raise ValueError(f"puma.upgrades: rounds must be strictly increasing, got {rounds}")
        return self


class GenerativeParams(PolicyParams):
    """The generative recommender over semantic item ids, trained in the loop (``rl``)."""

    warmup_rounds: int = Field(10, ge=1, description="rounds served by the popularity behaviour policy before SFT")
    levels: int = Field(3, ge=1, description="residual k-means levels of the semantic ids")
    codebook_size: int = Field(256, ge=1, description="codes per level (capped at a quarter of the catalogue)")
    hidden: int = Field(64, ge=1, description="LM width (a multiple of heads)")
    layers: int = Field(2, ge=1, description="LM transformer layers")
    heads: int = Field(4, ge=1, description="LM attention heads")
    arch: Literal["qwen2", "llama"] = Field("qwen2", description="transformers architecture of the LM")
    prompt_items: int = Field(10, ge=1, description="most recent history items in the prompt")
    beams: int = Field(20, ge=1, description="beams of the trie-constrained beam search that serves slates")
    sft_epochs: int = Field(10, ge=1, description="SFT epochs of the warm start")
    sft_lr: float = Field(3e-3, gt=0, description="AdamW learning rate of SFT")
    sft_batch: int = Field(256, ge=1, description="pairs per SFT step")
    sft_micro_batch: int | None = Field(None, ge=1, description="pairs per SFT forward/backward pass (gradient "
                                        "accumulation: the same gradient in less memory; None: the whole "
                                        "batch, but 16 pairs with pretrained)")
    sft_every: int = Field(0, ge=0, description="refit SFT on the recent log every this many rounds (0: never)")
    sft_window: int = Field(20, ge=1, description="rounds of clicks an SFT refit reads")
    sft_refit_epochs: int = Field(2, ge=1, description="epochs of each SFT refit")
    rl: dict[str, Any] | None = Field(None, description="the rl section (filled from the config's rl section)")
    max_len: int = Field(20, ge=1, description="history window (market.history_length fills it)")
    grpo_every: int = Field(1, ge=1, description="rounds between in-loop training steps")
    threads: int | None = Field(1, ge=1, description="torch intra-op threads (None: torch's default)")
    chunks: int = Field(2, ge=1, description="contiguous chunks a batch is cut into for serving, rollouts and "
                        "the loss pass (policy/threads.py); the gradient is summed over them (1: one pass)")
    chunk_workers: int | None = Field(None, ge=1, description="Python threads that run the chunks at once "
                                      "(None: the CPUs this process may use); results do not depend on it")
    device: str = Field("cpu", description="torch device of the model (cpu, cuda)")
    exclude_history: bool = Field(False, description="never serve an item already in the user's history")
    pretrained: str | None = Field(None, description="start from a pretrained LM: smollm2 or a local "
                                   "transformers directory (hidden, layers, heads are then its own)")
    title_tokens: int = Field(0, ge=0, description="with pretrained: title tokens of each history item "
                              "before its codes")
    puma: PumaParams | None = Field(None, description="per-user soft prompts and their migration across model "
                                    "upgrades (PUMA; policy/puma.py; None: off)")

    @model_validator(mode="after")
    def _upgrades_fit(self) -> GenerativeParams:
        upgrades = self.puma.upgrades if self.puma is not None else []
        for up in upgrades:
            heads = up.heads or self.heads
            if up.round <= self.warmup_rounds:
                raise ValueError(f"puma.upgrades: round {up.round} must come after the warm-up "
                                 f"(warmup_rounds={self.warmup_rounds})")
            if up.hidden % heads:
                raise ValueError(f"puma.upgrades: hidden ({up.hidden}) must be a multiple of heads ({heads})")
        if upgrades and self.pretrained is not None:
            raise ValueError("puma.upgrades: a pretrained LM cannot be upgraded (tiny models only)")
        return self

