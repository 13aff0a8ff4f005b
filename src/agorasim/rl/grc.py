"""GRC with EGRS: generation, reflection, correction (arXiv 2602.23639; ALGORITHMS.md section 6).

The policy's output is a trajectory after the plain prompt ``[BOS] history [SEP]``:

    [draft: the item's D = L+1 tokens] <loc_l> [correction: D tokens]

``<loc_1> .. <loc_D>`` name the first wrong token of the draft and ``<loc_{D+1}>`` says "none"
(the codebase's items are ``levels`` codes plus a de-duplication code, so D = 4 with the default 3
levels: the spec's "4 draft tokens" and ``<loc_1..5>``). The correction copies the draft's tokens
before position ``l`` (a hard constraint: the decoding mask admits only items with that prefix)
and regenerates positions ``>= l`` under the catalogue trie, with position ``l`` forced to differ
from the draft's token there (the reflection said it was wrong). ``<loc_none>`` leaves the draft
untouched; so does a reflection whose prefix has no other item.

There is no author code; the paper page and a third-party summary give the template, the
localisation target ``l* = min{t: draft_t != target_t} U {D+1}`` and ``L_SFT = L_MLE + lambda_rc
L_rc``. **Every form below is the [inf] reconstruction of ALGORITHMS.md section 6**:

- ``first_wrong``: ``l*`` (1-based; ``D + 1`` = none);
- ``correction_mask``: the items a correction may produce given ``l``;
- ``grc_reward``: ``r = R(final) + lambda_loc 1[l_hat = l*] + lambda_imp (R(final) - R(draft))``;
- ``egrs_select``: the correction budget spent on the highest-entropy drafts, where the entropy
  is that of ``p(l | prompt, draft)`` renormalised over the D + 1 reflection tokens;
- ``triple_epoch``: SFT on (draft from the SFT model's own top beams, ``l*``, target) triples with
  the MLE loss on the target plus ``lambda_rc`` x the cross-entropy of ``<loc_l*>`` and of the
  target's tokens at positions ``>= l*`` after the draft (the copied prefix is forced at decoding
  and carries no loss);
- ``GRCMethod``: the RL stage on ``rl.Trainer``: draft by the rollout of ``rl.rollout``, reflection
  sampled, correction sampled under the mask, the reward above, GRPO group advantages on the
  trajectory's free tokens, credited as ``segment_advantages`` says.

**Credit (``credit``, a choice of ours: the spec says the reward is "on the whole trajectory").**
Read literally, every token gets the advantage of ``r``. For the draft's tokens that is
``(1 + lambda_imp) R(final) - lambda_imp R(draft) + lambda_loc 1[l_hat = l*]``: a worse draft
earns a larger improvement term, and a draft far from the target (``l* = 1``, the easiest
position to name) a localisation bonus more often, so the draft model is paid for being wrong.
In the market that ruined the drafts (README, exposure study: utility 0.08 against SFT-only's
1.37). ``credit=segment`` (the default) gives the draft's tokens the group advantage of
``R(draft)``, the draft's own task reward (plain GRPO on the draft, which is what EGRS mostly
serves), and the reflection and correction tokens the advantage of ``r``. The draft is fixed
before those tokens, so ``r``'s draft terms only shift their baseline: their policy gradient is
unbiased. ``credit=trajectory`` keeps the literal reading.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from agorasim.policy.trie import gumbel, token_logprobs
from agorasim.rl.advantages import group_advantages
from agorasim.rl.rollouts import item_rollout, merge_ranked
from agorasim.rl.trainer import Method, Rollout, Scored


def loc_tokens(depth: int) -> tuple[str, ...]:
    """The reflection vocabulary: ``<loc_1>`` .. ``<loc_D>`` and ``<loc_{D+1}>`` (none)."""
    return tuple(f"<loc_{position}>" for position in range(1, depth + 2))


# -- pure functions ---------------------------------------------------------------------------------------
def first_wrong(draft, target) -> np.ndarray:
    """``l*``: the 1-based position of the first token where ``draft`` differs from ``target``;
    ``D + 1`` where they are equal (reflection "none").

    Args:
        draft: ``(..., D)`` token (or code) paths.
        target: ``(..., D)`` paths, broadcastable to ``draft``.

    Examples:
        ``[a1, b2, c3, d4]`` against ``[a1, b2, c9, d1]`` gives 3.
    """
    wrong = np.asarray(draft) != np.asarray(target)
    depth = wrong.shape[-1]
    return np.where(wrong.any(-1), wrong.argmax(-1) + 1, depth + 1).astype(np.int64)


def prefix_match(items_tokens, target_tokens) -> np.ndarray:
    """Leading tokens two paths share, divided by D: the offline task reward R (1 = the item)."""
    depth = np.asarray(items_tokens).shape[-1]
    return (first_wrong(items_tokens, target_tokens) - 1) / depth


def correction_mask(item_tokens, draft, loc) -> np.ndarray:
    """``(R, n_items)`` bool: the items a correction at ``loc`` may produce.

    An item qualifies when it shares the draft's first ``loc - 1`` tokens and differs from it at
    position ``loc`` (``first_wrong(item, draft) == loc``). ``loc = D + 1`` (none) allows nothing:
    the draft stays as it is.

    Args:
        item_tokens: ``(n_items, D)`` token paths of the catalogue.
        draft: ``(R, D)`` the drafts' paths.
        loc: ``(R,)`` 1-based reflected positions.
    """
    item_tokens, draft, loc = np.asarray(item_tokens), np.asarray(draft), np.asarray(loc)
    depth = item_tokens.shape[1]
    lead = first_wrong(item_tokens[None, :, :], draft[:, None, :])  # (R, n)
    return (lead == loc[:, None]) & (loc[:, None] <= depth)


def grc_reward(final, draft, loc_hat, loc_star, lambda_loc: float = 0.5, lambda_imp: float = 0.5,
               has_target=None) -> dict[str, np.ndarray]:
    """The trajectory reward of ALGORITHMS.md section 6 [inf], and its terms.

    ``total = R(final) + lambda_loc * 1[l_hat = l*] + lambda_imp * (R(final) - R(draft))``; the
    localisation term is 0 where there is no target to localise against (``has_target`` False).

    Args:
        final, draft: task rewards ``R`` of the corrected and the draft item, any shape.
        loc_hat, loc_star: reflected and true first-wrong positions, same shape.
        lambda_loc, lambda_imp: weights (0.5 in the spec).
        has_target: bool, same shape (None: all True).

    Returns:
        ``task`` (R(final)), ``localisation`` (0/1), ``improvement`` (R(final) - R(draft)) and
        ``total``, float64.
    """
    final, draft = np.asarray(final, np.float64), np.asarray(draft, np.float64)
    hit = np.asarray(loc_hat) == np.asarray(loc_star)
    if has_target is not None:
        hit = hit & np.asarray(has_target, bool)
    localisation = hit.astype(np.float64)
    improvement = final - draft
    return {"task": final, "localisation": localisation, "improvement": improvement,
            "total": final + lambda_loc * localisation + lambda_imp * improvement}


CREDITS = ("segment", "trajectory")


def segment_advantages(r_draft, total, valid, depth: int, credit: str = "segment",
                       scale: str = "group") -> np.ndarray:
    """``(B, G, 2D + 1)`` per-token advantages of GRC trajectories ``[draft (D), <loc>, correction (D)]``.

    ``segment``: the D draft tokens get ``group_advantages(R(draft))`` and the reflection and the
    correction tokens ``group_advantages(r)`` (``r`` the trajectory reward, ``total``);
    ``trajectory``: every token gets ``group_advantages(r)``. Rows of missing drafts (``valid``
    False) get advantage 0; their reward counts as 0 in their group's mean and std.

    Args:
        r_draft, total: ``(B, G)`` the draft's task reward and the trajectory reward.
        valid: ``(B, G)`` bool, a real draft.
        depth: D, tokens per item path.
        credit: ``segment`` or ``trajectory``.
        scale: ``group_advantages``' scale.

    Examples:
        ``R(draft) = [1, 0]``, ``r = [0.5, 1.5]``: segment gives the draft tokens ``[+0.707, -0.707]``
        and the others ``[-0.707, +0.707]`` (std of two values ``sqrt(1/2)``); trajectory gives
        ``[-0.707, +0.707]`` everywhere.
    """
    if credit not in CREDITS:
        raise ValueError(f"GRC credit {credit!r} is unknown; allowed: {', '.join(CREDITS)}")
    valid = np.asarray(valid, bool)
    after = group_advantages(np.where(valid, total, 0.0), scale=scale) * valid
    out = np.repeat(after[:, :, None], 2 * depth + 1, axis=2)
    if credit == "segment":
        out[:, :, :depth] = (group_advantages(np.where(valid, r_draft, 0.0), scale=scale) * valid)[:, :, None]
    return out


def reflection_entropy(log_p) -> np.ndarray:
    """Entropy (nats) of each row's reflection distribution ``log p(l | draft)`` (..., D + 1)."""
    log_p = np.asarray(log_p, np.float64)
    return -(np.exp(log_p) * np.where(np.isfinite(log_p), log_p, 0.0)).sum(-1)


def egrs_select(entropy, budget: int) -> np.ndarray:
    """``(B, budget)`` columns of the drafts to correct: the highest entropy first, ties to the
    better-ranked (lower) column; ``entropy`` is ``(B, M)`` over the M candidate drafts, ``-inf``
    where a draft is missing (never chosen before a real one)."""
    entropy = np.asarray(entropy, np.float64)
    budget = min(budget, entropy.shape[1])
    return np.argsort(-entropy, axis=1, kind="stable")[:, :budget]


PLACEMENTS = ("replace", "after")


def apply_corrections(drafts: np.ndarray, columns: np.ndarray, corrected: np.ndarray,
                      placement: str = "replace") -> np.ndarray:
    """``(B, n)`` the final lists: the drafts with the correction ``corrected[b, j]`` of column
    ``columns[b, j]`` where that is an item (``-1``: left as drafted), deduplicated (an item keeps
    its first slot, later repeats are dropped, the row is ``-1`` padded at the end).

    ``placement``: ``replace`` (the spec) puts the correction in its draft's slot; ``after`` keeps
    the draft and lists the correction right after it, pushing the rest down (a variant that
    cannot drop a draft from the top n + corrections)."""
    rows = np.repeat(np.arange(len(drafts)), columns.shape[1]).reshape(columns.shape)
    change = corrected >= 0
    if placement == "replace":
        final = drafts.copy()
        final[rows[change], columns[change]] = corrected[change]
    else:
        assert placement == "after", placement
        final = np.full((len(drafts), 2 * drafts.shape[1]), -1, np.int64)
        final[:, 0::2] = drafts
        final[rows[change], 2 * columns[change] + 1] = corrected[change]
    return merge_ranked(final, np.zeros((len(final), 0), np.int64), drafts.shape[1])


# -- model queries --------------------------------------------------------------------------------------------
def loc_ids(policy) -> np.ndarray:
    """``(D + 1,)`` vocabulary ids of the reflection tokens in ``policy``'s model."""
    return np.array([policy.special_token(name) for name in loc_tokens(policy.levels + 1)], np.int64)


def reflection_logprobs(policy, ids: torch.Tensor, mask: torch.Tensor, draft_tokens: np.ndarray) -> torch.Tensor:
    """``(N, D + 1)`` ``log p(l | prompt, draft)`` renormalised over the reflection tokens.

    Args:
        policy: the GRC policy (model, vocabulary).
        ids, mask: ``(B, T)`` plain prompts on the model's device.
        draft_tokens: ``(N, D)`` drafts, N a multiple of B (consecutive rows share a prompt).
    """
    locs = torch.as_tensor(loc_ids(policy), device=ids.device)
    path = torch.as_tensor(draft_tokens, dtype=torch.long, device=ids.device)
    path = torch.cat([path, locs[:1].expand(len(path), 1)], 1)  # the last position predicts the reflection
    _, log_softmax = token_logprobs(policy.model, ids, mask, path, return_log_softmax=True, **policy.chunking())
    return torch.log_softmax(log_softmax[:, -1, locs], dim=-1)


@torch.no_grad()
def correct(policy, ids: torch.Tensor, mask: torch.Tensor, draft_tokens: np.ndarray, loc: np.ndarray,
            greedy: bool = True, temperature: float = 1.0, generator: torch.Generator | None = None,
            item_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The corrections of ``N`` drafts after ``[prompt, draft, <loc_l>]`` under ``correction_mask``.

    Args:
        policy: the GRC policy.
        ids, mask: ``(N, T)`` plain prompts, one per draft, on the model's device.
        draft_tokens: ``(N, D)``.
        loc: ``(N,)`` 1-based reflected positions (``D + 1``: none, no correction).
        greedy: the most probable allowed token at each position (serving); else a sample at
            ``temperature`` drawn with ``generator`` (RL rollouts).
        item_mask: optional ``(N, n_items)`` bool further restricting the items (history exclusion).

    Returns:
        ``items (N,)``: the corrected item, ``-1`` where there is none (reflection none, or no
        other item under the kept prefix); ``tokens (N, D)`` its path (the draft's where none).
    """
    n, depth = draft_tokens.shape
    items = np.full(n, -1, np.int64)
    tokens = np.asarray(draft_tokens, np.int64).copy()
    allowed = correction_mask(policy.tokens, draft_tokens, loc) & policy.trie.alive[None, :]
    if item_mask is not None:
        allowed &= item_mask
    rows = np.flatnonzero(allowed.any(1))
    if len(rows) == 0:
        return items, tokens
    device = ids.device
    locs = loc_ids(policy)
    suffix = torch.as_tensor(np.concatenate([tokens[rows], locs[loc[rows] - 1][:, None]], 1), device=device)
    index = torch.as_tensor(rows, device=device)
    input_ids = torch.cat([ids[index], suffix], 1)
    attention = torch.cat([mask[index], torch.ones_like(suffix)], 1)
    found, _, path = policy.trie.sample(policy.model, input_ids, attention, num_samples=1, temperature=temperature,
                                        generator=generator, item_mask=torch.as_tensor(allowed[rows], device=device),
                                        greedy=greedy)
    items[rows] = found[:, 0].cpu().numpy()
    tokens[rows] = path[:, 0].cpu().numpy()
    return items, tokens


@dataclass
class EGRSResult:
    """One EGRS decoding of B prompts.

    Attributes:
        drafts: ``(B, n)`` the draft beams, best first.
        entropy: ``(B, M)`` reflection entropy of the top-M drafts (``draft_beams``).
        columns: ``(B, c)`` the drafts chosen for correction, highest entropy first.
        loc: ``(B, c)`` their reflected positions (``D + 1``: none).
        corrected: ``(B, c)`` their corrections (``-1``: left as drafted).
        ranked: ``(B, n)`` the final deduplicated list.
    """

    drafts: np.ndarray
    entropy: np.ndarray
    columns: np.ndarray
    loc: np.ndarray
    corrected: np.ndarray
    ranked: np.ndarray


@torch.no_grad()
def egrs_decode(policy, history: np.ndarray, beams: int, draft_beams: int, budget: int,
                chunk: int = 256, shared_prompt: bool | None = None, placement: str = "replace") -> EGRSResult:
    """EGRS at serving: ``beams + budget`` draft beams (so that ``beams`` distinct items remain
    whatever the corrections repeat); the reflection entropy of the top ``draft_beams``; greedy
    reflection and correction of the ``budget`` highest-entropy ones; in-place replacement (or
    ``placement=after``), deduplication (``apply_corrections``) and the first ``beams`` items kept. ``drafts`` are the
    first ``beams`` drafts (the draft ranking of the same decoding)."""
    policy.model.eval()
    depth = policy.levels + 1
    parts = []
    for start in range(0, len(history), chunk):
        part = history[start:start + chunk]
        drafts, _ = policy.beam_search(part, beams + budget, shared_prompt=shared_prompt)
        m = min(draft_beams, beams)
        ids, mask = (t.to(policy.device) for t in policy.prompts(part))
        top = drafts[:, :m]
        log_p = reflection_logprobs(policy, ids, mask, policy.tokens[np.maximum(top, 0)].reshape(-1, depth))
        entropy = np.where(top >= 0, reflection_entropy(log_p.cpu().numpy().reshape(len(part), m, -1)), -np.inf)
        columns = egrs_select(entropy, budget)
        chosen = np.take_along_axis(top, columns, 1)
        loc = log_p.argmax(-1).cpu().numpy().reshape(len(part), m) + 1
        loc = np.where(chosen >= 0, np.take_along_axis(loc, columns, 1), depth + 1)
        rows = np.repeat(np.arange(len(part)), columns.shape[1])  # one row per chosen draft
        exclude = policy.item_mask(part)
        exclude = None if exclude is None else exclude.cpu().numpy()[rows]
        index = torch.as_tensor(rows, device=policy.device)
        corrected, _ = correct(policy, ids[index], mask[index], policy.tokens[np.maximum(chosen, 0)].reshape(-1, depth),
                               loc.reshape(-1), greedy=True, item_mask=exclude)
        corrected = corrected.reshape(chosen.shape)
        ranked = apply_corrections(drafts, columns, corrected, placement)[:, :beams]
        parts.append(EGRSResult(drafts[:, :beams], entropy, columns, loc, corrected, ranked))
    if not parts:
        empty = np.zeros((0, beams), np.int64)
        return EGRSResult(empty, np.zeros((0, 0)), empty[:, :0], empty[:, :0], empty[:, :0], empty)
    return EGRSResult(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                        ("drafts", "entropy", "columns", "loc", "corrected", "ranked")))


# -- supervised stage ------------------------------------------------------------------------------------
def triples(policy, history: np.ndarray, beams: int) -> np.ndarray:
    """``(N, beams)`` drafts of the SFT triples: the current (SFT) model's top beams per pair."""
    drafts, _ = policy.beam_search(history, beams)
    return drafts


def triple_tokens(policy, drafts: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N*M, 2D+1)`` trajectories ``[draft, <loc_l*>, target]`` and the bool mask of the tokens
    ``L_rc`` trains (the reflection; the target's tokens at positions ``>= l*``), for ``(N, M)``
    drafts of ``(N,)`` targets; rows of missing drafts (``-1``) train nothing."""
    depth = policy.levels + 1
    n, m = drafts.shape
    draft = policy.tokens[np.maximum(drafts, 0)].reshape(n * m, depth)
    target = np.repeat(policy.tokens[targets], m, 0)
    loc = first_wrong(draft, target)
    path = np.concatenate([draft, loc_ids(policy)[loc - 1][:, None], target], 1)
    valid = (drafts >= 0).reshape(-1)
    train = np.zeros(path.shape, bool)
    train[:, depth] = valid
    train[:, depth + 1:] = valid[:, None] & (np.arange(depth)[None, :] >= loc[:, None] - 1)
    return path, train


def triple_loss(policy, history: np.ndarray, targets: np.ndarray, drafts: np.ndarray,
                lambda_rc: float, share: float = 1.0, rc_tokens: float | None = None) -> tuple[torch.Tensor, float, float]:
    """``L_MLE + lambda_rc L_rc`` of a batch of pairs and their drafts (token means); returns the
    loss and its two terms' values.

    For a micro-batch of a larger batch: ``share`` is its fraction of the batch's pairs (every
    pair has the same number of MLE tokens, so the batch's MLE mean is the sum of ``share`` x
    each part's) and ``rc_tokens`` the number of tokens ``L_rc`` trains in the whole batch (its
    denominator); the parts' losses then sum to the batch's loss. None: this batch's own.
    """
    mle = policy.sequence_nll(history, targets) * share
    path, train = triple_tokens(policy, drafts, targets)
    ids, mask = policy.prompts(history)
    logp = token_logprobs(policy.model, ids.to(policy.device), mask.to(policy.device),
                          torch.as_tensor(path, device=policy.device), **policy.chunking())
    weight = torch.as_tensor(train, dtype=logp.dtype, device=logp.device)
    denominator = max(float(train.sum()) if rc_tokens is None else rc_tokens, 1.0)
    rc = -(logp * weight).sum() / denominator
    return mle + lambda_rc * rc, float(mle.detach()), float(rc.detach())


def triple_epoch(policy, optimizer: torch.optim.Optimizer, history: np.ndarray, targets: np.ndarray,
                 drafts: np.ndarray, batch_size: int, generator: torch.Generator, lambda_rc: float,
                 grad_clip: float = 1.0, micro_batch: int | None = None) -> dict[str, float]:
    """One pass over the pairs (and their drafts) in a random order; mean losses.

    ``micro_batch``: pairs per forward/backward (gradient accumulation, as ``rl.sft.sft_epoch``):
    the parts' losses sum to the batch's (``triple_loss``'s ``share`` and ``rc_tokens``), so the
    gradient is the batch's up to float rounding. None: the whole batch at once.
    """
    policy.model.train()
    order = torch.randperm(len(targets), generator=generator).numpy()
    totals = {"loss": [], "mle": [], "rc": []}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        optimizer.zero_grad()
        step = micro_batch or len(rows)
        rc_tokens = float(triple_tokens(policy, drafts[rows], targets[rows])[1].sum()) if step < len(rows) else None
        values = np.zeros(3)
        for part in range(0, len(rows), step):
            some = rows[part:part + step]
            loss, mle, rc = triple_loss(policy, history[some], targets[some], drafts[some], lambda_rc,
                                        share=len(some) / len(rows), rc_tokens=rc_tokens)
            loss.backward()
            values += (float(loss.detach()), mle, rc)
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), grad_clip)
        optimizer.step()
        for key, value in zip(("loss", "mle", "rc"), values, strict=True):
            totals[key].append(value)
    return {key: float(np.mean(values)) if values else float("nan") for key, values in totals.items()}


def reflection_accuracy(policy, history: np.ndarray, targets: np.ndarray, drafts: np.ndarray) -> float:
    """Share of drafts whose greedy reflection is ``l*`` (a check of the supervised stage)."""
    depth = policy.levels + 1
    n, m = drafts.shape
    ids, mask = (t.to(policy.device) for t in policy.prompts(history))
    with torch.no_grad():
        log_p = reflection_logprobs(policy, ids, mask, policy.tokens[np.maximum(drafts, 0)].reshape(n * m, depth))
    loc = log_p.argmax(-1).cpu().numpy() + 1
    star = first_wrong(policy.tokens[np.maximum(drafts, 0)].reshape(n * m, depth), np.repeat(policy.tokens[targets], m, 0))
    valid = (drafts >= 0).reshape(-1)
    return float((loc == star)[valid].mean()) if valid.any() else float("nan")


# -- RL stage --------------------------------------------------------------------------------------------
class GRCMethod(Method):
    """GRC's RL stage on ``rl.Trainer`` and EGRS serving (see the module docstring) [inf].

    Args:
        config: the ``rl`` section (group size, rollout, loss, lr, KL as for GRPO).
        settings: the GRC settings (``policy.grc.GRCSettings``): reward weights, task reward,
            EGRS budget, decoding.
        depth: D, tokens per item path (levels + 1).
    """

    name = "grc"

    def __init__(self, config, settings, depth: int):
        super().__init__(config)
        self.settings = settings
        self.depth = int(depth)
        self.special_tokens = loc_tokens(self.depth)

    def extra_positions(self, depth: int) -> int:
        return depth + 1  # the reflection and the correction after the draft

    def serve(self, policy, history, k, round):
        s = self.settings
        if s.decoding == "draft":
            items, _ = policy.beam_search(history, k)
        else:
            items = egrs_decode(policy, history, k, s.draft_beams, s.correct_top, placement=s.placement).ranked
        scores = np.where(items >= 0, -np.arange(items.shape[1], dtype=np.float64)[None, :], -np.inf)
        return items, scores

    def rollout(self, trainer, prompts, generator):
        rl, policy, depth = self.config, trainer.policy, self.depth
        draft = item_rollout(trainer, prompts, generator, rl.group_size, rl.rollout, rl.temperature)
        b, g = draft.items.shape
        draft_tokens = policy.tokens[np.maximum(draft.items, 0)].reshape(b * g, depth)
        log_p = reflection_logprobs(policy, draft.prompt_ids, draft.prompt_mask, draft_tokens)
        noise = gumbel(log_p.shape, generator, log_p.device)
        loc = (log_p / rl.temperature + noise).argmax(-1).cpu().numpy() + 1  # Gumbel-max draw of l_hat
        ids = draft.prompt_ids.repeat_interleave(g, 0)
        mask = draft.prompt_mask.repeat_interleave(g, 0)
        exclude = policy.item_mask(prompts.history)
        exclude = None if exclude is None else exclude.cpu().numpy().repeat(g, 0)
        corrected, fixed_tokens = correct(policy, ids, mask, draft_tokens, loc, greedy=False,
                                          temperature=rl.temperature, generator=generator, item_mask=exclude)
        corrected[draft.items.reshape(-1) < 0] = -1
        final = np.where(corrected >= 0, corrected, draft.items.reshape(-1))
        path = np.concatenate([draft_tokens, loc_ids(policy)[loc - 1][:, None], fixed_tokens], 1)
        valid = (draft.items >= 0).reshape(-1)
        train = np.zeros(path.shape, bool)
        train[:, :depth + 1] = valid[:, None]
        # the correction's free tokens: positions >= l_hat of a real correction (the prefix is copied)
        train[:, depth + 1:] = (corrected >= 0)[:, None] & (np.arange(depth)[None, :] >= loc[:, None] - 1)
        device = draft.completions.device
        extra = {"draft": draft.items, "loc": loc.reshape(b, g), "corrected": (corrected >= 0).reshape(b, g)}
        return Rollout(final.reshape(b, g), draft.scores, draft.prompt_ids, draft.prompt_mask,
                       torch.as_tensor(path, device=device), torch.as_tensor(train, device=device), extra)

    def task_reward(self, policy, prompts, items: np.ndarray, judge) -> np.ndarray:
        """R of ``items`` (B, ...): the judged rating / 10, or the prefix match with the target."""
        if self.settings.task_reward == "rating":
            return np.where(items >= 0, judge.judge(prompts, items)["rating"] / 10.0, 0.0)
        target = prompts.target.reshape((-1,) + (1,) * (items.ndim - 1))
        match = prefix_match(policy.tokens[np.maximum(items, 0)], policy.tokens[np.maximum(target, 0)])
        return np.where((items >= 0) & (target >= 0), match, 0.0)

    def score(self, trainer, prompts, rollout, judge):
        s, policy = self.settings, trainer.policy
        final, draft = rollout.items, rollout.extra["draft"]
        both = self.task_reward(policy, prompts, np.concatenate([final, draft], 1), judge)
        r_final, r_draft = both[:, :final.shape[1]], both[:, final.shape[1]:]
        has_target = np.broadcast_to((prompts.target >= 0)[:, None], final.shape)
        star = first_wrong(policy.tokens[np.maximum(draft, 0)],
                           policy.tokens[np.maximum(prompts.target, 0)][:, None, :])
        terms = grc_reward(r_final, r_draft, rollout.extra["loc"], star, s.lambda_loc, s.lambda_imp,
                           has_target & (draft >= 0))
        valid = draft >= 0
        total = np.where(valid, terms.pop("total"), 0.0)
        advantages = segment_advantages(r_draft, total, valid, self.depth, s.credit, self.config.advantage_scale)
        loc = rollout.extra["loc"][valid]
        stats = {"grc/corrected_share": float(rollout.extra["corrected"][valid].mean()) if valid.any() else 0.0,
                 "grc/none_share": float((loc == self.depth + 1).mean()) if valid.any() else 0.0,
                 "grc/loc_accuracy": float(terms["localisation"][valid & has_target].mean())
                 if (valid & has_target).any() else float("nan")}
        return Scored(terms, total, advantages, stats)
