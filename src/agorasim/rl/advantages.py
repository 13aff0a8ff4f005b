"""Group-relative advantages (GRPO) and the composition of several weighted rewards.

GRPO (Shao et al. 2024, DeepSeekMath eq. 3) replaces a learned value baseline by the mean reward
of the ``G`` completions sampled for the same prompt: ``A = (r - mean_g) / (std + eps)``. Every
function takes numpy arrays or torch tensors and returns the same type (numpy results are float64;
torch keeps the input's dtype and device). Rewards are ``(B, G)``: prompt ``b``, candidate ``g``.
"""

from __future__ import annotations

import sys

import numpy as np

SCALES = ("group", "batch", "none")
MODES = ("sum_then_normalize", "normalize_then_sum")
# Added to the std, as TRL's GRPOTrainer does, so a group whose rewards are all equal gets
# advantage 0 instead of 0/0.
DEFAULT_EPS = 1e-4


def _is_tensor(x) -> bool:
    # torch is a dependency, but a numpy caller should not pay for importing it
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def group_advantages(rewards, scale: str = "group", eps: float = DEFAULT_EPS):
    """Group-relative advantages of a batch of rewards.

    ``A[b, g] = (r[b, g] - mean_g' r[b, g']) / (std + eps)`` where ``std`` is:

    - ``scale="group"``: the std of prompt ``b``'s own ``G`` rewards (GRPO, DeepSeekMath);
    - ``scale="batch"``: the std of all ``B*G`` rewards, the mean still per group (TRL
      ``scale_rewards="batch"``, after "Tricks or Traps? A Deep Dive into RL for LLM Reasoning",
      Liu et al. 2025);
    - ``scale="none"``: no division, ``A = r - mean`` (Dr. GRPO, "Understanding R1-Zero-Like
      Training", Liu et al. 2025: the std division over-weights prompts whose rewards barely
      vary, i.e. too easy or too hard ones).

    The std is the *sample* (unbiased, ``ddof=1``) std, as TRL computes it with ``torch.std``;
    for ``G = 3`` rewards ``[1, 0, 0]`` it is ``sqrt(2/3 / 2) = 0.57735``, not ``0.4714``.

    Args:
        rewards: ``(B, G)`` numpy array or torch tensor.
        scale: ``"group"``, ``"batch"`` or ``"none"``.
        eps: Added to the std (reward units).

    Returns:
        ``(B, G)`` advantages, numpy float64 for a numpy input, a tensor for a tensor input.

    Raises:
        ValueError: Unknown ``scale``, or a std asked of fewer than 2 rewards.
    """
    if scale not in SCALES:
        raise ValueError(f"advantage scale {scale!r} is unknown; allowed: {', '.join(SCALES)}")
    if _is_tensor(rewards):
        return _group_advantages_torch(rewards, scale, eps)
    r = np.asarray(rewards, dtype=np.float64)
    assert r.ndim == 2, f"rewards must be (B, G), got shape {r.shape}"
    centred = r - r.mean(axis=1, keepdims=True)
    if scale == "none":
        return centred
    _check_std_size(r.shape[1] if scale == "group" else r.size, scale)
    std = r.std(axis=1, ddof=1, keepdims=True) if scale == "group" else r.std(ddof=1)
    return centred / (std + eps)


def _group_advantages_torch(rewards, scale: str, eps: float):
    assert rewards.ndim == 2, f"rewards must be (B, G), got shape {tuple(rewards.shape)}"
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred
    _check_std_size(rewards.shape[1] if scale == "group" else rewards.numel(), scale)
    std = rewards.std(dim=1, keepdim=True) if scale == "group" else rewards.std()
    return centred / (std + eps)


def _check_std_size(n: int, scale: str) -> None:
    if n < 2:
        raise ValueError(f"advantage scale {scale!r} needs at least 2 rewards for a std, got {n}")


def combine(rewards: dict, weights: dict[str, float] | None = None,
            mode: str = "sum_then_normalize", scale: str = "group", eps: float = DEFAULT_EPS):
    """Advantages of several weighted rewards.

    - ``"sum_then_normalize"``: ``group_advantages(sum_k w_k r_k)``, one normalisation of the
      weighted sum (TRL's GRPOTrainer with several reward functions).
    - ``"normalize_then_sum"``: ``sum_k w_k group_advantages(r_k)``, each reward normalised in its
      group on its own, then weighted and summed (the decoupled normalisation of GDPO, NVIDIA
      2026, so a reward with a large spread does not drown the others; GDPO's extra batch-wise
      normalisation of the sum is not applied here).

    Args:
        rewards: Reward name -> ``(B, G)`` rewards (numpy or torch, all the same kind).
        weights: Reward name -> weight; only the names in ``weights`` are combined (others, kept
            for logging, are ignored). ``None``: every reward with weight 1.
        mode: ``"sum_then_normalize"`` or ``"normalize_then_sum"``.
        scale: Passed to ``group_advantages``.
        eps: Passed to ``group_advantages``.

    Returns:
        ``(B, G)`` advantages of the same type as the rewards.

    Raises:
        ValueError: Unknown ``mode`` or ``scale``, no rewards, or a weighted name without rewards.
    """
    if mode not in MODES:
        raise ValueError(f"reward combination mode {mode!r} is unknown; allowed: {', '.join(MODES)}")
    if weights is None:
        weights = {name: 1.0 for name in rewards}
    if not weights:
        raise ValueError("combine needs at least one weighted reward")
    missing = [name for name in weights if name not in rewards]
    if missing:
        raise ValueError(f"reward {missing[0]!r} has a weight but no values; "
                         f"computed: {', '.join(rewards) or 'none'}")
    rewards = {name: rewards[name] if _is_tensor(rewards[name])
               else np.asarray(rewards[name], dtype=np.float64) for name in weights}
    if mode == "sum_then_normalize":
        total = sum(float(w) * rewards[name] for name, w in weights.items())
        return group_advantages(total, scale=scale, eps=eps)
    return sum(float(w) * group_advantages(rewards[name], scale=scale, eps=eps)
               for name, w in weights.items())
