"""Choice model, ratings, utility and user dynamics against hand-computed values."""

import numpy as np
import pytest

from agorasim.agents.backends import FakeBackend, SlateRequest, UtilityBackend
from agorasim.agents.backends.utility import choice_probabilities, perceived_utility, stars_from_utility
from agorasim.agents.feedback import FeedbackBatch, Judgement, SlateFeedback
from agorasim.agents.users import UserAgents
from agorasim.config import UserAgentsConfig
from agorasim.env.state import Catalogue, Population
from agorasim.env.world import World


def tiny_world(round=10):
    cat = Catalogue.empty(dim=2, depth=2)
    cat.add(["a", "b"], embedding=np.array([[1, 0], [0, 1]], np.float32),
            content=np.array([[1, 0], [0, 1]], np.float32), quality=np.array([0.5, -0.2], np.float32),
            provider=np.array([0, 1]), category=np.zeros((2, 2)), brand=np.array([0, 1]),
            price_band=np.zeros(2), features=np.array([0b1011, 0]), born=np.zeros(2),
            alive=np.ones(2, bool), interactions=np.array([np.e - 1, 0.0]), first_exposure=np.full(2, -1))
    pop = Population.empty(dim=2, history_length=3)
    pop.add(taste=np.array([[1, 0], [0, 1], [1, 1]], np.float32), activity=np.ones(3), conformity=np.full(3, 0.1),
            social=np.zeros(3), novelty=np.full(3, 0.2), trust=np.full(3, 0.5), patience=np.array([2, 2, 2]),
            satisfaction=np.zeros(3), fatigue=np.zeros(3), active=np.ones(3, bool), born=np.zeros(3))
    return World(catalogue=cat, population=pop, spec=None, edges=np.array([[0, 1], [0, 2]]), round=round,
                 novelty_halflife=10.0)


def test_choice_probabilities_by_hand():
    p = choice_probabilities(np.array([[1.0, 0.0]]), outside=0.0, temperature=1.0)
    # logits [1, 0, 0]: e/(e+2) and 1/(e+2)
    np.testing.assert_allclose(p, [[np.e / (np.e + 2), 1 / (np.e + 2), 1 / (np.e + 2)]])
    p = choice_probabilities(np.array([[1.0, -np.inf]]), outside=1.0, temperature=0.5)
    np.testing.assert_allclose(p, [[0.5, 0.0, 0.5]])


def test_stars_from_true_utility():
    stars = stars_from_utility(np.array([1.5, 1.25, 3.0, 0.0, 2.2]), center=1.5, noise=np.zeros(5))
    # 3 + 2(U - 1.5): 3, 2.5 -> 2 (half to even), 6 -> 5 (clipped), 0 -> 1 (clipped), 4.4 -> 4
    np.testing.assert_array_equal(stars, [3, 2, 5, 1, 4])


def test_perceived_utility_adds_trusted_hype_and_position_bias():
    request = SlateRequest(users=np.array([0]), slates=np.array([[5, 6, 7, -1]]),
                           true_utility=np.ones((1, 4)), hype=np.array([[1.0, 0.0, 2.0, 0.0]]),
                           trust=np.array([0.5]), round=0)
    value = perceived_utility(request, position_bias=0.2)
    # bias 0.2*log2(pos+1): 0, 0.2, 0.2*log2(3)
    np.testing.assert_allclose(value[0, :3], [1.5, 0.8, 2.0 - 0.2 * np.log2(3)])
    assert value[0, 3] == -np.inf


def test_gumbel_sampling_matches_logit_probabilities():
    cfg = UserAgentsConfig(temperature=0.5, outside_utility=0.2, position_bias=0.0, rating_noise=0.0,
                           rating_center=0.0)
    n = 100_000
    request = SlateRequest(users=np.arange(n), slates=np.tile([3, 4, 5], (n, 1)),
                           true_utility=np.tile([0.6, 0.3, 0.0], (n, 1)), hype=np.zeros((n, 3)),
                           trust=np.zeros(n), round=0)
    feedback = UtilityBackend(cfg).decide(request, np.random.default_rng(0))
    freq = np.bincount(np.where(feedback.choice < 0, 3, feedback.choice), minlength=4) / n
    expected = choice_probabilities(np.array([[0.6, 0.3, 0.0]]), 0.2, 0.5)[0]
    np.testing.assert_allclose(freq, expected, atol=0.006)
    clicked = feedback.choice >= 0
    assert np.all(np.isnan(feedback.stars[~clicked])) and np.all(np.isfinite(feedback.stars[clicked]))
    # slot 0 has U=0.6: 3 + 2*(0.6-0) = 4.2 -> 4 stars, no noise
    assert np.all(feedback.stars[feedback.choice == 0] == 4)


def test_true_utility_by_hand():
    world = tiny_world(round=10)
    agents = UserAgents(UserAgentsConfig(social=0.0, repeat_penalty=1.0), FakeBackend())
    u = agents.true_utility(world, np.array([0]), np.array([[0, 1, -1]]))
    # item 0: 1 + 0.5 + 0.1*log(e) + 0.2*0.5**(10/10) = 1.7 ; item 1: 0 - 0.2 + 0 + 0.1 = -0.1
    np.testing.assert_allclose(u[0, :2], [1.7, -0.1], rtol=1e-6)
    assert u[0, 2] == -np.inf
    # the same numbers from the counterfactual matrix query
    np.testing.assert_allclose(agents.utility_matrix(world, np.array([0]), np.array([0, 1])), [[1.7, -0.1]], rtol=1e-6)
    # satiation: an item already in the history loses repeat_penalty, in both queries
    world.population.history[0] = [-1, -1, 0]
    np.testing.assert_allclose(agents.true_utility(world, np.array([0]), np.array([[0, 1]]))[0], [0.7, -0.1], rtol=1e-6)
    np.testing.assert_allclose(agents.utility_matrix(world, np.array([0]), np.array([1, 0])), [[-0.1, 0.7]], rtol=1e-6)
    # an item twice in the history still loses the penalty once; a consumed item outside the
    # queried items changes nothing; true_utility's numbers up to float32 rounding
    world.population.history[0] = [0, 1, 0]
    matrix = agents.utility_matrix(world, np.array([0, 0]), np.array([0]))
    np.testing.assert_allclose(matrix, [[0.7], [0.7]], rtol=1e-6)
    np.testing.assert_allclose(agents.utility_matrix(world, np.array([0]), np.array([1, 0])),
                               agents.true_utility(world, np.array([0]), np.array([[1, 0]])), rtol=1e-6)
    np.testing.assert_allclose(agents.utility_matrix(world, np.array([0]), np.array([1, 0])), [[-1.1, 0.7]], rtol=1e-6)


def test_social_proof_counts_friends_clicks():
    world = tiny_world()
    world.log.append(round=np.array([9]), user=np.array([1]), item=np.array([0]), position=np.array([0]),
                     click=np.array([1], np.int8), rating=np.array([5.0], np.float32))
    world.refresh_social()
    proof = world.social_proof(np.array([0, 1]), np.array([[0, 1], [0, 1]]))
    # user 0 has friends 1 and 2; friend 1 clicked item 0 -> 1/2. user 1's only friend is 0 -> 0
    np.testing.assert_allclose(proof, [[0.5, 0.0], [0.0, 0.0]])


def test_update_trust_history_and_churn():
    world = tiny_world()
    agents = UserAgents(UserAgentsConfig(trust_lr=0.2, drift=0.0), FakeBackend())
    users = np.array([0, 1])
    slates = np.array([[0, 1], [1, 0]])
    feedback = FeedbackBatch(choice=np.array([0, -1]), stars=np.array([5.0, np.nan]),
                             reason=np.zeros((2, 2), np.int64))
    accuracy = np.array([[0.25, 1.0], [1.0, 1.0]])
    churned = agents.update(world, users, slates, feedback, accuracy)
    # trust 0.5 + 0.2*(0.25-0.5) = 0.45 for the user who clicked; unchanged otherwise
    np.testing.assert_allclose(world.population.trust[:2], [0.45, 0.5])
    np.testing.assert_array_equal(world.population.history[0], [-1, -1, 0])
    assert churned.size == 0 and world.population.fatigue[1] == 1
    churned = agents.update(world, users, slates, feedback, accuracy)
    np.testing.assert_array_equal(churned, [1])  # patience 2: two empty visits in a row
    assert not world.population.active[1] and world.population.active[0]


def test_taste_drifts_toward_consumed_item_and_keeps_norm():
    world = tiny_world()
    cfg = UserAgentsConfig(drift=0.5, taste_scale=1.0)
    world.population.taste[1] = [0.0, 1.0]
    agents = UserAgents(cfg, FakeBackend())
    feedback = FeedbackBatch(choice=np.array([0]), stars=np.array([4.0]), reason=np.zeros((1, 1), np.int64))
    agents.update(world, np.array([1]), np.array([[0]]), feedback, np.ones((1, 1)))
    # (0,1) + 0.5*((1,0)-(0,1)) = (0.5, 0.5) -> unit norm
    np.testing.assert_allclose(world.population.taste[1], [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)


def test_feedback_records_are_grounded():
    feedback = FeedbackBatch(choice=np.array([1]), stars=np.array([5.0]), reason=np.array([[3, 0, -1]]))
    (record,) = feedback.records(np.array([7]), np.array([[10, 11, -1]]), 3, np.array([0]))
    assert record.slate == [10, 11]
    assert [(j.item_id, j.click, j.rating, j.reason) for j in record.judgements] == [
        (10, False, None, "preferred_other"), (11, True, 10.0, "liked")]


@pytest.mark.parametrize("judgements, problem", [
    ([Judgement(item_id=99, click=True, rating=9, reason="liked")], "not in the slate"),
    ([Judgement(item_id=1, click=False, reason="not_interested")] * 2, "judged twice"),
    ([Judgement(item_id=1, click=True, rating=9, reason="liked"),
      Judgement(item_id=2, click=True, rating=9, reason="liked")], "at most one click"),
])
def test_ungrounded_feedback_is_rejected(judgements, problem):
    with pytest.raises(ValueError, match=problem):
        SlateFeedback(user_id=0, round=0, slate=[1, 2], judgements=judgements)


def test_fake_backend_is_deterministic():
    request = SlateRequest(users=np.array([1, 5]), slates=np.array([[3, 4], [3, 4]]), true_utility=np.zeros((2, 2)),
                           hype=np.array([[0.1, 0.9], [0.1, 0.9]]), trust=np.ones(2), round=0)
    feedback = FakeBackend().decide(request, np.random.default_rng(0))
    np.testing.assert_array_equal(feedback.choice, [1, -1])  # user 5 skips (5 % 5 == 0)
    feedback.validate(request.slates)
