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

from pydantic import Field

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
    sft_every: int = Field(0, ge=0, description="refit SFT on the recent log every this many rounds (0: never)")
    sft_window: int = Field(20, ge=1, description="rounds of clicks an SFT refit reads")
    sft_refit_epochs: int = Field(2, ge=1, description="epochs of each SFT refit")
    rl: dict[str, Any] | None = Field(None, description="the rl section (filled from the config's rl section)")
    max_len: int = Field(20, ge=1, description="history window (market.history_length fills it)")
    grpo_every: int = Field(1, ge=1, description="rounds between in-loop training steps")
    threads: int | None = Field(1, ge=1, description="torch threads (None: torch's default)")
    device: str = Field("cpu", description="torch device of the model (cpu, cuda)")
    exclude_history: bool = Field(False, description="never serve an item already in the user's history")
    pretrained: str | None = Field(None, description="start from a pretrained LM: smollm2 or a local "
                                   "transformers directory (hidden, layers, heads are then its own)")
    title_tokens: int = Field(0, ge=0, description="with pretrained: title tokens of each history item "
                              "before its codes")
