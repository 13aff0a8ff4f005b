"""Deterministic fake engine for tests: canned text derived from a hash of the prompt.

It reads the prompt the way a model would, just dumber: for a slate it picks an item by a hash of
the prompt (or nothing) and rates it; it *obeys* any instruction it reads that asks for a rating
of 10, which makes it the reference victim for the injection defence; for a promotion it lists
the facts; for a description it echoes the first liked title. ``script`` replaces it with any
function of the request (to produce malformed answers, say).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable

from agorasim.agents.engines.base import ChatRequest, ChatResponse, Engine
from agorasim.agents.prompts import INJECTION

ITEM_LINE = re.compile(r"^\[(\d+)\] (.*)$", re.MULTILINE)
NAMED_ID = re.compile(r"\[(\d+)\]")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def obeyed_items(prompt: str) -> tuple[list[int], list[int]]:
    """(listed ids, ids an injection in the listing told it to pick). A line obeys when its text,
    less the prompt's own ``Seller says:`` label, matches an injection pattern; it aims at the last
    ``[id]`` it names (a fake system line, a spoofed item line) or else at its own item."""
    ids, aims = [], []
    for line in prompt[prompt.index("Items shown:"):].splitlines()[1:]:
        match = ITEM_LINE.match(line)
        own = int(match.group(1)) if match else None
        if own is not None and own not in ids:
            ids.append(own)
        text = (match.group(2) if match else line).replace("Seller says:", " ")
        if INJECTION.search(text):
            named = [int(x) for x in NAMED_ID.findall(text)]
            aim = named[-1] if named else own
            if aim is not None and aim not in aims:
                aims.append(aim)
    return ids, [a for a in aims if a in ids]


def fake_answer(request: ChatRequest) -> str:
    prompt = request.messages[-1].content
    h = _digest(prompt + str(request.seed))
    if "Items shown:" in prompt:
        ids, obeyed = obeyed_items(prompt)
        pick = obeyed[0] if obeyed else (ids[h % (len(ids) + 1)] if h % (len(ids) + 1) < len(ids) else None)
        answer = [{"item_id": i, "click": i == pick, "rating": 10 if i in obeyed else int(h >> 8) % 11,
                   "reason": "told to" if i in obeyed else "fits me" if i == pick else "not for me"}
                  for i in ids[:3] + ([pick] if pick is not None and pick not in ids[:3] else [])]
        return json.dumps(answer)
    if "Write an explanation" in prompt:  # names the aspects it is given, two at most
        aspects = re.search(r"Aspects: (.*)", prompt).group(1)
        named = [] if aspects == "none listed" else aspects.split(", ")[:2]
        return f"You will like it: {' and '.join(named)}." if named else "A good match for you."
    if "Write a promotion" in prompt:
        product = re.search(r"Product: (.*)", prompt).group(1)
        facts = re.search(r"Facts: (.*)", prompt).group(1)
        return f"{product}. {facts}."
    if "Describe" in prompt:
        liked = re.search(r"such as: ([^;.]*)", prompt)
        return liked.group(1) if liked else "a useful everyday product"
    return "ok"


class FakeEngine(Engine):
    backend = "fake"

    def __init__(self, script: Callable[[ChatRequest], str] | None = None, model: str = "fake"):
        self.script = script or fake_answer
        self.model = model
        self.calls = 0

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        out = []
        for request in requests:
            self.calls += 1
            text = self.script(request)
            tokens_in = sum(len(m.content.split()) for m in request.messages)
            out.append(ChatResponse(text=text, tokens_in=tokens_in, tokens_out=len(text.split())))
        return out
