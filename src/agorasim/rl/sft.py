"""Supervised fine-tuning of the generative policy: next-item prediction by teacher forcing.

One epoch loop, used by the market's warm start and refits (``policy/generative.py``) and by the
offline protocol (``run/offline.py``): the loss of a batch is the mean token cross-entropy of the
target items' semantic-id tokens after their prompts (``GenerativePolicy.sequence_nll``).
"""

from __future__ import annotations

import numpy as np
import torch


def sft_epoch(policy, optimizer: torch.optim.Optimizer, history: np.ndarray, targets: np.ndarray,
              batch_size: int, generator: torch.Generator, grad_clip: float = 1.0,
              scheduler=None, micro_batch: int | None = None) -> list[float]:
    """One pass over ``(history, target)`` pairs in a random order; returns the batch losses.

    Args:
        policy: A ``GenerativePolicy`` (anything with ``model`` and ``sequence_nll``).
        optimizer: Optimiser over ``policy.model``'s parameters.
        history: ``(N, H)`` item ids before each target, ``-1`` padded on the left.
        targets: ``(N,)`` the next item of each row.
        batch_size: Pairs per optimiser step.
        generator: Draws the order (same state, same order).
        grad_clip: Largest gradient norm.
        scheduler: Optional learning-rate scheduler, stepped after every optimiser step.
        micro_batch: Pairs per forward/backward pass (gradient accumulation, for models whose
            activations of a whole batch do not fit in memory); the gradient is the same as the
            whole batch's, since every pair has the same number of target tokens. None: the batch.
    """
    policy.model.train()
    losses = []
    order = torch.randperm(len(targets), generator=generator).numpy()
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        optimizer.zero_grad()
        step = micro_batch or len(batch)
        loss = 0.0
        for part in range(0, len(batch), step):
            rows = batch[part:part + step]
            part_loss = policy.sequence_nll(history[rows], targets[rows]) * (len(rows) / len(batch))
            part_loss.backward()
            loss += part_loss.detach()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss))
    return losses


def click_pairs(users: np.ndarray, items: np.ndarray, prompt_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-item pairs from a click log: each click is predicted from the user's earlier clicks.

    Args:
        users: ``(N,)`` user of each click, in time order.
        items: ``(N,)`` clicked item.
        prompt_items: P, the most recent earlier clicks kept as the history.

    Returns:
        ``history (N, P)`` (``-1`` padded on the left, most recent last) and ``targets (N,)``,
        grouped by user (stable within a user, so time order is kept).
    """
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    starts = np.r_[0, np.flatnonzero(np.diff(users)) + 1] if len(users) else np.zeros(0, np.int64)
    position = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    offsets = np.arange(-prompt_items, 0)
    index = np.arange(len(users))[:, None] + offsets[None, :]
    history = np.where(offsets[None, :] >= -position[:, None], items[np.maximum(index, 0)], -1)
    return history.reshape(len(users), prompt_items), items
