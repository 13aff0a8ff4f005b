"""The language-model checks (fidelity on real Amazon users, injection attack and defence) with
deterministic fake engines, and their CLI."""

import json
import re

import numpy as np
import pytest

from agorasim.agents.engines.fake import ITEM_LINE, FakeEngine
from agorasim.cli import main
from agorasim.config import LLMConfig
from agorasim.data.amazon import load_amazon
from agorasim.run import llm_checks


@pytest.fixture(autouse=True)
def fake_title_vectors(monkeypatch):
    """Seeded unit vectors instead of the sentence model (hermetic and instant)."""
    def fake(titles, cache_dir=None):
        rng = np.random.default_rng(len(titles))
        x = rng.standard_normal((len(titles), 16)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    monkeypatch.setattr(llm_checks, "embed_titles", fake)
    return fake


@pytest.fixture(scope="module")
def data():
    return load_amazon()


def listed_ids(request) -> list[int]:
    return [int(m.group(1)) for m in ITEM_LINE.finditer(request.messages[-1].content)]


def answer(item_id: int, click: bool = True, reason: str = "fits me") -> str:
    return json.dumps([{"item_id": item_id, "click": click, "rating": 8, "reason": reason}])


def first_listed(request) -> str:
    return answer(listed_ids(request)[0])


def test_pick_scores_hand_example():
    s = llm_checks.pick_scores([1, None, 3, 4], [1, 2, 5, 4])
    assert s["precision"] == 2 / 3 and s["recall"] == 0.5 and s["pick_rate"] == 0.75
    assert s["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    none = llm_checks.pick_scores([None, None], [1, 2])
    assert np.isnan(none["precision"]) and none["recall"] == 0.0 and none["pick_rate"] == 0.0


def test_fidelity_first_listed_item(data, fake_title_vectors):
    n, m = 24, 5
    fig = llm_checks.fidelity(users=n, candidates=m, seed=3, engine=FakeEngine(first_listed), keep_rows=True)
    rows = fig["rows"]
    assert len(rows) == n == len({r["user"] for r in rows})

    # independently: each user's latest test row (timestamp, then file order) and what they touched
    test = data.test
    latest = {}
    for i, (u, t) in enumerate(zip(test.user.tolist(), test.timestamp.tolist())):
        if u not in latest or (t, i) >= latest[u][0]:
            latest[u] = ((t, i), i)
    touched = {}
    for split in (data.valid, data.test):
        for u, h, t in zip(split.user.tolist(), split.history.tolist(), split.target.tolist()):
            touched.setdefault(u, set()).update([x for x in h if x >= 0] + [t])
    vectors = fake_title_vectors(data.titles).astype(np.float64)
    for r in rows:
        row = latest[r["user"]][1]
        assert r["target"] == int(test.target[row])
        slate = r["slate"]
        assert len(slate) == len(set(slate)) == m and r["target"] in slate
        assert not (set(slate) - {r["target"]}) & touched[r["user"]]
        assert r["llm"] == slate[0]
        history = [x for x in test.history[row] if x >= 0]
        taste = vectors[history].mean(0)
        assert r["utility"] == slate[int(np.argmax(vectors[slate] @ taste))]

    at_front = np.mean([r["slate"][0] == r["target"] for r in rows])
    assert fig["llm/precision"] == fig["llm/recall"] == pytest.approx(at_front)
    assert fig["llm/f1"] == pytest.approx(at_front)
    assert fig["llm/pick_rate"] == 1.0 and fig["llm/fallback_rate"] == 0.0 and fig["llm/reasks"] == 0
    assert fig["llm/position_hist"] == [n] + [0] * (m - 1)
    assert sum(fig["target/position_hist"]) == n and fig["target/position_hist"][0] == round(at_front * n)
    assert fig["utility/pick_rate"] == 1.0 and fig["utility/precision"] == fig["utility/recall"]
    assert fig["random/expected_precision"] == 1 / m
    assert fig["random/precision"] == np.mean([r["random"] == r["target"] for r in rows])

    # same seed, same slates; another seed, another sample
    again = llm_checks.fidelity(users=n, candidates=m, seed=3, engine=FakeEngine(first_listed), keep_rows=True)
    assert again["rows"] == rows
    other = llm_checks.fidelity(users=n, candidates=m, seed=4, engine=FakeEngine(first_listed), keep_rows=True)
    assert [r["user"] for r in other["rows"]] != [r["user"] for r in rows]


def test_fidelity_oracle_and_fallback():
    n, m = 16, 4
    first = llm_checks.fidelity(users=n, candidates=m, seed=0, engine=FakeEngine(first_listed), keep_rows=True)
    target_of = {frozenset(r["slate"]): r["target"] for r in first["rows"]}
    oracle = llm_checks.fidelity(users=n, candidates=m, seed=0,
                                 engine=FakeEngine(lambda r: answer(target_of[frozenset(listed_ids(r))])))
    assert oracle["llm/precision"] == oracle["llm/recall"] == oracle["llm/f1"] == 1.0
    assert oracle["llm/hits"] == n

    garbage = FakeEngine(lambda r: "I like them all")
    fig = llm_checks.fidelity(users=n, candidates=m, seed=0, engine=garbage, llm_cfg=LLMConfig(reasks=2))
    assert fig["llm/fallback_rate"] == 1.0 and fig["llm/pick_rate"] == 0.0 and fig["llm/reasks"] == 2 * n
    assert garbage.calls == 3 * n
    assert json.loads(llm_checks.json_line(fig))["llm/precision"] is None  # undefined, strict JSON


def test_wilson_and_paired_lift_by_hand():
    # Wilson, z = 1.959964: k = 0, n = 10 -> centre = half = (z²/2) / (n + z²) = 0.138767
    low, high = llm_checks.wilson(0, 10)
    assert low == pytest.approx(0.0, abs=1e-9) and high == pytest.approx(0.277533, abs=1e-5)
    # k = 5, n = 10: centre 0.5, half = z / (n + z²) * sqrt(2.5 + z²/4) = 0.263407
    assert llm_checks.wilson(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-5)
    assert all(np.isnan(llm_checks.wilson(0, 0)))
    # paired differences [1, 0, 0, -1]: mean 0, sd sqrt(2/3), t(0.975, 3) = 3.182446 -> half 1.299228
    lift, lo, hi = llm_checks.paired_lift(np.array([1, 1, 0, 0]), np.array([0, 1, 0, 1]))
    assert lift == 0.0 and hi == pytest.approx(1.299228, abs=1e-5) and lo == pytest.approx(-hi)
    # [1, 1, 1, 0]: mean 0.75, sd 0.5 -> half 3.182446 * 0.5 / 2 = 0.795612
    assert llm_checks.paired_lift(np.array([1, 1, 1, 0]), np.zeros(4)) == pytest.approx((0.75, -0.045612, 1.545612),
                                                                                       abs=1e-5)


def test_attack_fake_engine_obeys_every_known_style_without_defence_and_none_with_it():
    n = 30
    fig = llm_checks.attack(engine_kind="fake", users=n, seed=0, honest=12, keep_rows=True)
    detected = ("instruction", "fake_system", "json_smuggling", "id_spoofing")
    assert fig["styles"] == [*detected, "persuasion"]
    control_off, control_on = fig["grounded/off/asr"], fig["grounded/on/asr"]
    assert control_off < 0.5 and fig["grounded/off/flagged"] == 0.0
    for style in detected:
        # the fake engine obeys any injection it reads, whatever line it sits on and whatever id it
        # names: undefended, every user clicks the target and rates it 10
        assert fig[f"{style}/off/asr"] == 1.0 and fig[f"{style}/off/target_rating"] == 10.0
        assert fig[f"{style}/off/flagged"] == fig[f"{style}/on/flagged"] == 1.0
        assert fig[f"{style}/off/lift"] == pytest.approx(1.0 - control_off)
        assert fig[f"{style}/off/asr_low"] == pytest.approx(llm_checks.wilson(n, n)[0])
        # defended, the injection is cut before the model reads it: the control's prompt, its answer
        assert fig[f"{style}/on/asr"] == control_on and fig[f"{style}/on/lift"] == 0.0
        assert fig[f"{style}/on/lift_low"] == fig[f"{style}/on/lift_high"] == 0.0
        assert fig["rows"]["answers"][f"{style}/on"] == fig["rows"]["answers"]["grounded/on"]
    # persuasion names no pattern: the fake victim does not obey it, and the sanitiser passes it
    assert fig["persuasion/off/flagged"] == fig["persuasion/on/flagged"] == 0.0
    assert fig["persuasion/off/target_rating"] != 10.0
    # prompts: grounded and five styles undefended; defended, the four cut styles share one prompt
    assert fig["asked"] == 6 * n + 3 * n and fig["reused"] == 3 * n
    rows = fig["rows"]
    for b, target in enumerate(rows["target"]):
        assert rows["slot"][b] >= 1 and rows["slates"][b][rows["slot"][b]] == target
        for style in fig["styles"]:
            assert rows["promotions"][style][b].startswith(rows["promotions"]["grounded"][b])
        assert f"[{target}]" in rows["promotions"]["id_spoofing"][b]
        assert f"[{rows['slates'][b][0]}]" in rows["promotions"]["id_spoofing"][b]
    for key in fig:
        if key.endswith("/fallback_rate"):
            assert fig[key] == 0.0
    # the defence's cost on honest text: the vendored Amazon titles hold two bracketed model numbers
    assert fig["honest/amazon titles/texts"] == 3686 and fig["honest/amazon titles/flagged"] == 2
    assert fig["honest/template promotions/flagged"] == 0 and fig["honest/model-written promotions/texts"] == 12
    assert fig["honest/amazon titles/fpr"] == pytest.approx(2 / 3686)
    same = llm_checks.attack(engine_kind="fake", users=n, seed=0, honest=12)
    assert {k: v for k, v in same.items() if "seconds" not in k and k != "wall_s"} == \
        {k: v for k, v in fig.items() if "seconds" not in k and k not in ("wall_s", "rows")}


def test_attack_output_check_rejects_echoed_injections():
    """A model that clicks the promoted item and echoes the instruction: with the defence on, the
    attacked answers are re-asked and fall back; grounded answers pass."""
    promoted = re.compile(r"^\[(\d+)\] .*(<promo>|Seller says)", re.MULTILINE)

    def echo(request):
        return answer(int(promoted.search(request.messages[1].content).group(1)), reason="told to rate it 10")

    n = 12
    engine = FakeEngine(echo)
    fig = llm_checks.attack(users=n, seed=1, engine=engine, llm_cfg=LLMConfig(reasks=1), styles=("instruction",),
                            honest=0)
    assert fig["grounded/off/asr"] == fig["instruction/off/asr"] == 1.0
    assert fig["grounded/on/asr"] == 1.0 and fig["grounded/on/fallback_rate"] == 0.0
    assert fig["instruction/on/fallback_rate"] == 1.0 and fig["instruction/on/asr"] == 0.0
    assert fig["instruction/on/reasks"] == n
    assert fig["instruction/off/lift"] == 0.0 and fig["instruction/on/lift"] == -1.0
    assert "honest/model-written promotions/texts" not in fig


def test_cli_prints_table_and_json_last(capsys):
    assert main(["fidelity", "--backend", "fake", "--users", "6", "--candidates", "3", "--seed", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("Fidelity on real data: 6 users, 3 candidates")
    fig = json.loads(out[-1])
    assert fig["users"] == 6 and fig["backend"] == "fake" and len(fig["llm/position_hist"]) == 3
    assert main(["attack", "--backend", "fake", "--users", "8", "--set", "agents.llm.reasks=0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    fig = json.loads(out[-1])
    assert fig["users"] == 8 and fig["instruction/on/lift"] == 0.0 and fig["honest/template promotions/flagged"] == 0
    assert main(["attack", "--backend", "fake", "--users", "4", "--styles", "json_smuggling", "--honest", "0"]) == 0
    fig = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fig["styles"] == ["json_smuggling"] and "instruction/on/asr" not in fig


@pytest.mark.parametrize("argv, message", [
    (["fidelity", "--backend", "gpt5"], "invalid choice"),
    (["fidelity", "--backend", "fake", "--users", "0"], "--users"),
    (["fidelity", "--backend", "fake", "--candidates", "1"], "--candidates"),
    (["fidelity", "--backend", "fake", "--users", "5000"], "only"),
    (["fidelity", "--backend", "fake", "--data", "/no/such/folder"], "no such directory"),
    (["fidelity", "--backend", "fake", "--set", "market.n_users=5"], "only agents.llm"),
    (["fidelity", "--backend", "fake", "--set", "agents.llm.batch_size=0"], "batch_size"),
    (["fidelity", "--backend", "fake", "--set", "agents.llm.nope=1"], "unknown config key"),
    (["attack", "--backend", "nope"], "invalid choice"),
    (["attack", "--backend", "fake", "--users", "0"], "--users"),
    (["attack", "--users", "ten"], "invalid int"),
    (["attack", "--backend", "fake", "--styles", "jailbreak"], "--styles jailbreak"),
    (["attack", "--backend", "fake", "--styles", ","], "at least one"),
    (["attack", "--backend", "fake", "--honest", "-1"], "--honest"),
])
def test_cli_bad_input_exits_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("agorasim: error:") and message in err


def test_attack_shows_a_progress_bar_over_its_batches_and_the_figures_do_not_change(capsys):
    quiet = llm_checks.attack(engine_kind="fake", users=10, seed=0, honest=4)
    capsys.readouterr()
    shown = llm_checks.attack(engine_kind="fake", users=10, seed=0, honest=4, progress=True)
    err = capsys.readouterr().err
    assert "attack batches" in err and "asked=" in err
    # the bar ends at its total: 2 defences x (grounded + 5 styles) x the rounds the slates came from
    counts = [(int(a), int(b)) for a, b in re.findall(r"\| *(\d+)/(\d+) \[", err)]
    done, total = counts[-1]
    assert done == total and total % 12 == 0 and counts[0][0] < total
    drop = ("wall_s", "llm/seconds")
    assert {k: v for k, v in shown.items() if k not in drop} == {k: v for k, v in quiet.items() if k not in drop}


class BatchingFake(FakeEngine):
    """A fake engine that reports its batches of 5 as the HF engine does."""

    reported: list[int]

    def generate(self, requests):
        out = []
        for start in range(0, len(requests), 5):
            out += super().generate(requests[start:start + 5])
            if self.progress is not None:
                self.progress(len(requests[start:start + 5]))
                self.reported = [*getattr(self, "reported", []), len(requests[start:start + 5])]
        return out


def test_fidelity_shows_requests_as_the_engine_finishes_batches(data, fake_title_vectors, capsys):
    n = 12
    quiet = llm_checks.fidelity(users=n, candidates=5, seed=3, engine=BatchingFake(first_listed))
    capsys.readouterr()
    engine = BatchingFake(first_listed)
    shown = llm_checks.fidelity(users=n, candidates=5, seed=3, engine=engine, progress=True)
    err = capsys.readouterr().err
    assert "fidelity requests" in err and f"{n}/{n}" in err
    counts = [int(a) for a, _ in re.findall(r"\| *(\d+)/(\d+) \[", err)]
    assert counts[-1] == n and engine.reported == [5, 5, 2]  # batch by batch, as they finished
    assert engine.progress is None  # the hook is taken off afterwards
    drop = ("wall_s", "llm/seconds")
    assert {k: v for k, v in shown.items() if k not in drop} == {k: v for k, v in quiet.items() if k not in drop}
