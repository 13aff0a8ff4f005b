"""Judges: who verifies a rollout's items (``rl.trainer.Judge``).

- ``OracleJudge``: the market's feedback oracle, counterfactual queries of the simulated users
  (``rl.mode=counterfactual``);
- ``CriticJudge``: the feedback the users gave to what they were shown this round, and a learned
  critic for everything else (``rl.mode=served-only``, ``rl/critic.py``);
- ``TargetJudge``: offline, the held-out next item (click = hit, rating = 10 x hit).
"""

from __future__ import annotations

import numpy as np

from agorasim.rl.trainer import ExposureState, Prompts


def _flat(items: np.ndarray) -> np.ndarray:
    return items.reshape(len(items), -1)


class OracleJudge:
    """Counterfactual judgements of the market's users (expected rating and click probability)."""

    def __init__(self, oracle):
        self.oracle = oracle

    def judge(self, prompts: Prompts, items: np.ndarray) -> dict[str, np.ndarray]:
        judged = self.oracle.judge(prompts.users, _flat(items))
        return {k: v.reshape(items.shape) for k, v in judged.items()}

    def exposure_state(self) -> ExposureState:
        return self.oracle.exposure_state()


class CriticJudge(OracleJudge):
    """Served feedback where the item was shown this round, the critic's prediction elsewhere."""

    def __init__(self, oracle, critic, log, catalogue, round: int):
        super().__init__(oracle)
        self.critic, self.log, self.catalogue, self.round = critic, log, catalogue, round

    def judge(self, prompts: Prompts, items: np.ndarray) -> dict[str, np.ndarray]:
        judged = self.critic.judge(self.log, self.catalogue, self.round, prompts.users, prompts.history, _flat(items))
        return {k: v.reshape(items.shape) for k, v in judged.items()}

    def stats(self) -> dict[str, float]:
        """The critic's fit and the share of candidates that were really served this round."""
        return {"critic_mse": self.critic.mse, "served_share": self.critic.served_share}


class TargetJudge:
    """Offline: an item is clicked (and rated 10) exactly when it is the prompt's held-out item."""

    def __init__(self, exposure: ExposureState | None = None):
        self.exposure = exposure

    def judge(self, prompts: Prompts, items: np.ndarray) -> dict[str, np.ndarray]:
        target = prompts.target.reshape((-1,) + (1,) * (items.ndim - 1))
        hit = ((items == target) & (target >= 0) & (items >= 0)).astype(np.float64)
        return {"rating": 10.0 * hit, "click": hit}

    def exposure_state(self) -> ExposureState | None:
        return self.exposure
