"""One trainer for every way of training the generative policy, in the market and offline.

A step is always the same five phases, in the order TRL's ``GRPOTrainer`` runs them:

1. **rollout**: the method generates completions for a batch of prompts (``Rollout``): G items
   per prompt (GRPO, UGR, Flower), G lists of K items (FlexRec, BLADE) or G list edits (FLAME);
2. **rewards**: a ``Judge`` verifies them (the simulated users in the market, the held-out next
   item offline) and the method turns judgements into rewards;
3. **advantages**: group-relative, item-level or step-level, as the method defines (``Scored``);
4. **loss**: the method's loss on the current model (policy-gradient losses of ``rl.losses``, or
   Flower's sub-trajectory balance), ``rl.updates_per_batch`` optimiser steps per rollout;
5. **reference sync** every ``rl.ref_sync_every`` steps.

The method is chosen by ``rl.method`` (``rl/methods.py`` lists them); each lives in its own file
of ``rl/`` and subclasses ``Method``. The trainer owns the optimiser, the reference model and the
step counter, so a pickled policy resumes exactly. It only talks to the policy through its public
surface: ``model``, ``tokens``, ``trie``, ``levels``, ``device``, ``prompts(history, suffix)``,
``special_token(name)``, ``sequence_nll(history, targets)`` and ``chunking()`` (how its batches are
cut into chunks that run at once on Python threads, ``policy/threads.py``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from agorasim.policy.base import ExposureState
from agorasim.policy.trie import token_logprobs
from agorasim.rl.losses import policy_loss, sync_reference


@dataclass
class Prompts:
    """A batch of B prompts.

    Attributes:
        users: ``(B,)`` user ids (``-1`` offline, where rows are not users of a market).
        history: ``(B, H)`` item ids, most recent last, ``-1`` padded on the left.
        target: ``(B,)`` the item the user chose next (clicked this round in the market, the
            held-out next item offline), ``-1`` if none.
        round: the market round of the step (0 offline).
    """

    users: np.ndarray
    history: np.ndarray
    target: np.ndarray
    round: int = 0

    def __len__(self) -> int:
        return len(self.history)


class Judge(Protocol):
    """Verifies completions: the simulated users in the market, the held-out item offline."""

    def judge(self, prompts: Prompts, items: np.ndarray) -> dict[str, np.ndarray]:
        """``rating`` (0-10) and ``click`` (probability) of every item of ``items`` (B, ...) for
        the prompt of its row, 0 where ``items < 0``."""

    def exposure_state(self) -> ExposureState | None:
        """The exposure state, or None where there is none (offline without counts)."""


@dataclass
class Rollout:
    """Completions of one step and what the loss needs of them.

    Attributes:
        items: ``(B, G)`` item per completion, or ``(B, G, K)`` for list completions; ``-1``
            where a completion has no item there.
        scores: ``(B, G)`` summed full-vocabulary log-probs of each completion (beam scores).
        prompt_ids: ``(B, T)`` left-padded prompts on the model's device.
        prompt_mask: ``(B, T)``.
        completions: ``(B*G, T_c)`` token ids of the completions (non-negative; padding masked).
        token_mask: ``(B*G, T_c)`` bool, the real completion tokens.
        extra: anything else a method keeps between its phases.
    """

    items: np.ndarray
    scores: np.ndarray
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completions: torch.Tensor
    token_mask: torch.Tensor
    extra: dict = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        return int(self.items.shape[1])

    def select(self, rows: np.ndarray) -> Rollout:
        """The rollout restricted to prompts ``rows`` (DAPO's dynamic sampling)."""
        g = self.group_size
        flat = torch.as_tensor((rows[:, None] * g + np.arange(g)).reshape(-1), device=self.completions.device)
        index = torch.as_tensor(rows, device=self.prompt_ids.device)
        extra = {k: (v[rows] if isinstance(v, np.ndarray) and len(v) == len(self.items) else v)
                 for k, v in self.extra.items()}
        return Rollout(self.items[rows], self.scores[rows], self.prompt_ids[index], self.prompt_mask[index],
                       self.completions[flat], self.token_mask[flat], extra)


@dataclass
class Scored:
    """Rewards and advantages of a rollout.

    Attributes:
        rewards: reward name -> ``(B, G)`` (or ``(B, G, K)``) values, logged as mean and std.
        total: ``(B, G)`` the weighted total reward of each completion (logged).
        advantages: ``(B, G)`` one advantage per completion, or ``(B, G, T_c)`` one per token.
        stats: method-specific numbers for ``train.csv`` (``train/`` is prefixed).
    """

    rewards: dict[str, np.ndarray]
    total: np.ndarray
    advantages: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)


class Method:
    """A way of training the policy: how it rolls out, scores and computes its loss.

    The base class is GRPO's loss on per-completion (or per-token) advantages; subclasses
    override ``rollout`` and ``score`` (and ``loss`` when the loss is not a policy gradient).
    """

    name = "method"
    special_tokens: tuple[str, ...] = ()  # extra vocabulary the method's prompts use
    policy_gradient = True  # uses rl.loss on advantages (False: ``loss`` is the method's own)

    def __init__(self, config):
        self.config = config  # the rl config section (RLConfig)

    def extra_positions(self, depth: int) -> int:
        """Tokens the method's prompts and completions add beyond one history and one item."""
        return 0

    def serve(self, policy, history: np.ndarray, k: int, round: int) -> tuple[np.ndarray, np.ndarray]:
        """What the policy shows when it serves: ``(B, k)`` items and non-increasing scores.
        Default: the top-k constrained beams of the plain prompt."""
        return policy.beam_search(history, k)

    def rollout(self, trainer: Trainer, prompts: Prompts, generator: torch.Generator) -> Rollout:
        raise NotImplementedError  # every registered method overrides it

    def score(self, trainer: Trainer, prompts: Prompts, rollout: Rollout, judge: Judge) -> Scored:
        raise NotImplementedError  # every registered method overrides it

    def loss(self, trainer: Trainer, rollout: Rollout, scored: Scored, old_logp, ref_logp
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped policy-gradient loss of ``rl.loss`` with the KL of ``rl.kl_estimator``."""
        logp, entropy = token_logprobs(trainer.policy.model, rollout.prompt_ids, rollout.prompt_mask,
                                       rollout.completions, return_entropy=True, **trainer.policy.chunking())
        return self.policy_gradient_loss(rollout, scored, logp, entropy, old_logp, ref_logp)

    def policy_gradient_loss(self, rollout: Rollout, scored: Scored, logp: torch.Tensor, entropy: torch.Tensor,
                             old_logp, ref_logp) -> tuple[torch.Tensor, dict[str, float]]:
        """``loss``'s objective given the completions' token log-probs and entropies (N, T_c), for a
        method that computes them in a pass of its own (UGR reads its confidence from the same one)."""
        rl = self.config
        advantages = np.asarray(scored.advantages, np.float32)
        # (B, G): one advantage per completion; (B, G, T_c): one per token
        advantages = advantages.reshape(-1) if advantages.ndim == 2 else advantages.reshape(-1, advantages.shape[-1])
        advantage = torch.as_tensor(advantages, device=logp.device)
        loss, stats = policy_loss(logp, logp.detach() if old_logp is None else old_logp, advantage,
                                  rollout.token_mask, rl.loss, ref_logp=ref_logp, beta=rl.beta,
                                  epsilon_low=rl.epsilon_low, epsilon_high=rl.epsilon_high,
                                  group_size=rollout.group_size, kl_estimator=rl.kl_estimator)
        stats = {"entropy": float(entropy.detach()[rollout.token_mask].mean()) if rollout.token_mask.any() else 0.0,
                 **stats}
        return loss, stats

    def after_step(self, trainer: Trainer, rollout: Rollout, scored: Scored) -> dict[str, float]:
        """Work after the optimiser steps (e.g. an auxiliary critic's update); extra stats."""
        return {}


class Trainer:
    """Runs steps of a ``Method`` on a generative policy's model.

    Args:
        policy: The ``GenerativePolicy`` whose ``model`` is trained.
        config: The ``rl`` config section (``RLConfig``).
        method: The method object (default: built from ``config.method``).
    """

    def __init__(self, policy, config, method: Method | None = None):
        from agorasim.rl.methods import make_method

        self.policy = policy
        self.config = config
        self.method = method if method is not None else make_method(config)
        self.optimizer = torch.optim.AdamW(policy.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.reference: torch.nn.Module | None = None
        self.steps = 0

    def begin(self) -> None:
        """Freeze a copy of the current model as the reference (after the SFT warm start)."""
        self.reference = copy.deepcopy(self.policy.model).eval()
        for param in self.reference.parameters():
            param.requires_grad_(False)

    def step(self, prompts: Prompts, judge: Judge, generator: torch.Generator) -> dict[str, float]:
        """One training step on ``prompts``; returns the ``train/*`` and ``time/*`` row.

        Args:
            prompts: The batch.
            judge: Verifies the completions.
            generator: Torch generator of every random draw of the step (same state, same step).
        """
        rl, method, model = self.config, self.method, self.policy.model
        timer = {"generate": 0.0, "score": 0.0, "update": 0.0}
        started = time.perf_counter()
        model.eval()
        with torch.no_grad():  # not inference_mode: the rollout's tensors feed the loss
            rollout = method.rollout(self, prompts, generator)
        timer["generate"] = time.perf_counter() - started
        t = time.perf_counter()
        scored = method.score(self, prompts, rollout, judge)
        judged = judge.stats() if hasattr(judge, "stats") else {}
        timer["score"] = time.perf_counter() - t
        t = time.perf_counter()
        train, scored_train, keep = rollout, scored, np.arange(len(prompts))
        if rl.dynamic_sampling and method.policy_gradient:  # DAPO: drop groups whose advantages are all 0
            advantages = np.asarray(scored.advantages)
            keep = np.flatnonzero(np.abs(advantages.reshape(len(prompts), -1)).max(1) > 0)
            train = rollout.select(keep)
            scored_train = Scored(scored.rewards, scored.total, advantages[keep], scored.stats)
        stats_sum: dict[str, float] = {}
        if len(keep):
            stats_sum = self._update(train, scored_train)
        self.steps += 1
        if self.reference is not None and rl.ref_sync_every and self.steps % rl.ref_sync_every == 0:
            sync_reference(self.reference, model, rl.ref_alpha)
        extra = method.after_step(self, rollout, scored)
        timer["update"] = time.perf_counter() - t
        return self._row(prompts, rollout, scored, stats_sum, {**extra, **judged}, len(keep), timer, started)

    def _update(self, rollout: Rollout, scored: Scored) -> dict[str, float]:
        rl, method, model = self.config, self.method, self.policy.model
        model.train()
        old_logp = ref_logp = None
        if method.policy_gradient:
            with torch.no_grad():
                # with one update per batch the sampling policy is the current one (ratio 1), as in TRL
                split = self.policy.chunking()
                if rl.updates_per_batch > 1:
                    old_logp = token_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completions,
                                              **split)
                if rl.beta > 0 and self.reference is not None:
                    ref_logp = token_logprobs(self.reference, rollout.prompt_ids, rollout.prompt_mask,
                                              rollout.completions, **split)
        stats_sum: dict[str, float] = {}
        for _ in range(rl.updates_per_batch):
            loss, stats = method.loss(self, rollout, scored, old_logp, ref_logp)
            self.optimizer.zero_grad()
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), rl.grad_clip))
            self.optimizer.step()
            values = {"loss": loss.item(), "grad_norm": grad_norm, **{k: float(v) for k, v in stats.items()}}
            for key, value in values.items():
                stats_sum[key] = stats_sum.get(key, 0.0) + value / rl.updates_per_batch
        return stats_sum

    def _row(self, prompts: Prompts, rollout: Rollout, scored: Scored, stats_sum: dict, extra: dict,
             groups: int, timer: dict, started: float) -> dict[str, float]:
        items = rollout.items
        first = items if items.ndim == 2 else items[:, :, 0]
        valid = first >= 0
        out = {f"train/{k}": v for k, v in stats_sum.items()}
        out["train/reward"] = float(np.mean(scored.total[valid])) if valid.any() else float("nan")
        for name, values in scored.rewards.items():
            real = (items >= 0) if values.shape == items.shape else valid
            out[f"train/reward/{name}_mean"] = float(np.mean(values[real])) if real.any() else float("nan")
            out[f"train/reward/{name}_std"] = float(np.std(values[real])) if real.any() else float("nan")
        target = prompts.target
        has_target = target >= 0
        flat = items.reshape(len(items), -1)
        hit = (flat == target[:, None]).any(1)
        out["train/hit_rate"] = float(hit[has_target].mean()) if has_target.any() else float("nan")
        out["train/step"] = float(self.steps)
        if self.config.dynamic_sampling:
            out["train/groups"] = float(groups)
        out.update({f"train/{k}": v for k, v in {**scored.stats, **extra}.items()})
        out["time/seconds"] = time.perf_counter() - started
        out.update({f"time/{k}": v for k, v in timer.items()})
        return out
