"""GRC with EGRS as a policy (``policy.name=grc``): the generative recommender whose output is a
draft, a reflection and a correction (ALGORITHMS.md section 6; the forms are in ``rl/grc.py``).

Life of the policy in a run, on top of ``GenerativePolicy``'s:

1. the warm-up and SFT of the generative policy (next-item MLE on the logged clicks);
2. the supervised GRC stage, right after every SFT: triples (draft from the SFT model's own
   top ``triple_beams`` beams, its first wrong position ``l*`` against the logged next item, the
   target) trained with ``L_MLE + lambda_rc L_rc`` for ``grc_sft_epochs`` epochs;
3. every round after: EGRS serves (``decoding=grc``: ``draft_beams`` draft beams, the
   ``correct_top`` of highest reflection entropy corrected, the list deduplicated; ``decoding=
   draft`` serves the plain beams of the same model), then one step of GRC's RL stage on
   ``rl.Trainer`` (the rl section's group size, rollout, loss, lr and KL) with the trajectory
   reward ``R(final) + lambda_loc 1[l_hat = l*] + lambda_imp (R(final) - R(draft))``, R the
   simulated rating / 10 (``task_reward=rating``) or the prefix match with the clicked item;
   with ``credit=segment`` (the default) the draft's tokens are credited with ``R(draft)`` alone
   and the reflection and correction with the trajectory reward (``rl/grc.py``).

``rl.method=none`` skips the RL stage (SFT and triples only); ``grpo`` (the default) runs GRC's
trajectory GRPO; the other methods are not GRC's and are refused.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from agorasim.errors import UserInputError
from agorasim.policy.generative import GenerativePolicy
from agorasim.policy.observation import LogView
from agorasim.policy.params import GenerativeParams, PolicyParams
from agorasim.rl.grc import GRCMethod, reflection_accuracy, triple_epoch, triples


class GRCSettings(PolicyParams):
    """GRC's own settings (ALGORITHMS.md section 6, defaults of its minimal faithful version)."""

    decoding: Literal["grc", "draft"] = Field(
        "grc", description="serving: grc = EGRS (drafts, reflection, correction of the highest-entropy beams), "
        "draft = the plain beams of the same model")
    draft_beams: int = Field(10, ge=1, description="B: top draft beams whose reflection entropy EGRS compares")
    correct_top: int = Field(3, ge=0, description="correction budget: drafts corrected per user, highest "
                             "reflection entropy first (0: none)")
    placement: Literal["replace", "after"] = Field(
        "replace", description="where a correction goes: replace = its draft's slot (the spec), after = right "
        "after its draft, which stays listed (a variant)")
    triple_beams: int = Field(6, ge=1, description="drafts per SFT pair for the triples: the SFT model's top beams")
    grc_sft_epochs: int = Field(2, ge=1, description="epochs of the supervised GRC stage after each SFT")
    grc_sft_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the supervised GRC stage")
    lambda_rc: float = Field(1.0, ge=0, description="weight of the reflection-correction loss L_rc beside L_MLE")
    lambda_loc: float = Field(0.5, ge=0, description="weight of the localisation reward 1[l_hat = l*]")
    lambda_imp: float = Field(0.5, ge=0, description="weight of the improvement reward R(final) - R(draft)")
    credit: Literal["segment", "trajectory"] = Field(
        "segment", description="which reward each token of the RL stage is credited with: segment = the draft's "
        "tokens the group advantage of R(draft), the reflection and correction tokens that of the trajectory "
        "reward; trajectory = every token the trajectory reward's advantage (the spec read literally, which "
        "pays the draft for being wrong: see rl/grc.py)")
    task_reward: Literal["rating", "prefix"] = Field(
        "rating", description="R of an item: rating = the judged rating / 10 (the simulated user; offline "
        "10 x hit), prefix = leading tokens shared with the target item / D")

    @model_validator(mode="after")
    def _budget_fits(self):
        if self.correct_top > self.draft_beams:
            raise ValueError(f"correct_top ({self.correct_top}) must be <= draft_beams ({self.draft_beams})")
        return self


class GRCParams(GenerativeParams, GRCSettings):
    """The generative recommender's parameters plus GRC's (``GRCSettings``)."""


SETTINGS = tuple(GRCSettings.model_fields)


class GRCPolicy(GenerativePolicy):
    """GRC with EGRS on the generative recommender (module docstring).

    Args:
        decoding, draft_beams, correct_top, placement, triple_beams, grc_sft_epochs, grc_sft_lr, lambda_rc,
            lambda_loc, lambda_imp, credit, task_reward: ``GRCSettings``.
        **generative: ``GenerativePolicy``'s arguments (``rl.method`` must be grpo or none).
    """

    name = "grc"
    Params = GRCParams

    def __init__(self, decoding: str = "grc", draft_beams: int = 10, correct_top: int = 3, placement: str = "replace",
                 triple_beams: int = 6,
                 grc_sft_epochs: int = 2, grc_sft_lr: float = 1e-3, lambda_rc: float = 1.0, lambda_loc: float = 0.5,
                 lambda_imp: float = 0.5, credit: str = "segment", task_reward: str = "rating", **generative):
        super().__init__(**generative)
        self.settings = GRCSettings(decoding=decoding, draft_beams=draft_beams, correct_top=correct_top,
                                    placement=placement, triple_beams=triple_beams, grc_sft_epochs=grc_sft_epochs, grc_sft_lr=grc_sft_lr,
                                    lambda_rc=lambda_rc, lambda_loc=lambda_loc, lambda_imp=lambda_imp,
                                    credit=credit, task_reward=task_reward)
        if self.rl.method not in ("grpo", "none"):
            raise UserInputError(f"policy grc: rl.method must be grpo (GRC's trajectory GRPO) or none (no RL "
                                 f"stage), got {self.rl.method!r}")
        self.grc = GRCMethod(self.rl, self.settings, self.levels + 1)
        self.method = self.grc  # serves by EGRS whether or not the RL stage runs

    def build_model(self, seed: int) -> None:
        """The LM with the reflection tokens, and the trainer of the RL stage (rl.method=grpo)."""
        self.build_lm([self.grc], seed)
        if self.rl.method != "none":
            from agorasim.rl.trainer import Trainer

            self.trainer = Trainer(self, self.rl, self.grc)

    def sft(self, log: LogView, rng: np.random.Generator, epochs: int, since_round: int = 0) -> dict[str, float]:
        """``GenerativePolicy.sft``, then the supervised GRC stage on triples from the SFT model's
        beams over the same pairs."""
        metrics = super().sft(log, rng, epochs, since_round)
        history, targets = self.sft_pairs(log, since_round)
        if len(targets) == 0:
            return {**metrics, "train/grc_sft_loss": float("nan"), "train/grc_rc_loss": float("nan")}
        return {**metrics, **supervised_stage(self, history, targets, self.settings, self.sft_batch, rng)}


def supervised_stage(policy, history: np.ndarray, targets: np.ndarray, settings: GRCSettings, batch_size: int,
                     rng: np.random.Generator, grad_clip: float = 1.0, epoch_end=None) -> dict[str, float]:
    """The supervised GRC stage on ``(history, target)`` pairs: drafts from the current (SFT)
    model's top ``triple_beams`` beams, ``grc_sft_epochs`` epochs of ``triple_epoch`` (in
    micro-batches of ``policy.sft_micro_batch`` pairs where that is set, e.g. with ``pretrained``).

    Args:
        policy: a generative policy whose vocabulary has the reflection tokens.
        epoch_end: optional ``callable(epoch) -> None`` after each epoch (offline model selection).

    Returns:
        ``train/grc_sft_loss``, ``train/grc_mle_loss``, ``train/grc_rc_loss`` (last epoch) and
        ``train/grc_reflection_accuracy`` (greedy reflection = l* on the triples, after training).
    """
    drafts = triples(policy, history, settings.triple_beams)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=settings.grc_sft_lr)
    losses = {}
    for epoch in range(1, settings.grc_sft_epochs + 1):
        losses = triple_epoch(policy, optimizer, history, targets, drafts, batch_size, generator, settings.lambda_rc,
                              grad_clip, micro_batch=policy.sft_micro_batch)
        if epoch_end is not None:
            epoch_end(epoch)
    policy.model.eval()
    accuracy = reflection_accuracy(policy, history[:512], targets[:512], drafts[:512])
    return {"train/grc_sft_loss": losses["loss"], "train/grc_mle_loss": losses["mle"],
            "train/grc_rc_loss": losses["rc"], "train/grc_reflection_accuracy": accuracy}
