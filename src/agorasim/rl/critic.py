"""A reward model for ``rl.mode=served-only``: observed feedback where the user was shown the item,
a ridge-regression critic of that feedback for every other candidate.

The critic only reads what the platform knows: the interaction log (who was shown what, clicked,
rated), the items' observable content vectors and their interaction counts.
"""

from __future__ import annotations

import numpy as np

from agorasim.agents.feedback import stars_to_rating


class ServedCritic:
    """Rewards from served feedback only (``rl.mode=served-only``).

    A candidate the user was actually shown this round is scored by what the user did (rating
    0-10 if clicked, 0 if skipped; click 1/0). Every other candidate is scored by a critic: ridge
    regression of that observed outcome on features of (user profile, item content) fitted on the
    impressions of the last ``window`` rounds. Nothing is asked of the user model.

    Features: ``profile * content`` (d), ``content`` (d), ``log(1 + clicks)`` and a bias, where
    the profile is the mean content vector of the user's history (what the platform knows).
    """

    def __init__(self, window: int = 10, ridge: float = 1.0):
        self.window, self.ridge = window, ridge
        self.mse = float("nan")
        self.served_share = 0.0

    @staticmethod
    def _features(profile: np.ndarray, content: np.ndarray, popularity: np.ndarray) -> np.ndarray:
        return np.concatenate([profile * content, content, np.log1p(popularity)[..., None],
                               np.ones(content.shape[:-1] + (1,))], -1)

    def judge(self, log, catalogue, round: int, users: np.ndarray, history: np.ndarray,
              items: np.ndarray) -> dict[str, np.ndarray]:
        content = catalogue.content[: catalogue.n].astype(np.float64)
        popularity = catalogue.interactions[: catalogue.n]
        recent = log.arrays(since_round=round - self.window + 1)
        # training rows: every recent impression; the user's profile is approximated by the
        # history the policy saw at serving time for this round's users, else by the clicked
        # items of the user in the window
        outcome = np.where(recent["click"] > 0, stars_to_rating(np.nan_to_num(recent["rating"])), 0.0)
        clicks_by_user = np.zeros((int(recent["user"].max(initial=-1)) + 1, content.shape[1]))
        hit = recent["click"] > 0
        np.add.at(clicks_by_user, recent["user"][hit], content[recent["item"][hit]])
        norms = np.linalg.norm(clicks_by_user, axis=1, keepdims=True)
        profiles = clicks_by_user / np.maximum(norms, 1e-12)
        x = self._features(profiles[recent["user"]], content[recent["item"]], popularity[recent["item"]])
        a = x.T @ x + self.ridge * np.eye(x.shape[1])
        weights = np.linalg.solve(a, x.T @ outcome) if len(outcome) else np.zeros(x.shape[1])
        self.mse = float(np.mean((x @ weights - outcome) ** 2)) if len(outcome) else float("nan")
        # candidates: the critic's prediction, replaced by the observed outcome where served
        valid = history >= 0
        prof = (content[np.maximum(history, 0)] * valid[..., None]).sum(1)
        prof /= np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
        safe = np.maximum(items, 0)
        predicted = np.clip(self._features(prof[:, None, :], content[safe], popularity[safe]) @ weights, 0.0, 10.0)
        now = recent["round"] == round
        served = {(int(u), int(i)): float(o) for u, i, o in zip(recent["user"][now], recent["item"][now], outcome[now])}
        rating = predicted.copy()
        observed = np.zeros(items.shape, bool)
        for b, user in enumerate(users.tolist()):  # B x G lookups (a few hundred), not a hot loop
            for g, item in enumerate(items[b].tolist()):
                if (user, item) in served:
                    rating[b, g] = served[(user, item)]
                    observed[b, g] = True
        self.served_share = float(observed[items >= 0].mean()) if (items >= 0).any() else 0.0
        valid_items = items >= 0
        return {"rating": np.where(valid_items, rating, 0.0),
                "click": np.where(valid_items, np.clip(rating / 10.0, 0.0, 1.0), 0.0)}
