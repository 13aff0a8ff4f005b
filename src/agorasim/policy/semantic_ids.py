"""Semantic ids: every item becomes a short path of codes, the tokens a generative recommender emits.

An item's embedding is quantised by residual k-means (RQ, as in TIGER, Rajput et al. 2023,
"Recommender Systems with Generative Retrieval", section 3.1, with k-means codebooks instead of an
RQ-VAE): level 0 clusters the embeddings, level 1 clusters what level 0 left over (the residuals),
and so on for ``levels`` levels. Items whose ``levels`` codes collide get one extra
*de-duplication* code 0, 1, 2, ... in order of item id, so every item has a unique path of
``levels + 1`` codes and the catalogue is a trie.

Why residual k-means with ``faiss.Kmeans`` rather than ``faiss.ResidualQuantizer``: k-means takes a
seed directly (same seed, same codes), works for any codebook size (the generative policy shrinks
the codebook for small catalogues, so sizes need not be powers of two) and encodes greedily, so
fitting and encoding later arrivals use exactly the same nearest-centroid rule. ResidualQuantizer's
beam-search encoding is slightly more accurate but needs ``nbits`` codes per level and is harder to
seed; for the short paths used here the difference in reconstruction error does not matter.

Token layout: level ``l`` code ``c`` is vocabulary token ``token_offsets(level_sizes, first)[l] + c``;
levels occupy consecutive blocks after ``first_token`` (level 0 first), so a model's vocabulary is
``first_token + sum(level_sizes)``.
"""

from __future__ import annotations

import faiss
import numpy as np

_KMEANS_ITERATIONS = 20  # Lloyd iterations per level; codes barely change after ~10 on unit vectors


def token_offsets(level_sizes, first_token: int = 0) -> np.ndarray:
    """Token id of code 0 of every level: ``first_token + sum(level_sizes[:l])``.

    Level ``l`` code ``c`` is token ``offsets[l] + c``. With ``first_token=0`` these are offsets
    relative to the first semantic-id token.

    Args:
        level_sizes: number of codes of each level (the last one is the de-duplication level).
        first_token: vocabulary id of level 0 code 0.

    Returns:
        (len(level_sizes),) int64.
    """
    sizes = np.asarray(level_sizes, np.int64)
    return first_token + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def codes_to_tokens(codes: np.ndarray, level_sizes, first_token: int) -> np.ndarray:
    """Vocabulary tokens (n, L+1) int64 of code paths ``codes`` (n, L+1)."""
    codes = np.asarray(codes, np.int64)
    assert codes.shape[-1] == len(level_sizes), "one code per level"
    return codes + token_offsets(level_sizes, first_token)


def tokens_to_codes(tokens: np.ndarray, level_sizes, first_token: int) -> np.ndarray:
    """Inverse of ``codes_to_tokens``: codes (n, L+1) int64 of token paths ``tokens``."""
    tokens = np.asarray(tokens, np.int64)
    codes = tokens - token_offsets(level_sizes, first_token)
    assert ((codes >= 0) & (codes < np.asarray(level_sizes))).all(), "token outside its level's block"
    return codes


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest (L2) centroid of every row of ``x``; ties go to the lower index."""
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the first term is the same for every centroid
    distance = (centroids * centroids).sum(1)[None, :] - 2.0 * (x @ centroids.T)
    return np.argmin(distance, axis=1).astype(np.int64)


class SemanticIds:
    """Residual k-means semantic ids with a de-duplication level.

    Attributes:
        levels: number of quantisation levels L (the path has L + 1 codes).
        codebook_size: codes per quantisation level.
        codes: (n_items, L+1) int64 code paths of every item seen so far (fit, then encode_new).
        level_sizes: L + 1 ints, the vocabulary block of each level; the last is the
            de-duplication level's size.
        centroids: L arrays (k_l, d) float32, the codebooks (k_l = min(codebook_size, n at fit)).
    """

    def __init__(self, levels: int = 3, codebook_size: int = 256, dedup_size: int | None = None,
                 iterations: int = _KMEANS_ITERATIONS):
        """
        Args:
            levels: quantisation levels L (>= 1).
            codebook_size: codes per level (>= 2); 256 is TIGER's choice.
            dedup_size: size of the de-duplication level. None: the largest number of items that
                share one L-code prefix at fit time (the smallest vocabulary). A larger value leaves
                room for later arrivals to keep their nearest prefix (see ``encode_new``).
            iterations: k-means iterations per level.
        """
        if levels < 1:
            raise ValueError(f"semantic ids: levels must be >= 1, got {levels}")
        if codebook_size < 2:
            raise ValueError(f"semantic ids: codebook_size must be >= 2, got {codebook_size}")
        if dedup_size is not None and not 1 <= dedup_size <= codebook_size:
            raise ValueError(f"semantic ids: dedup_size must be in [1, codebook_size={codebook_size}], "
                             f"got {dedup_size}")
        self.levels = int(levels)
        self.codebook_size = int(codebook_size)
        self.dedup_size = dedup_size
        self.iterations = int(iterations)
        self.centroids: list[np.ndarray] = []
        self.codes = np.zeros((0, self.levels + 1), np.int64)
        self.level_sizes: list[int] = []
        self._next_free: dict[tuple[int, ...], int] = {}  # L-code prefix -> next unused dedup code

    @property
    def fitted(self) -> bool:
        return bool(self.centroids)

    def fit(self, embeddings: np.ndarray, seed: int) -> np.ndarray:
        """Train the codebooks on ``embeddings`` (n, d) and return every item's codes (n, L+1).

        Same embeddings and seed give the same codes. Refitting replaces everything learnt before.

        Raises:
            ValueError: when more than ``codebook_size`` items share one L-code prefix (use more
                levels or a larger codebook), or more than an explicit ``dedup_size``.
        """
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"semantic ids: embeddings must be a non-empty (n, d) array, got shape {x.shape}")
        n, d = x.shape
        level_seeds = np.random.SeedSequence(seed).generate_state(self.levels)
        self.centroids = []
        rq = np.zeros((n, self.levels), np.int64)
        residual = x.copy()
        for level in range(self.levels):
            k = min(self.codebook_size, n)  # faiss k-means needs at least one point per centroid
            # min_points_per_centroid=1 silences faiss' "please provide more training points"
            # warning for small catalogues; max_points_per_centroid bounds the training sample
            kmeans = faiss.Kmeans(d, k, niter=self.iterations, seed=int(level_seeds[level] % 2**31),
                                  verbose=False, min_points_per_centroid=1, max_points_per_centroid=256)
            kmeans.train(residual)
            centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
            rq[:, level] = nearest_centroid(residual, centroids)
            residual -= centroids[rq[:, level]]
            self.centroids.append(centroids)
        dedup, collisions = _dedup_codes(rq)
        if collisions > self.codebook_size:
            raise ValueError(f"semantic ids: {collisions} items share one {self.levels}-code prefix, more "
                             f"than codebook_size={self.codebook_size}; use more levels or a larger codebook")
        if self.dedup_size is not None and collisions > self.dedup_size:
            raise ValueError(f"semantic ids: {collisions} items share one {self.levels}-code prefix, more "
                             f"than dedup_size={self.dedup_size}; raise dedup_size or use more levels")
        size = self.dedup_size if self.dedup_size is not None else collisions
        self.level_sizes = [self.codebook_size] * self.levels + [int(size)]
        self.codes = np.concatenate([rq, dedup[:, None]], 1)
        self._next_free = {}
        for prefix, code in zip(map(tuple, rq.tolist()), dedup.tolist()):
            self._next_free[prefix] = max(self._next_free.get(prefix, 0), code + 1)
        return self.codes.copy()

    def quantise(self, embeddings: np.ndarray) -> np.ndarray:
        """The L residual-quantisation codes (m, L) of ``embeddings``, without de-duplication."""
        rq, _ = self._quantise(np.ascontiguousarray(embeddings, dtype=np.float32))
        return rq

    def _quantise(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes (m, L) and the residual entering the last level (m, d)."""
        assert self.fitted, "call fit first"
        rq = np.zeros((len(x), self.levels), np.int64)
        residual = x.copy()
        last_input = residual
        for level, centroids in enumerate(self.centroids):
            last_input = residual.copy()
            rq[:, level] = nearest_centroid(residual, centroids)
            residual -= centroids[rq[:, level]]
        return rq, last_input

    def encode_new(self, embeddings: np.ndarray) -> np.ndarray:
        """Codes (m, L+1) for items arriving after ``fit``, appended to ``codes``; nothing is retrained.

        Existing items keep their codes. A new item takes its nearest L-code prefix and the next
        free de-duplication code of that prefix (continuing after the items already there, in
        order of arrival). The vocabulary is fixed, so when that prefix has used all
        ``level_sizes[-1]`` de-duplication codes the item moves to the nearest *sibling* prefix:
        same first L-1 codes, last quantisation code replaced by the next-nearest centroid (to the
        residual entering the last level) whose prefix still has a free de-duplication code. Paths
        stay unique and the item stays in its level-(L-1) neighbourhood.

        Raises:
            ValueError: if every prefix of that level-(L-1) bucket is full (use a larger
                ``dedup_size`` or more levels).
        """
        if not self.fitted:
            raise ValueError("semantic ids: call fit before encode_new")
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.centroids[0].shape[1]:
            raise ValueError(f"semantic ids: embeddings must be (m, {self.centroids[0].shape[1]}), got {x.shape}")
        rq, last_input = self._quantise(x)
        size = self.level_sizes[-1]
        new = np.zeros((len(x), self.levels + 1), np.int64)
        last_centroids = self.centroids[-1]
        for i, prefix in enumerate(map(tuple, rq.tolist())):  # one dict lookup per arrival
            if self._next_free.get(prefix, 0) >= size:
                distance = ((last_centroids - last_input[i]) ** 2).sum(1)
                for code in np.argsort(distance, kind="stable").tolist():
                    sibling = prefix[:-1] + (code,)
                    if self._next_free.get(sibling, 0) < size:
                        prefix = sibling
                        break
                else:
                    raise ValueError(f"semantic ids: every prefix under {prefix[:-1]} has used its {size} "
                                     "de-duplication codes; fit with a larger dedup_size or more levels")
            dedup = self._next_free.get(prefix, 0)
            self._next_free[prefix] = dedup + 1
            new[i, :-1] = prefix
            new[i, -1] = dedup
        self.codes = np.concatenate([self.codes, new])
        return new

    def codes_to_tokens(self, codes: np.ndarray, first_token: int) -> np.ndarray:
        """Vocabulary tokens (n, L+1) of ``codes`` under this quantiser's ``level_sizes``."""
        return codes_to_tokens(codes, self.level_sizes, first_token)


def _dedup_codes(rq: np.ndarray) -> tuple[np.ndarray, int]:
    """Rank of every item among the items with the same codes (in item order), and the largest group."""
    _, group = np.unique(rq, axis=0, return_inverse=True)
    group = group.reshape(-1)
    order = np.argsort(group, kind="stable")  # stable: item order within a group
    counts = np.bincount(group)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(rq), np.int64)
    rank[order] = np.arange(len(rq)) - np.repeat(first, counts)
    return rank, int(counts.max())
