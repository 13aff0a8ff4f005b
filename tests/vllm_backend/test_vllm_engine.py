"""The offline vLLM engine on the embedded SmolLM2-135M-Instruct: batching, JSON-schema guided
decoding, determinism, token counts, per-request errors, and a tiny market driven by it.

One engine is built for the whole module (start-up is most of the cost)."""

import importlib.util
import json

import numpy as np
import pytest

# the real vllm, not this folder seen as a namespace package (see conftest.py)
_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:
    pytest.skip("vllm is not installed (make test-vllm runs these in .venv-vllm)", allow_module_level=True)
jsonschema = pytest.importorskip("jsonschema")

from agorasim.agents import engines as engines_module  # noqa: E402
from agorasim.agents.engines import ChatRequest, Message, build_engine  # noqa: E402
from agorasim.agents.engines.vllm import VLLMEngine  # noqa: E402
from agorasim.config import LLMConfig, build_config  # noqa: E402
from agorasim.env.market import Market  # noqa: E402
from agorasim.scenarios import load_scenario  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

ITEMS = {17: "Trail running shoes", 42: "Cast-iron skillet", 93: "Noise-cancelling headphones"}
PICK_SCHEMA = {
    "type": "object",
    "properties": {
        "item_id": {"type": "integer", "enum": sorted(ITEMS)},
        "click": {"type": "boolean"},
        "reason": {"type": "string", "maxLength": 60},
    },
    "required": ["item_id", "click", "reason"],
    "additionalProperties": False,
}
PERSONAS = ["a marathon runner", "a home cook who loves stews", "a student who studies in noisy cafes",
            "a retired carpenter"]


def ask(persona: str, schema=None, max_tokens=96, **kw) -> ChatRequest:
    listing = "\n".join(f"- id {i}: {t}" for i, t in ITEMS.items())
    return ChatRequest(messages=[
        Message(role="system", content=f"You are {persona}, shopping online. Answer with JSON only."),
        Message(role="user", content=f"Which of these items would you click?\n{listing}\n"
                                     'Answer as {"item_id": <id>, "click": true|false, "reason": "<short>"}.'),
    ], max_tokens=max_tokens, json_schema=schema, **kw)


@pytest.fixture(scope="module")
def engine():
    engine = build_engine("vllm", LLMConfig(model="smollm2", gpu_memory_utilization=0.2))
    yield engine
    engine.close()


def test_build_engine_gives_a_vllm_engine(engine):
    assert isinstance(engine, VLLMEngine)
    assert engine.backend == "vllm" and engine.model == "smollm2"


def test_batch_answers_with_token_counts(engine):
    requests = [ask(p, max_tokens=32) for p in PERSONAS]
    responses = engine.generate(requests)
    assert len(responses) == len(requests)
    for r in responses:
        assert r.error is None and r.text.strip()
        assert r.tokens_in > 20 and 0 < r.tokens_out <= 32
        assert r.latency_s > 0
    # the prompts differ only in the persona: the longer persona has the longer prompt
    assert responses[2].tokens_in > responses[0].tokens_in


def test_json_schema_answers_are_valid_and_greedy_is_deterministic(engine):
    requests = [ask(p, schema=PICK_SCHEMA) for p in PERSONAS]
    first = engine.generate(requests)
    second = engine.generate(requests)
    for r in first:
        assert r.error is None, r.error
        answer = json.loads(r.text)
        jsonschema.validate(answer, PICK_SCHEMA)
        assert answer["item_id"] in ITEMS
    assert [r.text for r in first] == [r.text for r in second]
    assert [r.tokens_out for r in first] == [r.tokens_out for r in second]


def test_guided_answers_follow_the_guide_as_the_hf_engine_does(engine):
    """A user-agent request with a guide decodes as its regex: one grounded judgement that
    ``parse_answer`` accepts, for every persona."""
    import re

    from agorasim.agents import prompts
    from agorasim.agents.backends.llm import parse_answer
    from agorasim.agents.engines.base import guide_regex

    slate = sorted(ITEMS)
    requests = [ask(p, schema=prompts.user_schema(slate)).model_copy(update={"guide": prompts.user_guide(slate)})
                for p in PERSONAS]
    for r in engine.generate(requests):
        assert r.error is None, r.error
        assert re.fullmatch(guide_regex(requests[0].guide), r.text), r.text
        (judgement,) = parse_answer(r.text, slate)
        assert judgement.item_id in ITEMS and 0 <= judgement.rating <= 10


def test_seeded_sampling_is_reproducible(engine):
    requests = [ask(p, max_tokens=24, temperature=1.0, top_p=0.95, seed=7) for p in PERSONAS[:2]]
    assert [r.text for r in engine.generate(requests)] == [r.text for r in engine.generate(requests)]


def test_a_bad_request_is_its_own_error(engine):
    """A prompt longer than max_model_len fails alone; the rest of the batch is answered."""
    too_long = ChatRequest(messages=[Message(role="user", content="word " * 3000)], max_tokens=8)
    responses = engine.generate([ask(PERSONAS[0], max_tokens=8), too_long, ask(PERSONAS[1], max_tokens=8)])
    assert [r.error is None for r in responses] == [True, False, True]
    assert responses[1].text == "" and responses[1].error
    assert responses[0].text and responses[2].text


def test_tiny_market_with_vllm_users(engine, small_overrides, monkeypatch):
    """Two rounds of a small market with 10% of users driven by vLLM: the answers are grounded
    (a click is always an item of the user's slate) and the fallback rate is reported."""
    original = engines_module.build_engine
    monkeypatch.setattr(engines_module, "build_engine",  # reuse the module's engine (one model in memory)
                        lambda kind, cfg: engine if kind == "vllm" else original(kind, cfg))
    market = Market(build_config(load_scenario("cold-start"), small_overrides + [
        "policy.name=popularity", "agents.users.backend=vllm", "agents.users.llm_share=0.1"]))
    seen = []
    for _ in range(2):
        market.step()
        seen.append((market.last_round["slates"].copy(), market.last_round["feedback"]))
    rows = market.rows
    assert len(rows) == 2
    assert all("llm/fallback_rate" in r for r in rows)
    assert sum(r["llm/users/calls"] for r in rows) > 0
    assert all(r["llm/users/errors"] == 0 for r in rows)
    # guided answers always parse: no re-ask, no fallback (a round without LLM users has NaN)
    assert all(r["llm/reasks"] == 0 and (np.isnan(r["llm/fallback_rate"]) or r["llm/fallback_rate"] == 0) for r in rows)
    assert len(seen) == 2
    for slates, feedback in seen:
        picked = np.flatnonzero(feedback.choice >= 0)
        assert np.all(slates[picked, feedback.choice[picked]] >= 0)  # clicks are on shown items
        for b, why in feedback.why.items():
            assert set(why) <= {int(i) for i in slates[b] if i >= 0}  # judged items were shown


class _FakeLLM:
    """Stands in for ``vllm.LLM`` to drive the failure paths without a model."""

    def __init__(self, fail):
        self.fail, self.calls = fail, []

    def chat(self, conversations, params, use_tqdm=False):
        from types import SimpleNamespace

        self.calls.append(len(conversations))
        error = self.fail(conversations)
        if error is not None:
            raise error
        return [SimpleNamespace(prompt_token_ids=[1, 2, 3], outputs=[SimpleNamespace(text="ok", token_ids=[4, 5])])
                for _ in conversations]


def bare_engine(llm) -> VLLMEngine:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    engine = object.__new__(VLLMEngine)
    engine.structured, engine.disable_any_whitespace = True, True
    engine._SamplingParams, engine._StructuredOutputsParams = SamplingParams, StructuredOutputsParams
    engine.llm = llm
    return engine


def test_a_dead_engine_answers_errors_for_the_whole_batch():
    from vllm.v1.engine.exceptions import EngineDeadError

    llm = _FakeLLM(lambda conversations: EngineDeadError())
    responses = bare_engine(llm).generate([ask(p) for p in PERSONAS[:3]])
    assert llm.calls == [3]  # no request-by-request retry against a dead engine
    assert all(r.error and "EngineDeadError" in r.error and r.text == "" for r in responses)


def test_a_refused_batch_is_retried_request_by_request():
    refuse = lambda conversations: ValueError("too long") if any("carpenter" in str(c) for c in conversations) else None  # noqa: E731
    llm = _FakeLLM(refuse)
    responses = bare_engine(llm).generate([ask(p) for p in PERSONAS])
    assert llm.calls == [4, 1, 1, 1, 1]
    assert [r.error is None for r in responses] == [True, True, True, False]
    assert responses[0].text == "ok" and responses[0].tokens_in == 3 and responses[0].tokens_out == 2


def test_a_closed_engine_answers_errors():
    engine = bare_engine(_FakeLLM(lambda conversations: None))
    engine.close()
    responses = engine.generate([ask(PERSONAS[0]), ask(PERSONAS[1])])
    assert all(r.error for r in responses)
