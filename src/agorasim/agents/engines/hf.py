"""transformers engine: batched greedy or seeded sampling with left padding, on CPU or GPU.

Prompts are sorted by length and cut into batches of ``batch_size`` so padding stays small; each
answer stops at the end-of-turn token or ``max_tokens``.

Structured decoding: a request's ``guide`` (forced text, a choice among strings, bounded free
text) is compiled to token programs, and ``GuideProcessor`` masks the logits of every row at
every step so that only tokens continuing its program survive. A 135M model cannot be trusted to
write a JSON object on its own; guided, it only chooses (which item, click or not, the rating)
and writes the short reason, and every answer parses. Choices must be prefix-free once
tokenised; callers end each with a delimiter ("91," and "9,").
"""

from __future__ import annotations

import os
import time

import numpy as np

from agorasim.agents.engines.base import ChatRequest, ChatResponse, Engine, GuideSegment
from agorasim.agents.engines.models import bf16_is_fast, model_dir, quiet_loading


class _Program:
    """A guide compiled to tokens: ``("text", ids)``, ``("choice", trie)``, ``("free", chars, stop_id)``.

    Free text is bounded in characters, as the regex that vLLM decodes the same guide with
    (``guide_regex``), so both engines give answers of the same shape. ``token_chars[t]`` is the
    length of token ``t``'s text, at least 1, so free text always ends.
    """

    def __init__(self, guide: list[GuideSegment], encode, token_chars):
        self.token_chars = token_chars
        self.parts = []
        for seg in guide:
            if seg.text is not None:
                self.parts.append(("text", encode(seg.text)))
            elif seg.choices is not None:
                trie: dict = {}
                for choice in seg.choices:
                    node = trie
                    for t in encode(choice):
                        node = node.setdefault(t, {})
                    node[None] = True  # end of a choice
                self.parts.append(("choice", trie))
            else:
                stop = encode(seg.stop)
                if len(stop) != 1:
                    raise ValueError(f"guide stop {seg.stop!r} must be one token")
                self.parts.append(("free", seg.free, stop[0]))

    @property
    def budget(self) -> int:
        """Most tokens the program can emit (plus the end-of-turn token): a free character is at
        most one token."""
        def depth(node):
            return max((1 + depth(child) for key, child in node.items() if key is not None), default=0)
        return 1 + sum(len(p[1]) if p[0] == "text" else depth(p[1]) if p[0] == "choice" else p[1] + 1
                       for p in self.parts)

    def allowed(self, generated: list[int]):
        """Token ids allowed next: a list, ``("free", stop_id, characters left)`` or None once the
        program is done."""
        pos = 0
        for part in self.parts:
            if part[0] == "text":
                ids = part[1]
                if len(generated) < pos + len(ids):
                    return [ids[len(generated) - pos]]
                pos += len(ids)
            elif part[0] == "choice":
                node = part[1]
                while None not in node:
                    if pos == len(generated):
                        return [t for t in node if t is not None]
                    node = node[generated[pos]]
                    pos += 1
            else:
                _, limit, stop = part
                used = 0
                while True:
                    if pos == len(generated):
                        return [stop] if used >= limit else ("free", stop, limit - used)
                    token = generated[pos]
                    pos += 1
                    if token == stop:
                        break
                    used += self.token_chars[token]
        return None


class GuideProcessor:
    """Logits processor: rows with a program keep only the tokens it allows; free text may use
    any token but the ones in ``banned`` (quotes, newlines, backslashes) and those longer than
    the characters left (``token_chars``, a tensor over the vocabulary), then the stop token."""

    def __init__(self, programs: list[_Program | None], width: int, banned, token_chars, end_ids: list[int]):
        self.programs, self.width, self.banned, self.end_ids = programs, width, banned, end_ids
        self.token_chars = token_chars

    def __call__(self, input_ids, scores):
        import torch

        generated = input_ids[:, self.width:].tolist()
        for b, program in enumerate(self.programs):
            if program is None:
                continue
            allowed = program.allowed(generated[b])
            if allowed is None:
                allowed = self.end_ids
            if isinstance(allowed, tuple):  # free text: every short enough token but banned ones, or the stop
                _, stop, left = allowed
                keep = scores[b, stop].clone()
                scores[b, self.banned] = -torch.inf
                scores[b, : len(self.token_chars)][self.token_chars > left] = -torch.inf
                scores[b, len(self.token_chars):] = -torch.inf  # ids the tokenizer has no text for
                scores[b, stop] = keep
                continue
            keep = scores[b, allowed].clone()
            scores[b] = -torch.inf
            scores[b, allowed] = keep
        return scores


class HFEngine(Engine):
    backend = "hf"

    def __init__(self, model: str = "smollm2", batch_size: int = 16, device: str | None = None,
                 threads: int | None = None, dtype: str = "auto"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.model = model
        self.batch_size = batch_size
        path = model_dir(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if bf16_is_fast(self.device) else "float32"
        self.dtype = dtype
        dtype = getattr(torch, dtype)
        with quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.threads = threads
        self._free_text = None

    def free_text_tables(self):
        """(banned ids, characters per token as a list and as a tensor) for guided free text, over
        the tokenizer's ids: the banned tokens' text holds a quote, newline or backslash (never
        inside a JSON string) or they are special; a token's length is that of its text, at least 1."""
        if self._free_text is None:
            tok = self.tokenizer
            pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
            texts = [None if piece is None else tok.convert_tokens_to_string([piece]) for piece in pieces]
            bad = {i for i, text in enumerate(texts) if text is None or any(c in text for c in '"\\\n')}
            chars = [max(1, len(text or "")) for text in texts]
            self._free_text = (self.torch.tensor(sorted(bad | set(tok.all_special_ids))), chars,
                               self.torch.tensor(chars, device=self.device))
        return self._free_text

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode(self, request: ChatRequest) -> list[int]:
        messages = [m.model_dump() for m in request.messages]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        torch = self.torch
        encoded = [self._encode(r) for r in requests]
        order = np.argsort([len(e) for e in encoded], kind="stable")
        out: list[ChatResponse | None] = [None] * len(requests)
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                for i, response in zip(rows, self._batch([requests[i] for i in rows], [encoded[i] for i in rows])):
                    out[i] = response
                if self.progress is not None:
                    self.progress(len(rows))
        finally:
            torch.set_num_threads(previous)
        return out  # type: ignore[return-value]

    def _batch(self, requests: list[ChatRequest], encoded: list[list[int]]) -> list[ChatResponse]:
        torch, tok = self.torch, self.tokenizer
        width = max(len(e) for e in encoded)
        pad = tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=self.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=self.device)
        first = requests[0]
        sample = first.temperature > 0
        if sample:  # one generator per batch, seeded by the batch's first request
            torch.manual_seed(first.seed)
        stops = [tok.eos_token_id]
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tok.unk_token_id and im_end not in stops:
            stops.append(im_end)
        guided = any(r.guide for r in requests)
        banned, chars, chars_tensor = self.free_text_tables() if guided else (None, None, None)
        programs = [_Program(r.guide, self._encode_text, chars) if r.guide else None for r in requests]
        limits = [p.budget if p is not None else r.max_tokens for p, r in zip(programs, requests)]
        extra = {}
        if guided:
            from transformers import LogitsProcessorList
            extra["logits_processor"] = LogitsProcessorList(
                [GuideProcessor(programs, width, banned, chars_tensor, stops)])
        started = time.perf_counter()
        with torch.no_grad():
            generated = self.lm.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max(limits),
                do_sample=sample, temperature=first.temperature if sample else None,
                top_p=first.top_p if sample else None, top_k=None, pad_token_id=pad, eos_token_id=stops, **extra)
        elapsed = time.perf_counter() - started
        new = generated[:, width:].tolist()
        out = []
        for _request, prompt, tokens, limit in zip(requests, encoded, new, limits):
            kept = []
            for t in tokens[:limit]:
                if t in stops or t == pad:
                    break
                kept.append(t)
            out.append(ChatResponse(text=tok.decode(kept, skip_special_tokens=True), tokens_in=len(prompt),
                                    tokens_out=len(kept), latency_s=elapsed / len(requests)))
        return out
