"""GRPO on single items (the default ``rl.method``): G constrained beams or samples per prompt.

Shao et al. 2024 (DeepSeekMath, eq. 3): a group of G completions per prompt, advantages
``(r - mean_group) / (std + 1e-4)``, a clipped policy-gradient loss (``rl.loss``) with an optional
KL to a reference. Here a completion is one item (its L+1 semantic-id tokens), drawn under the
catalogue trie as the top-G beams (ReRe, arXiv 2510.12211) or G samples, and rewarded by the named
rewards of ``rl.rewards`` (``rl/rewards.py``) on the judge's verified ratings and clicks.
"""

from __future__ import annotations

import numpy as np

from agorasim.rl.advantages import combine
from agorasim.rl.rewards import RewardContext, compute_rewards
from agorasim.rl.rollouts import item_rollout
from agorasim.rl.trainer import Judge, Method, Prompts, Rollout, Scored


def reward_context(prompts: Prompts, rollout: Rollout, judge: Judge, need_judgement: bool = True) -> RewardContext:
    """The rewards' view of a single-item rollout: judgements, target, beam scores, groups."""
    items = rollout.items
    judged = judge.judge(prompts, items) if need_judgement else {}
    exposure = judge.exposure_state()
    fields = {}
    if exposure is not None:
        fields = dict(item_group=exposure.groups[np.maximum(items, 0)], group_share=exposure.share,
                      target_share=exposure.target_share)
    return RewardContext(items=items, rating=judged.get("rating"), click=judged.get("click"), target=prompts.target,
                         beam_scores=rollout.scores, **fields)


class GRPO(Method):
    """GRPO with the rewards of ``rl.rewards`` (see the module docstring)."""

    name = "grpo"

    def rollout(self, trainer, prompts, generator):
        rl = self.config
        return item_rollout(trainer, prompts, generator, rl.group_size, rl.rollout, rl.temperature)

    def score(self, trainer, prompts, rollout, judge):
        rl = self.config
        ctx = reward_context(prompts, rollout, judge, need_judgement=bool({"rating", "click"} & set(rl.rewards)))
        rewards = compute_rewards(ctx, rl.rewards)
        advantages = combine(rewards, rl.rewards, rl.reward_mode, rl.advantage_scale)
        total = sum(rl.rewards[name] * rewards[name] for name in rewards)
        return Scored(rewards, total, advantages)
