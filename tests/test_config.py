import pytest

from agorasim.config import Config, build_config, parse_override
from agorasim.errors import UserInputError
from agorasim.scenarios import load_scenario, scenario_names


def test_packaged_scenarios_validate():
    names = scenario_names()
    assert {"cold-start", "popularity-loop", "fairness-tradeoff", "amazon-industrial"} <= set(names)
    for name in names:
        config = build_config(load_scenario(name))
        assert config.scenario == name


def test_large_market_is_a_million_users_with_approximate_retrieval(small_overrides):
    config = build_config(load_scenario("large-market"))
    assert (config.market.n_users, config.market.n_items) == (1_000_000, 100_000)
    assert config.env.retrieval.index == "ivf" and config.platform.reranker == "trirec"
    assert config.policy.name == "popularity"
    from agorasim.env.market import Market  # the same wiring, shrunk: it runs, through the ivf index

    market = Market(build_config(load_scenario("large-market"), small_overrides))
    for _ in range(2):
        market.step()
    assert market.retriever.kind == "ivf" and market.rows[-1]["users/visits"] > 0


def test_cold_start_defaults():
    config = build_config(load_scenario("cold-start"))
    assert config.run.rounds == 200
    assert config.market.new_items_per_round > 0 and config.market.new_users_per_round > 0
    assert config.label == "generative+trirec"


def test_override_types_are_parsed_as_yaml():
    assert parse_override("market.n_users=500") == ("market.n_users", 500)
    assert parse_override("platform.fairness_weight=0.5") == ("platform.fairness_weight", 0.5)
    assert parse_override("agents.users.churn=false") == ("agents.users.churn", False)
    assert parse_override("policy.name=bpr") == ("policy.name", "bpr")
    config = build_config({}, ["market.n_users=500", "agents.users.churn=false", "policy.name=bpr",
                                "policy.params={dim: 8}"])
    assert config.market.n_users == 500 and config.agents.users.churn is False
    assert config.policy.params.dim == 8 and type(config.policy.params).__name__ == "BPRParams"


def test_on_off_yes_no_stay_strings_as_in_yaml_1_2(tmp_path):
    """YAML 1.1 would read ``off`` as False and reject ``agents.cache.mode=off``."""
    assert parse_override("agents.cache.mode=off") == ("agents.cache.mode", "off")
    assert parse_override("x=yes") == ("x", "yes") and parse_override("x=True") == ("x", True)
    assert build_config({}, ["agents.cache.mode=off", "agents.users.churn=no"]).agents.cache.mode == "off"
    assert build_config({}, ["agents.users.churn=no"]).agents.users.churn is False  # pydantic reads "no"
    path = tmp_path / "mine.yaml"
    path.write_text("agents:\n  cache: {mode: off}\n")
    assert build_config(load_scenario(str(path))).agents.cache.mode == "off"


@pytest.mark.parametrize("override, expected", [
    ("market.n_user=5", "unknown config key 'market.n_user'"),
    ("markets.n_users=5", "unknown config key 'markets.n_users'"),
    ("market.n_users=-5", "config market.n_users: Input should be greater than 0"),
    ("market.n_users=many", "config market.n_users"),
    ("platform.reranker=magic", "must be one of"),
    ("agents.users.trust=1.5", "config agents.users.trust"),
    ("market.n_users", "--set expects dotted.key=value"),
])
def test_bad_overrides_name_the_field(override, expected):
    with pytest.raises(UserInputError) as error:
        build_config(load_scenario("cold-start"), [override])
    message = str(error.value)
    assert expected in message
    assert "\n" not in message


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(UserInputError, match="n_users, n_items"):
        build_config({}, ["market.n_user=5"])


def test_unknown_key_in_scenario_file_is_reported():
    with pytest.raises(UserInputError, match="unknown config key 'platform.fairness'"):
        build_config({"platform": {"fairness": 1}})


def test_unknown_scenario():
    with pytest.raises(UserInputError, match="unknown scenario 'nope': choose one of .*cold-start"):
        load_scenario("nope")


def test_dump_roundtrip():
    import yaml

    from agorasim.config import dump_config, validate

    config = build_config(load_scenario("fairness-tradeoff"), ["run.seed=3"])
    data = yaml.safe_load(dump_config(config, {"git_sha": "x"}))
    assert data.pop("meta") == {"git_sha": "x"}
    assert validate(data) == config
    assert isinstance(Config().market.n_users, int)


def test_every_config_field_has_a_description():
    from pydantic import BaseModel

    from agorasim.config import Config
    from agorasim.run.offline import OfflineConfig

    missing, seen = [], set()

    def walk(model: type[BaseModel], where: str) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{where}{name}.")
            elif not field.description:
                missing.append(where + name)

    walk(Config, "")
    walk(OfflineConfig, "eval.")
    assert missing == []


def test_method_sections_validate_at_the_edge():
    from agorasim.config import build_config
    from agorasim.errors import UserInputError

    for key, value, message in [("rl.method", "ppo", "rl.method: must be one of"),
                                ("rl.flexrec.need", "fun", "rl.flexrec.need"),
                                ("rl.ugr.alpha_min", "2", "rl.ugr.alpha_min"),
                                ("rl.blade.slate_size", "0", "rl.blade.slate_size"),
                                ("rl.flower.theta", "1.5", "rl.flower.theta"),
                                ("rl.flame.bogus", "1", "unknown config key 'rl.flame.bogus'"),
                                ("rl.kl_estimator", "k9", "rl.kl_estimator")]:
        with pytest.raises(UserInputError, match=message):
            build_config({}, [f"{key}={value}"])


def test_policy_params_are_the_named_policys_model():
    """``policy.params`` is a union discriminated by ``policy.name``: validated into that policy's
    model with the config, shared fields filled from their sections unless given, stored in full."""
    import yaml

    from agorasim.config import dump_config
    from agorasim.policy.params import BPRParams, SASRecParams

    config = build_config({}, ["policy.name=sasrec", "market.history_length=30", "policy.refit_every=7"])
    params = config.policy.params
    assert type(params) is SASRecParams and (params.max_len, params.refit_every, params.dim) == (30, 7, 32)
    given = build_config({}, ["policy.name=sasrec", "market.history_length=30", "policy.params={max_len: 12}"])
    assert given.policy.params.max_len == 12  # given values win over the fills
    stored = yaml.safe_load(dump_config(config))["policy"]["params"]
    assert stored == {"refit_every": 7, "dim": 32, "n_blocks": 2, "n_heads": 1, "max_len": 30, "dropout": 0.1,
                      "lr": 0.002, "epochs": 3, "batch_size": 128, "threads": 1}
    # the stored config builds the same parameters, even under another history length
    again = build_config(yaml.safe_load(dump_config(config)), ["market.history_length=50"])
    assert again.policy.params == params
    dotted = build_config({}, ["policy.name=bpr", "policy.params.dim=4"]).policy.params
    assert type(dotted) is BPRParams and dotted.dim == 4 and dotted.lr == 0.05
    assert build_config({}, ["policy.name=generative"]).policy.params.max_len == 20


@pytest.mark.parametrize("sets, message", [
    (["policy.name=nope"], "config policy.name: unknown policy 'nope': choose one of random, popularity, bpr"),
    (["policy.params={dim: 8}"], "config policy.params: policy 'popularity': unknown parameter(s) dim; "
                                 "allowed: refit_every"),
    (["policy.name=bpr", "policy.params={dim: 0}"],
     "config policy.params: policy 'bpr': dim: Input should be greater than or equal to 1 (got 0)"),
    (["policy.name=bpr", "policy.params=8"],
     "config policy.params: policy 'bpr': params must be a mapping of parameter: value (got 8)"),
])
def test_bad_policy_params_are_one_line(sets, message):
    with pytest.raises(UserInputError) as caught:
        build_config({}, sets)
    assert str(caught.value) == message or str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_a_policy_without_a_params_model_gets_one_from_its_constructor():
    from agorasim.policy import POLICIES, RandomPolicy, params_model, register_policy

    class Tempered(RandomPolicy):
        Params = None

        def __init__(self, temperature=0.5, depth=2):
            super().__init__()
            self.temperature, self.depth = temperature, depth

    register_policy("tempered-test", Tempered)
    try:
        assert set(params_model("tempered-test").model_fields) == {"temperature", "depth"}
        config = build_config({}, ["policy.name=tempered-test", "policy.params={depth: 3}"])
        assert (config.policy.params.temperature, config.policy.params.depth) == (0.5, 3)
        with pytest.raises(UserInputError, match="unknown parameter.s. width; allowed: temperature, depth"):
            build_config({}, ["policy.name=tempered-test", "policy.params={width: 3}"])
    finally:
        del POLICIES["tempered-test"]
