"""The embedded SmolLM2-135M-Instruct through the transformers engine (loads a real model)."""

import numpy as np
import pytest

from agorasim.agents import prompts
from agorasim.agents.backends.llm import parse_answer
from agorasim.agents.engines import ChatRequest, Message
from agorasim.agents.engines.hf import HFEngine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    return HFEngine("smollm2", batch_size=4)


def slate_request(ids, seed=0, guided=True):
    messages = prompts.user_messages("You like durable tools.", ["Drill"], [(i, f"Item number {i}", "") for i in ids],
                                     defence=True)
    return ChatRequest(messages=messages, max_tokens=48, seed=seed, guide=prompts.user_guide(ids) if guided else None)


def test_guided_answers_always_parse_and_stay_in_the_slate(engine):
    slates = [[11, 250, 3], [7, 8, 9, 10], [4021, 77]]
    responses = engine.generate([slate_request(s) for s in slates])
    for slate, response in zip(slates, responses):
        judgements = parse_answer(response.text, slate)
        assert len(judgements) == 1 and judgements[0].item_id in slate
        assert 0 <= judgements[0].rating <= 10 and response.tokens_out > 10 and response.tokens_in > 50


def test_greedy_answers_are_deterministic(engine):
    requests = [slate_request([11, 250, 3]), slate_request([7, 8, 9, 10])]
    assert [r.text for r in engine.generate(requests)] == [r.text for r in engine.generate(requests)]


def test_unguided_text_respects_max_tokens(engine):
    request = ChatRequest(messages=[Message(role="user", content="Count from one to fifty in words.")], max_tokens=9)
    response = engine.generate([request])[0]
    assert 0 < response.tokens_out <= 9 and response.text and response.error is None
    assert np.isfinite(response.latency_s)


def test_progress_is_reported_batch_by_batch(engine):
    slates = [[11, 250, 3], [7, 8, 9, 10], [4021, 77], [5, 6], [12, 13, 14]]
    seen = []
    engine.set_progress(seen.append)
    try:
        engine.generate([slate_request(s) for s in slates])
    finally:
        engine.set_progress(None)
    assert seen == [4, 1]  # batch_size 4: five requests finish as a batch of four, then one
