"""GRPO inside the loop: rewards the simulated users verify, group advantages, policy losses.

- ``rewards``: ``RewardContext`` and the named reward callables (``REWARDS``, ``compute_rewards``);
- ``advantages``: ``group_advantages`` and ``combine`` (several weighted rewards);
- ``losses``: ``policy_loss`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``gspo``), ``k3_kl``
  and ``sync_reference``.

See DESIGN.md section 8.
"""

from __future__ import annotations

from agorasim.rl.advantages import MODES, SCALES, combine, group_advantages
from agorasim.rl.losses import LOSSES, k3_kl, policy_loss, resolve_epsilon, sync_reference
from agorasim.rl.rewards import (
    REWARDS,
    RewardContext,
    check_reward_names,
    compute_rewards,
    register_reward,
)

__all__ = [
    "LOSSES",
    "MODES",
    "REWARDS",
    "SCALES",
    "RewardContext",
    "check_reward_names",
    "combine",
    "compute_rewards",
    "group_advantages",
    "k3_kl",
    "policy_loss",
    "register_reward",
    "resolve_epsilon",
    "sync_reference",
]
