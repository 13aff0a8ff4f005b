"""UGR: Uncertainty-aware Generative Recommendation (arXiv 2602.11719, KDD'26).

The reward, difficulty factor and confidence loss of UGR, as pure functions over a batch of
``B`` prompts x ``G`` beams (ALGORITHMS.md section 4). Beams are in rank order: column ``g`` is
the beam of rank ``g``, 0 = best.

Exact from the authors' code (``cxfann/UGR`` @ 9625994, ``train/RL/my_trainer.py``):

- ``ugr_rewards``: ``MyGRPOTrainer.SID_acc_reward``. The hit gets 1; when the target is among the
  beams, each wrong beam gets minus its softmax over the wrong beams' ``sequences_scores``; a
  group without the target gets all 0.
- ``difficulty_alpha``: ``_compute_loss``, ``scaling_factor = alpha_min + (1 - alpha_min) *
  gt_rank / (G - 1)`` with ``gt_rank`` the first beam whose advantage is positive (the hit when
  the token-reward weight is 0, as in the released run); 1 without a hit. Computed here per
  group, where the code reads it from the first group of the local batch.
- ``confidence_loss``: ``_compute_loss``, ``lambda_p * mean softplus(c_partial - c_gt) +
  lambda_w * mean softplus(c_wrong - c_gt)`` with partial = first SID token matches the target
  (``token_rewards[:, 0] > 0``) and wrong = neither the hit nor partial; an empty set adds 0.

Not in the code: the ``-inf`` handling of padding beams, and ``confidence_auc`` (the paper's claim
that the confidence separates hits from misses, measured as an AUC). The length normalisation of
the beam scores is HF semantics, not UGR code (see ``ugr_rewards``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from agorasim.metrics.accuracy import auc
from agorasim.policy.trie import token_logprobs
from agorasim.rl.advantages import group_advantages
from agorasim.rl.rollouts import item_rollout
from agorasim.rl.trainer import Method, Scored

CONF_REDUCTIONS = ("hit_groups", "all_groups")


def ugr_rewards(hit, beam_scores, lengths=None) -> np.ndarray:
    """UGR's beam rewards: 1 for the hit, minus a softmax of the scores for the wrong beams.

    ``r = 1`` for a hit; for a wrong beam ``k`` of a group that contains a hit,
    ``r_k = -exp(s_k) / sum_{j wrong} exp(s_j)`` (``SID_acc_reward``, cxfann/UGR); every beam of a
    group without a hit gets 0. With exactly one hit and at least one finite wrong beam the
    group's rewards sum to ``1 - 1 = 0``, so the group mean is exactly 0 (more than one hit, as
    with sampling rather than beams, breaks this: every hit gets 1, as in the code).

    The scores ``s``: UGR takes HF ``sequences_scores`` of beam search with
    ``length_penalty=1.0``, which are the summed log-probabilities divided by the generated
    length. The length therefore acts as a softmax temperature, and the **documented default for
    agorasim is to pass** ``lengths`` (the number of generated tokens, 5 = 4 SID tokens + EOS in
    UGR) so the rewards match the authors' runs; ``lengths=None`` softmaxes the raw sums. (Older
    transformers versions divided by the whole sequence length, prompt included, for decoder-only
    models; ``lengths`` can express that too.)

    Beams whose score is ``-inf`` (padding, or no valid continuation) get 0 and are left out of
    the softmax; a hit is 1 whatever its score.

    Args:
        hit: ``(B, G)`` bool, beam ``g`` of prompt ``b`` is the target.
        beam_scores: ``(B, G)`` float summed log-probabilities of the beams (nats).
        lengths: ``None`` (raw sums), an int, or ``(B, G)`` generated lengths the scores are
            divided by.

    Returns:
        ``(B, G)`` float64 rewards in ``[-1, 1]``.

    Examples:
        Log-probs ``(-1, -2, -3, -4)``, target at rank 1, 5 tokens:
        ``r = (-0.4506, 1, -0.3021, -0.2473)``; raw sums: ``(-0.8438, 1, -0.1142, -0.0420)``.
    """
    hit = np.asarray(hit, dtype=bool)
    scores = np.asarray(beam_scores, dtype=np.float64)
    assert hit.ndim == 2 and hit.shape == scores.shape, (
        f"hit and beam_scores must both be (B, G), got {hit.shape} and {scores.shape}")
    if lengths is not None:
        lengths = np.asarray(lengths, dtype=np.float64)
        assert np.all(lengths > 0), "lengths must be positive"
        scores = scores / lengths
    wrong = ~hit & np.isfinite(scores)
    # softmax over each row's wrong beams, shifted by the row's largest wrong score for stability
    top = np.max(np.where(wrong, scores, -np.inf), axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    weight = np.where(wrong, np.exp(np.where(wrong, scores, 0.0) - top), 0.0)
    total = weight.sum(axis=1, keepdims=True)
    softmax = weight / np.where(total > 0, total, 1.0)
    rewards = np.where(hit, 1.0, -softmax)
    return np.where(hit.any(axis=1, keepdims=True), rewards, 0.0)


def first_hit_rank(hit) -> np.ndarray:
    """The 0-based rank of each group's first hit.

    Args:
        hit: ``(B, G)`` bool.

    Returns:
        ``(B,)`` int64 rank of the first ``True``; ``-1`` for a group without a hit.
    """
    hit = np.asarray(hit, dtype=bool)
    assert hit.ndim == 2, f"hit must be (B, G), got shape {hit.shape}"
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1).astype(np.int64)


def difficulty_alpha(kstar, group_size: int, alpha_min: float) -> np.ndarray:
    """UGR's difficulty factor that scales each group's policy loss.

    ``alpha = alpha_min + (1 - alpha_min) * k* / (G - 1)``, ``k*`` the 0-based beam rank of the
    target (``_compute_loss`` in cxfann/UGR): a target found at rank 0 (an easy prompt) weighs
    ``alpha_min``, one found at the last rank weighs 1. A group without the target
    (``k* < 0``) weighs 1. The released run uses ``alpha_min = 0``.

    Args:
        kstar: ``(B,)`` int rank of the first hit, ``-1`` for none (``first_hit_rank``).
        group_size: ``G``, the number of beams (at least 2).
        alpha_min: Weight of a target at rank 0, in ``[0, 1]``.

    Returns:
        ``(B,)`` float64 factors; e.g. ``k* = 1, G = 4, alpha_min = 0`` gives 1/3.

    Raises:
        ValueError: ``group_size < 2``.
    """
    if group_size < 2:
        raise ValueError(f"difficulty_alpha needs a group of at least 2 beams, got {group_size}")
    kstar = np.asarray(kstar)
    alpha = alpha_min + (1.0 - alpha_min) * kstar.astype(np.float64) / (group_size - 1)
    return np.where(kstar < 0, 1.0, alpha)


def confidence_loss(conf: torch.Tensor, hit, partial, lambda_partial: float,
                    lambda_wrong: float, reduction: str = "hit_groups") -> torch.Tensor:
    """UGR's ranking loss that pushes the hit's confidence above the other beams'.

    For each group with a hit, ``c_gt`` is the confidence of its first hit and

    ``L_b = lambda_p * mean_{k partial} softplus(c_k - c_gt)
    + lambda_w * mean_{k wrong} softplus(c_k - c_gt)``,

    where *partial* beams are not hits but share the target's first SID token, and *wrong* beams
    are neither hits nor partial (``mask_wrong = ~partial & ~gt`` in ``_compute_loss``,
    cxfann/UGR). A term over an empty set is 0, as in the code. Hits other than the first (only
    possible with sampling) are in neither set; the code, which masks out only the first hit,
    would count them as partial.

    The code adds ``L_b`` to the loss of the micro-batch of its group, unscaled by ``alpha``.
    ``reduction="hit_groups"`` (default) averages ``L_b`` over the groups that have a hit;
    ``"all_groups"`` divides their sum by ``B``, which is what gradient accumulation over groups
    in the code amounts to (a group without a hit adds 0).

    Args:
        conf: ``(B, G)`` tensor of confidences ``c_k`` in ``[0, 1]`` (the ``<conf_pos>``
            probability), differentiable.
        hit: ``(B, G)`` bool (numpy or tensor), beam is the target.
        partial: ``(B, G)`` bool, beam's first SID token matches the target's (hits may be
            ``True`` or ``False`` here; they are excluded either way).
        lambda_partial: ``lambda_p`` (0 in the released run).
        lambda_wrong: ``lambda_w`` (0.5 in the released run).
        reduction: ``"hit_groups"`` or ``"all_groups"``.

    Returns:
        Scalar tensor. When no group has a hit it is 0, still attached to ``conf``'s graph
        (it has a ``grad_fn`` whenever ``conf`` requires grad) so ``backward`` works.

    Raises:
        ValueError: Unknown ``reduction``.
    """
    if reduction not in CONF_REDUCTIONS:
        raise ValueError(f"confidence loss reduction {reduction!r} is unknown; "
                         f"allowed: {', '.join(CONF_REDUCTIONS)}")
    assert conf.ndim == 2, f"conf must be (B, G), got shape {tuple(conf.shape)}"
    hit, partial = _bool_tensor(hit, conf.device), _bool_tensor(partial, conf.device)
    assert hit.shape == conf.shape and partial.shape == conf.shape, "hit and partial must be (B, G)"
    has_hit = hit.any(dim=1)
    first = hit.int().argmax(dim=1)  # torch.argmax returns the first maximal index
    c_gt = conf.gather(1, first[:, None])
    gap = F.softplus(conf - c_gt)
    mask_partial = (partial & ~hit).to(conf.dtype)
    mask_wrong = (~partial & ~hit).to(conf.dtype)
    mean_partial = (gap * mask_partial).sum(dim=1) / mask_partial.sum(dim=1).clamp(min=1.0)
    mean_wrong = (gap * mask_wrong).sum(dim=1) / mask_wrong.sum(dim=1).clamp(min=1.0)
    per_group = (lambda_partial * mean_partial + lambda_wrong * mean_wrong) * has_hit.to(conf.dtype)
    n = has_hit.sum().clamp(min=1) if reduction == "hit_groups" else conf.shape[0]
    return per_group.sum() / n


def _bool_tensor(x, device) -> torch.Tensor:
    if not torch.is_tensor(x):
        x = np.asarray(x, dtype=bool)
    return torch.as_tensor(x, device=device).bool()


def confidence_auc(conf, hit) -> float:
    """AUC of the confidence as a score separating hits (positives) from misses
    (``metrics.accuracy.auc``): 0.5 is chance; UGR claims it is above 0.5 and rises."""
    return auc(conf, hit)


# -- the method on the trainer ---------------------------------------------------------------------
class UGR(Method):
    """UGR on ``rl.Trainer`` (``rl.method=ugr``, settings ``rl.ugr``).

    One step: the top-G constrained beams per prompt (UGR's sampler); a beam is *correct* when the
    user clicks it (``correct=click``: a Bernoulli draw of the simulated user's click probability,
    the market's verified feedback, with k* the best clicked rank) or when it is the target item
    (``correct=target``: exact UGR, the held-out next item offline); ``ugr_rewards`` with
    length-normalised beam scores; group advantages (sample std + 1e-4); the difficulty factor
    ``alpha(k*)`` and, with ``token_weight``, the token reward; plus the confidence loss from the
    ``<conf_neg>``/``<conf_pos>`` logits after ``[prompt, item, <conf_query>]``, added unscaled and
    only for groups with a correct beam.

    Deviation, exact in value: UGR multiplies the group's loss by alpha; here alpha multiplies the
    group's advantages, which is the same loss because UGR is KL-free (beta = 0) and on-policy
    (ratio 1), where the per-token loss is ``-A``. With ``rl.beta > 0`` or ``updates_per_batch > 1``
    (not UGR's setting) the KL term is then not scaled.
    """

    name = "ugr"
    special_tokens = ("<conf_neg>", "<conf_pos>", "<conf_query>")

    def extra_positions(self, depth: int) -> int:
        return 2  # the query token and the confidence token after the item

    def rollout(self, trainer, prompts, generator):
        rl = self.config
        rollout = item_rollout(trainer, prompts, generator, rl.group_size, "beam")
        # uniforms of the click draws, taken now so the step's randomness is the generator's alone
        draw = torch.rand(rollout.items.shape, generator=generator, device=generator.device)
        rollout.extra["draw"] = draw.cpu().numpy().astype(np.float64)
        return rollout

    def correct(self, prompts, rollout, judge) -> np.ndarray:
        """``(B, G)`` bool: the beams counted as correct (see the class docstring)."""
        items = rollout.items
        if self.config.ugr.correct == "target":
            return (items == prompts.target[:, None]) & (prompts.target[:, None] >= 0) & (items >= 0)
        click = judge.judge(prompts, items)["click"]
        return (rollout.extra["draw"] < click) & (items >= 0)

    def score(self, trainer, prompts, rollout, judge):
        cfg, depth = self.config.ugr, trainer.policy.levels + 1
        hit = self.correct(prompts, rollout, judge)
        rewards = ugr_rewards(hit, rollout.scores, lengths=depth if cfg.length_normalise else None)
        advantages = group_advantages(rewards, self.config.advantage_scale)
        kstar = first_hit_rank(hit)
        alpha = difficulty_alpha(kstar, rollout.group_size, cfg.alpha_min)
        if cfg.token_weight > 0:
            # tau_{k,t} = 1 up to the first code that differs from the target's path
            target = trainer.policy.tokens[np.maximum(prompts.target, 0)]  # (B, depth)
            path = trainer.policy.tokens[np.maximum(rollout.items, 0)]  # (B, G, depth)
            same = np.cumprod(path == target[:, None, :], axis=2).astype(np.float64)
            same *= (prompts.target >= 0)[:, None, None] & (rollout.items >= 0)[..., None]
            advantages = advantages[..., None] + cfg.token_weight * same
            advantages = advantages * alpha[:, None, None]
        else:
            advantages = advantages * alpha[:, None]
        first_code = trainer.policy.tokens[np.maximum(rollout.items, 0)][..., 0]
        hit_code = np.take_along_axis(first_code, np.maximum(kstar, 0)[:, None], 1)
        partial = ~hit & (first_code == hit_code) & (kstar >= 0)[:, None]
        rollout.extra.update(hit=hit, partial=partial)
        stats = {"ugr/alpha_mean": float(alpha.mean()), "ugr/correct_share": float(hit[rollout.items >= 0].mean())
                 if (rollout.items >= 0).any() else float("nan")}
        return Scored({"ugr": rewards}, rewards, advantages, stats)

    def loss(self, trainer, rollout, scored, old_logp, ref_logp):
        cfg = self.config.ugr
        hit, partial = rollout.extra["hit"], rollout.extra["partial"]
        if not (hit.any() and (cfg.lambda_partial > 0 or cfg.lambda_wrong > 0)):
            return super().loss(trainer, rollout, scored, old_logp, ref_logp)
        # one pass over [prompt, item tokens, <conf_query>, <conf_pos>] gives both the item tokens'
        # log-probs (causal attention: the tail cannot change them) and the confidence
        depth = rollout.completions.shape[1]
        logp, entropy, logp_all = self._confidence_pass(trainer.policy, rollout, return_entropy=True)
        loss, stats = self.policy_gradient_loss(rollout, scored, logp[:, :depth], entropy[:, :depth],
                                                old_logp, ref_logp)
        conf = self._confidence_of(trainer.policy, logp_all, rollout)
        conf_loss = confidence_loss(conf, hit, partial, cfg.lambda_partial, cfg.lambda_wrong)
        valid = rollout.items >= 0
        stats["ugr/conf_loss"] = float(conf_loss.detach())
        stats["ugr/conf_auc"] = confidence_auc(conf.detach().cpu().numpy()[valid], hit[valid])
        return loss + conf_loss, stats

    def confidence(self, policy, rollout) -> torch.Tensor:
        """``(B, G)`` confidence c_k: softmax over (``<conf_neg>``, ``<conf_pos>``) of the logits after
        ``[prompt, item tokens, <conf_query>]``, the ``<conf_pos>`` entry (differentiable). On its
        own pass; ``loss`` reads the same numbers from the pass it shares with the policy gradient."""
        _, logp_all = self._confidence_pass(policy, rollout)
        return self._confidence_of(policy, logp_all, rollout)

    def _confidence_pass(self, policy, rollout, return_entropy: bool = False):
        """token_logprobs of ``[item tokens, <conf_query>, <conf_pos>]`` after each prompt, then the
        entropies (with ``return_entropy``) and the full log-softmax."""
        _, pos, query = (policy.special_token(t) for t in self.special_tokens)
        n = rollout.completions.shape[0]
        tail = torch.tensor([query, pos], device=rollout.completions.device).expand(n, 2)
        path = torch.cat([rollout.completions, tail], 1)
        return token_logprobs(policy.model, rollout.prompt_ids, rollout.prompt_mask, path,
                              return_entropy=return_entropy, return_log_softmax=True, **policy.chunking())

    def _confidence_of(self, policy, logp_all: torch.Tensor, rollout) -> torch.Tensor:
        neg, pos = policy.special_token(self.special_tokens[0]), policy.special_token(self.special_tokens[1])
        pair = logp_all[:, -1, [neg, pos]]  # the distribution after the query token
        return torch.softmax(pair, dim=-1)[:, 1].reshape(rollout.items.shape)
