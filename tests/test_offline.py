"""Offline protocol (``agorasim eval``): metrics by hand, data plumbing, a GRPO step, quick runs."""

import csv
import math

import numpy as np
import pytest
import torch

from agorasim.data.amazon import item_embeddings, load_amazon
from agorasim.errors import UserInputError
from agorasim.policy.trie import token_logprobs
from agorasim.rl.judges import TargetJudge
from agorasim.rl.trainer import Prompts, Trainer
from agorasim.run.offline import (
    KS,
    METRICS,
    Rows,
    build_generative,
    evaluate,
    list_exposure,
    main,
    make_config,
    model_names,
    paired_difference,
    quick_config,
    rank_generative,
    ranking_metrics,
    rl_config,
    settings_from,
    training_interactions,
    training_windows,
)


def test_ranking_metrics_by_hand():
    ranked = np.array([
        [5, 7, 9, 1, 2],    # target 9 at 0-based rank 2 (third place)
        [4, 8, 3, 6, 0],    # target 4 first
        [1, 2, 3, 5, 6],    # target 7 not ranked (e.g. outside the beams): a miss at every K
        [3, -1, -1, -1, -1],  # padding never hits; target 3 first
    ])
    target = np.array([9, 4, 7, 3])
    m = ranking_metrics(ranked, target, ks=(1, 3, 5))
    # hits per row at K=1: 0,1,0,1; K=3 and K=5: 1,1,0,1
    assert m["hr@1"] == pytest.approx(2 / 4)
    assert m["hr@3"] == pytest.approx(3 / 4)
    assert m["hr@5"] == pytest.approx(3 / 4)
    # NDCG with one relevant item: 1/log2(rank+2) for 0-based rank < K; row 0 gives 1/log2(4) = 0.5
    assert m["ndcg@1"] == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert m["ndcg@3"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert m["ndcg@5"] == pytest.approx(m["ndcg@3"])
    single = ranking_metrics(ranked[:1], target[:1], ks=(1, 3))
    assert single == {"hr@1": 0.0, "hr@3": 1.0, "ndcg@1": 0.0, "ndcg@3": pytest.approx(1 / math.log2(4))}


def test_paired_difference_by_hand():
    a = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    b = np.array([[3, 2, 1], [4, 5, 6], [8, 7, 9]])
    target = np.array([3, 5, 0])
    # per-row NDCG@3: a = 0.5, 1/log2(3), 0; b = 1, 1/log2(3), 0 -> differences 0.5, 0, 0
    gain, error = paired_difference(a, b, target, k=3)
    assert gain == pytest.approx(0.5 / 3)
    assert error == pytest.approx(np.std([0.5, 0.0, 0.0], ddof=1) / np.sqrt(3))


def test_list_exposure_by_hand():
    # 4 items; training counts (5, 3, 1, 1): 2 equal-count groups -> group 0 = items 0, 1, group 1 = 2, 3
    interactions = np.array([5.0, 3.0, 1.0, 1.0])
    ranked = np.array([[0, 1, -1], [0, 2, -1]])
    m = list_exposure(ranked, interactions, n_items=4, k=2, n_groups=2)
    assert m["coverage@2"] == pytest.approx(3 / 4)  # items 0, 1, 2 recommended
    # counts (2, 1, 1, 0): sorted (0, 1, 1, 2), G = sum (2i - n - 1) x_(i) / (n sum x)
    # = (-3*0 - 1*1 + 1*1 + 3*2) / (4 * 4) = 6/16
    assert m["gini@2"] == pytest.approx(6 / 16)
    # recommendation shares (3/4, 1/4), interaction shares (8/10, 2/10): d = (-0.05, +0.05)
    assert m["dgu@2"] == pytest.approx(0.1)
    assert m["mgu@2"] == pytest.approx(0.05)


def test_training_interactions_count_each_transition_once():
    history = np.array([[-1, -1, 10], [-1, 10, 11], [-1, -1, 20]])
    target = np.array([11, 12, 21])
    counts = training_interactions(Rows(history, target), n_items=25)
    # sequences 10, 11, 12 and 20, 21
    assert counts[[10, 11, 12, 20, 21]].tolist() == [1, 1, 1, 1, 1] and counts.sum() == 5


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserInputError, match="unknown method 'nope'"):
        make_config(methods=["nope"])
    with pytest.raises(UserInputError, match="rl.group_size"):
        make_config(rl={"group_size": 1})
    with pytest.raises(UserInputError, match="--method"):
        main(["--method", ","])


def test_the_offline_policy_is_the_markets_generative_params_with_offline_defaults():
    from agorasim.data.amazon import HISTORY_LEN
    from agorasim.policy.generative import GenerativePolicy
    from agorasim.run.offline import OfflineConfig

    assert OfflineConfig.model_fields["policy"].annotation is GenerativePolicy.Params
    config = make_config(policy={"hidden": 64})  # merged into the offline defaults, not replacing them
    assert (config.policy.hidden, config.policy.codebook_size, config.policy.sft_epochs) == (64, 64, 16)
    assert config.policy.prompt_items == config.policy.max_len == HISTORY_LEN
    assert make_config(quick=True, policy={"layers": 2}).policy.hidden == 32  # the quick model, one field changed
    with pytest.raises(UserInputError, match="unknown setting 'policy.hiden': allowed: warmup_rounds"):
        make_config(policy={"hiden": 64})
    with pytest.raises(UserInputError, match=r"policy.heads: must divide policy.hidden \(128\), got 3"):
        make_config(policy={"heads": 3})
    with pytest.raises(UserInputError, match="policy.title_tokens: needs policy.pretrained"):
        make_config(policy={"title_tokens": 8})


def test_training_windows_train_each_transition_once():
    # user A: a=10, b=11, c=12 -> pairs [a]->b, [a,b]->c; user B: d=20, e=21 -> [d]->e
    history = np.array([[-1, -1, 10], [-1, 10, 11], [-1, -1, 20]])
    target = np.array([11, 12, 21])
    x, y = training_windows(Rows(history, target), max_len=3)
    np.testing.assert_array_equal(x, [[-1, 10, 11], [-1, -1, 20]])
    np.testing.assert_array_equal(y, [[-1, 11, 12], [-1, -1, 21]])


@pytest.fixture(scope="module")
def amazon():
    data = load_amazon()
    return data, item_embeddings(data, dim=32)


@pytest.mark.slow  # loads the title-embedding model on a cold cache (~20 s)
def test_grpo_step_rewards_the_target_beam_and_changes_every_parameter(amazon):
    data, embeddings = amazon
    config = make_config(quick=True, grpo_lr=1e-3)
    policy = build_generative(embeddings, config, np.random.default_rng(0))
    rl = rl_config(config, "grpo")
    assert rl.rewards == {"rere_rank": 1.0} and rl.dynamic_sampling and rl.beta == config.grpo_beta
    history = data.valid.history[:16]
    # the held-out target of each prompt is its third beam: every group holds it, so every
    # group is informative and the target's advantage is the group's largest
    beams = rank_generative(policy, Rows(history, data.valid.target[:16]), config.group_size)
    prompts = Rows(history, beams[:, 2])
    before = {name: p.detach().clone() for name, p in policy.model.named_parameters()}
    ids, mask = policy.prompts(history)
    target_tokens = torch.from_numpy(policy.tokens[prompts.target])
    with torch.no_grad():
        logp_before = token_logprobs(policy.model, ids, mask, target_tokens).sum(1)
    trainer = Trainer(policy, rl)
    trainer.begin()  # config.grpo_beta > 0: k3 KL to the start
    stats = trainer.step(Prompts(np.full(16, -1), prompts.history, prompts.target), TargetJudge(),
                         torch.Generator().manual_seed(0))
    assert stats["train/hit_rate"] == 1.0 and stats["train/groups"] == 16
    assert stats["train/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the update
    for name, p in policy.model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
    with torch.no_grad():
        logp_after = token_logprobs(policy.model, ids, mask, target_tokens).sum(1)
    assert (logp_after > logp_before).float().mean() > 0.5  # the rewarded items became likelier


def test_bad_settings_and_data_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="no such directory"):
        evaluate(data_dir=tmp_path / "missing", out_dir=tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="info.txt"):
        main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    with pytest.raises(UserInputError, match="beams"):
        evaluate(out_dir=tmp_path / "out", beams=5, progress=False)
    with pytest.raises(UserInputError, match="unknown setting"):
        make_config(sft_epoch=3)
    with pytest.raises(UserInputError):
        main(["--no-such-flag"])
    out = ["--out", str(tmp_path / "out")]
    for given, message in ((["--set", "policy.foo=1"], "unknown setting 'policy.foo'"),
                           (["--set", "polcy.hidden=16"], "unknown setting 'polcy'"),
                           (["--set", "policy.hidden=17"], "policy.heads: must divide"),
                           (["--set", "test_rows=0"], "eval test_rows"),
                           (["--set", "beams=20"], "use --beams"),
                           (["--set", "policy.sft_epochs=2"], "use --sft-epochs"),
                           (["--set", "policy.pretrained=no/such/model"], "eval policy.pretrained 'no/such/model'"),
                           (["--set", "test_rows"], "dotted.key=value")):
        with pytest.raises(UserInputError, match=message):
            main([*given, *out])
    assert not (tmp_path / "out").exists()


def test_set_texts_become_nested_settings():
    assert settings_from(["policy.pretrained=smollm2", "train_users=500", "policy.title_tokens=8",
                          "rl={ugr: {alpha_min: 0.1}}", "grc.correct_top=2"]) == {
        "policy": {"pretrained": "smollm2", "title_tokens": 8}, "train_users": 500,
        "rl": {"ugr": {"alpha_min": 0.1}}, "grc": {"correct_top": 2}}
    config = make_config(quick=True, **settings_from(["policy.layers=2", "test_rows=33"]))
    assert config.policy.layers == 2 and config.test_rows == 33
    assert config.policy.hidden == quick_config().policy.hidden  # the other policy fields keep the base's


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # model-loading (title embeddings), a few seconds once cached
def test_quick_evaluate_writes_the_report(tmp_path):
    metrics = evaluate(out_dir=tmp_path, quick=True, progress=False)
    rows = read_rows(tmp_path / "offline.csv")
    assert list(rows[0]) == ["model", "split", "metric", "value"]
    table = {(r["model"], r["split"], r["metric"]): float(r["value"]) for r in rows}
    models = model_names(make_config(quick=True))
    assert models == ("sasrec", "sft", "sft+grpo")
    assert {(m, "test", k) for m in models for k in METRICS} <= set(table)
    for (model, split, metric), value in table.items():
        assert 0.0 <= value <= 1.0
        assert metrics[f"{model}/{split}/{metric}"] == pytest.approx(value, abs=1e-6)
    for model in models:
        hr = [table[(model, "test", f"hr@{k}")] for k in KS]
        ndcg = [table[(model, "test", f"ndcg@{k}")] for k in KS]
        assert hr == sorted(hr) and ndcg == sorted(ndcg)
        assert all(n <= h + 1e-12 for n, h in zip(ndcg, hr))
        assert hr[0] == pytest.approx(ndcg[0])  # one relevant item: NDCG@1 = HR@1
    report = (tmp_path / "offline.md").read_text()
    for figure in ("0.0806", "0.0908", "0.1082", "0.1167", "0.1088", "0.1321", "0.1586"):
        assert figure in report
    assert "published, trained on the full training split" in report
    assert metrics["info/data/test_rows"] == quick_config().test_rows


@pytest.mark.slow
def test_cli_quick_run(tmp_path, capsys):
    assert main(["--quick", "--seed", "1", "--out", str(tmp_path), "--set", "test_rows=60"]) == 0
    captured = capsys.readouterr()
    assert "NDCG@10" in captured.out and "] sft epoch   1" in captured.out
    # progress bars on stderr over SASRec and SFT epochs and the method's steps, each with its ETA
    for bar in ("sasrec epochs", "sft epochs", "grpo steps"):
        assert bar in captured.err, bar
    assert "<" in captured.err and "/s]" in captured.err
    assert (tmp_path / "offline.csv").is_file() and (tmp_path / "offline.md").is_file()
    assert "Test split, 60 rows" in (tmp_path / "offline.md").read_text()  # --set reached the protocol


@pytest.mark.slow
def test_same_seed_same_numbers(tmp_path):
    tiny = dict(quick=True, progress=False, valid_rows=40, test_rows=40, train_users=120)
    a = evaluate(out_dir=tmp_path / "a", seed=3, **tiny)
    b = evaluate(out_dir=tmp_path / "b", seed=3, **tiny)
    drop = {"info/time/seconds"}
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert (tmp_path / "a" / "offline.csv").read_bytes() == (tmp_path / "b" / "offline.csv").read_bytes()


@pytest.mark.slow  # title embeddings, then a few steps of every method
def test_every_method_runs_offline_and_reports_list_exposure(tmp_path):
    from agorasim.rl.methods import METHODS

    methods = sorted(METHODS)
    metrics = evaluate(out_dir=tmp_path, quick=True, progress=False, methods=methods)
    report = (tmp_path / "offline.md").read_text()
    for method in methods:
        key = f"sft+{method}"
        assert f"SFT+{method.upper()}" in report
        assert 0.0 <= metrics[f"{key}/test/coverage@10"] <= 1.0 and 0.0 <= metrics[f"{key}/test/gini@10"] <= 1.0
        assert f"info/{key}/test_ndcg@10_gain_se" in metrics
    # each method starts from the same SFT model, so an untrained method equals SFT exactly
    zero = evaluate(out_dir=tmp_path / "zero", quick=True, progress=False, methods=["flower"], grpo_steps=0)
    assert zero["sft+flower/test/ndcg@10"] == zero["sft/test/ndcg@10"]


def test_published_figures_belong_to_their_data_folder(tmp_path):
    from agorasim.run.offline import _markdown_table, published_figures

    vendored = published_figures(load_amazon().source)
    assert vendored[1]["MiniOneRec"] == {"ndcg@10": 0.1167, "hr@10": 0.1586}
    assert published_figures(tmp_path) == ("", {})  # another data folder: nothing published
    results = {"sft": {m: 0.5 for m in METRICS}}
    assert "MiniOneRec" not in _markdown_table(results, 10, ["sft"], published_figures(tmp_path))
    assert "| MiniOneRec |" in _markdown_table(results, 10, ["sft"], vendored)
    (tmp_path / "published.yaml").write_text("models: [1, 2]\n")
    with pytest.raises(UserInputError, match="published.yaml"):
        published_figures(tmp_path)
