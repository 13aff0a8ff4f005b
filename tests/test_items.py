"""Item agents: promotions, factuality audit, strategy bandit and provider exits, by hand."""

import numpy as np

from agorasim.agents.items import STRATEGIES, ItemAgents, Promotions, factuality
from agorasim.config import ItemAgentsConfig

BOLD = [s[0] for s in STRATEGIES].index("bold")
HARD_SELL = [s[0] for s in STRATEGIES].index("hard-sell")


def test_grounded_promotions_claim_only_catalogue_features():
    agents = ItemAgents(ItemAgentsConfig(promotion="grounded"), n_providers=2)
    assert set(agents.arms) == {0, 1, 2}  # no exaggerating strategy is available
    agents.strategy[:] = BOLD
    promo = agents.promote(np.array([[0, 1]]), np.array([[0b1011, 0b1]]), np.array([[True, True]]),
                           np.random.default_rng(0))
    np.testing.assert_array_equal(promo.claimed, [[0b1011, 0b1]])
    np.testing.assert_array_equal(promo.unsupported, [[0, 0]])
    # bold: intensity 1, hype = 1 * claims / 4
    np.testing.assert_allclose(promo.hype, [[0.75, 0.25]])
    np.testing.assert_allclose(promo.accuracy, [[1.0, 1.0]])


def test_free_promotions_may_invent_claims():
    agents = ItemAgents(ItemAgentsConfig(promotion="free"), n_providers=1)
    agents.strategy[:] = HARD_SELL
    features = np.full((50, 4), 0b1)
    promo = agents.promote(np.zeros((50, 4), np.int64), features, np.ones((50, 4), bool), np.random.default_rng(1))
    assert np.all(promo.claimed & features == features)  # true claims are kept
    assert np.all(promo.unsupported == promo.claimed & ~features)
    n_claims = np.bitwise_count(promo.claimed.astype(np.uint64))
    n_false = np.bitwise_count(promo.unsupported.astype(np.uint64))
    assert n_false.max() == 2 and n_false.sum() > 0
    np.testing.assert_allclose(promo.hype, 1.5 * n_claims / 4)
    np.testing.assert_allclose(promo.accuracy, 1 - n_false / n_claims)


def test_promotion_off_and_padding():
    agents = ItemAgents(ItemAgentsConfig(promotion="off"), n_providers=1)
    promo = agents.promote(np.zeros((1, 2), np.int64), np.array([[7, 7]]), np.array([[True, False]]),
                           np.random.default_rng(0))
    assert promo.hype.sum() == 0 and promo.claimed.sum() == 0
    agents = ItemAgents(ItemAgentsConfig(promotion="grounded"), n_providers=1)
    agents.strategy[:] = BOLD
    promo = agents.promote(np.zeros((1, 2), np.int64), np.array([[7, 7]]), np.array([[True, False]]),
                           np.random.default_rng(0))
    np.testing.assert_array_equal(promo.claimed, [[7, 0]])  # padding claims nothing


def test_factuality_share_of_unsupported_claims():
    promo = Promotions(claimed=np.array([[0b111, 0b1111]]), unsupported=np.array([[0, 0b1000]]),
                       hype=np.zeros((1, 2)), accuracy=np.ones((1, 2)))
    # 3 + 4 claims, 1 unsupported
    assert factuality(promo, np.array([[True, True]])) == 1 / 7
    assert factuality(promo, np.array([[True, False]])) == 0.0


def test_take_reorders_promotions_into_slate_order():
    promo = Promotions(claimed=np.array([[1, 2, 3]]), unsupported=np.zeros((1, 3), np.int64),
                       hype=np.array([[0.1, 0.2, 0.3]]), accuracy=np.ones((1, 3)))
    shown = promo.take(np.array([[2, 0, -1]]))
    np.testing.assert_array_equal(shown.claimed[0, :2], [3, 1])
    np.testing.assert_allclose(shown.hype, [[0.3, 0.1, 0.0]])


def test_bandit_incremental_mean_and_greedy_choice():
    agents = ItemAgents(ItemAgentsConfig(promotion="free", epsilon=0.0), n_providers=1)
    agents.strategy[:] = 2
    agents.learn(np.array([0]), np.array([0.2]))
    agents.learn(np.array([0]), np.array([0.4]))
    assert agents.count[0, 2] == 2 and np.isclose(agents.value[0, 2], 0.3)
    agents.value[0] = [0.1, 0.9, 0.3, 0.2, 0.0]
    agents.choose_strategies(np.random.default_rng(0))
    assert agents.strategy[0] == 1


def test_providers_exit_after_window_but_never_below_minimum():
    agents = ItemAgents(ItemAgentsConfig(exit_window=2, exit_threshold=0.5, min_providers=2), n_providers=3)
    exposure, items = np.array([10.0, 0.0, 0.0]), np.array([1, 1, 1])
    assert agents.exits(exposure, items).size == 0
    np.testing.assert_array_equal(agents.under, [0, 1, 1])
    leaving = agents.exits(exposure, items)
    np.testing.assert_array_equal(leaving, [1])  # 2 qualify, but only one may leave (min 2)
    assert list(agents.active) == [True, False, True]
    # an exited provider never counts again
    assert agents.exits(exposure, items).size == 0
