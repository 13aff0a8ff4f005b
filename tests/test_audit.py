"""The promotion audits (platform/audit.py): the neighbour audit by hand, its figures against the
catalogue's truth, and what the platform's EIU believes under each ``platform.audit``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agorasim.config import build_config
from agorasim.errors import UserInputError
from agorasim.platform.audit import Audit, NeighbourAuditor, audit_row
from agorasim.platform.estimates import expected_item_utility

SMALL = ["market.n_users=300", "market.n_items=200", "market.n_providers=20", "agents.items.promotion=free"]


def _market(sets):
    from agorasim.env.market import Market

    return Market(build_config({}, SMALL + sets))


def test_neighbour_features_and_flags_by_hand():
    # items 0-3 point one way, item 4 the other way; k = 2
    content = np.array([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [-1.0, 0.0]])
    features = np.array([0b011, 0b001, 0b001, 0b100, 0b110])
    auditor = NeighbourAuditor(k=2, threshold=0.5)
    share = auditor.neighbour_features(np.array([0, 4]), content, features, np.arange(5))
    # item 0's two nearest others are 1 and 2 (both list bit 0 only); item 4's are 3 and 2
    assert share[0, :3].tolist() == [1.0, 0.0, 0.0]
    assert share[1, :3].tolist() == [0.5, 0.0, 0.5]
    claimed = np.array([[0b011, 0b110, 0]])  # item 0 claims bits 0 and 1; item 4 claims bits 1 and 2
    audit = auditor.audit(np.array([[0, 4, -1]]), claimed, content, features, np.arange(5))
    assert audit.flagged.tolist() == [[0b010, 0b010, 0]]  # bit 1: no neighbour lists it; 0.5 is not < 0.5
    assert audit.supported_share(claimed).tolist() == [[0.5, 0.5, 1.0]]
    only = NeighbourAuditor(k=2, threshold=0.5).neighbour_features(np.array([0]), content, features, np.array([0]))
    assert only.tolist() == [[0.0] * 12]  # nothing else listed: no support


def test_audit_row_by_hand():
    claimed = np.array([[0b0111, 0b0001]])
    unsupported = np.array([[0b0100, 0b0001]])  # false claims: (0, bit 2) and (1, bit 0)
    support = np.zeros((1, 2, 12))
    support[0, 0, :3] = [0.9, 0.6, 0.1]
    support[0, 1, 0] = 0.4
    audit = Audit(flagged=np.array([[0b0100, 0b0000]]), support=support)
    row = audit_row(claimed, unsupported, audit)
    assert row["audit/flagged_share"] == pytest.approx(1 / 4)
    assert row["audit/precision"] == 1.0 and row["audit/recall"] == 0.5
    # scores 1 - support: true claims .1, .4; false claims .9, .6 -> every false above every true
    assert row["audit/auc"] == 1.0
    assert all(math.isnan(v) for v in audit_row(claimed, unsupported, None).values())


def test_the_neighbour_audit_sees_false_claims_only_where_similar_items_share_features():
    def auc(sets):
        market = _market(["market.n_users=1000", "market.n_items=600", "platform.audit=neighbours"] + sets)
        for _ in range(8):
            market.step()
        return np.nanmean([r["audit/auc"] for r in market.rows])

    assert auc(["market.features=category"]) > 0.75
    assert 0.4 < auc([]) < 0.6  # features independent of content: the neighbours tell nothing


def test_category_features_are_shared_within_a_subcategory_and_the_default_world_is_unchanged():
    from agorasim.data.synthetic import feature_rates

    rates = feature_rates(np.random.default_rng(0), 8, 4)
    assert set(np.unique(rates)) == {0.05, 0.8} and 0.2 < (rates == 0.8).mean() < 0.4
    market = _market(["market.features=category", "market.n_items=600"])
    cat = market.world.catalogue
    sub = cat.category[: cat.n, 0] * 10 + cat.category[: cat.n, 1]
    bits = (cat.features[: cat.n, None] >> np.arange(12)) & 1
    same = np.mean([np.mean(bits[sub == s], 0).std() for s in np.unique(sub)])
    overall = np.mean(bits, 0).std()
    assert same > 2 * overall  # each subcategory has its own common features
    plain = _market([]).world.catalogue
    assert plain.features[:5].tolist() == _market(["platform.audit=neighbours"]).world.catalogue.features[:5].tolist()


def test_eiu_believes_only_audited_claims():
    from agorasim.env.market import Market

    base = build_config({}, SMALL + ["market.features=category"])
    results = {}
    for audit in ("none", "attributes", "neighbours"):
        market = Market(base.model_copy(update={"platform": base.platform.model_copy(update={"audit": audit})}))
        for _ in range(8):  # the providers' bandits try the exaggerating strategies after the first rounds
            market.step()
        users = market.last_round["users"]
        pools, profiles = market.retrieve(users)
        ranked, _ = market.recommend(users, pools)
        state = market.rngs["items"].bit_generator.state
        promotions, eiu = market.promote(profiles, ranked)
        market.rngs["items"].bit_generator.state = state
        cat = market.world.catalogue
        content = cat.content[np.maximum(ranked, 0)]
        if audit == "none":
            believed = promotions.hype
        elif audit == "attributes":
            believed = promotions.hype * promotions.accuracy
        else:
            believed = promotions.hype * market.audit(ranked, promotions.claimed).supported_share(promotions.claimed)
        assert np.allclose(eiu, expected_item_utility(profiles, content, believed))
        results[audit] = (promotions.accuracy < 1).any() and not np.allclose(believed, promotions.hype)
    assert results == {"none": False, "attributes": True, "neighbours": True}


@pytest.mark.parametrize("sets, message", [
    (["platform.audit=catalogue"], "config platform.audit: must be one of"),
    (["platform.audit_threshold=2"], "config platform.audit_threshold: Input should be less than or equal to 1"),
    (["market.features=topic"], "config market.features: must be one of"),
])
def test_bad_audit_settings_are_one_line(sets, message):
    with pytest.raises(UserInputError) as caught:
        build_config({}, sets)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
