"""The mock's prompt (prefix) cache, as a provider keeps one (`pipeline mock --prefix-cache N`).

What it stands in for:
- OpenAI's automatic caching: a prompt of 1,024 tokens or more is routed by a hash of its
  leading tokens (and of `prompt_cache_key`, when the body has one) to a machine that may hold
  its prefix from a recent request; the longest cached leading part is reported as
  `usage.prompt_tokens_details.cached_tokens`, kept 5 to 10 minutes after its last use; writes
  cost nothing, reads a half to a tenth of the prompt price, by model.
- Anthropic's `cache_control` (as OpenRouter passes it on): the prefix up to a marked block is
  written to the cache (at 1.25x the prompt price) and read by a later request that starts with
  it (at a tenth); OpenRouter reports reads as `prompt_tokens_details.cached_tokens` and writes
  as `prompt_tokens_details.cache_write_tokens` (Anthropic's own `cache_read_input_tokens` and
  `cache_creation_input_tokens`). The cache lives 5 minutes, refreshed by each read.

The rule here:
- A prompt is a chain of blocks: first, when the body has `tools`, `tool_choice` or
  `response_format`, one block of them (no tokens: `answers.estimate_tokens` counts none for
  them, but a prefix matches only with the same ones); then one block a message, its text's
  tokens as `estimate_tokens` counts them (len // 4, and 4 a message), its identity the whole
  message (role, text, image URLs or data) without its `cache_control` markers. Each block is
  hashed with every block before it and with `prompt_cache_key` (so the same key routes to the
  same prefixes, and a different key to others; all keys share the model's places): a prefix
  is known by its last block's hash, and nothing of the text is kept.
- The cache holds, per model, at most `size` prefixes, each dropped `ttl` seconds after its last
  use, the least recently used dropped first when a new one needs the room.
- Read: the request's cached tokens are the tokens of its longest leading run of blocks that a
  kept prefix starts with, if at least `min_tokens` (else 0). The prefix read counts as used.
- Write: what a provider would keep for the next caller. Without markers, every block but the
  last message (the shared instructions, few-shot examples, earlier turns; the last message is
  the part that varies); with markers, the blocks up to the last marked one. Stored if at
  least `min_tokens`: a prefix already held (whole, or as the start of a longer one) is only
  refreshed; a new one replaces the kept prefixes it extends. With markers, a new prefix's
  tokens beyond those read are reported as written (`cache_write_tokens`); without, 0.
- Read and write happen together when the answer is made, on the mock's clock (`config.clock`:
  tests move a fake one).

Not modelled: OpenAI's 128-token granularity (blocks are whole messages), its overflow of a
busy prefix to other machines (so a `prompt_cache_key` here only partitions, never helps), a
cache hit's shorter latency, and the batch APIs (their lines are answered without it). The cost
the mock states charges cached tokens at a quarter of the prompt price and written ones at
1.25x (`answers.completion`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

LEADING = ("tools", "tool_choice", "response_format")  # what sits before the messages of a prompt
MARKER = "cache_control"
MODELS_SWEPT = 64  # models held before those with nothing fresh are forgotten


class Served(NamedTuple):
    """What the cache gave a request: prompt tokens read from it, and written to it."""

    cached: int
    written: int


class Block(NamedTuple):
    key: bytes  # the hash of this block and every one before it
    tokens: int  # the tokens of this block and every one before it
    marked: bool  # a cache_control breakpoint on it


def _unmarked(value: Any) -> tuple[Any, bool]:
    """`value` (a message or a part) without its cache_control markers, and whether it had any."""
    if not isinstance(value, dict):
        return value, False
    marked = MARKER in value
    out = {k: v for k, v in value.items() if k != MARKER}
    content = out.get("content")
    if isinstance(content, list):
        parts = [_unmarked(p) for p in content]
        out["content"] = [p for p, _ in parts]
        marked = marked or any(m for _, m in parts)
    return out, marked


def _tokens(message: Any) -> int:
    """The message's share of `answers.estimate_tokens`: never more, so the cached tokens of a
    prompt never exceed its prompt tokens."""
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        pieces = [content]
    elif isinstance(content, list):
        pieces = [p.get("text", "") for p in content if isinstance(p, dict)]
    else:
        pieces = []
    text = " ".join(p for p in pieces if isinstance(p, str))
    return len(text) // 4 + 4


def blocks(body: dict[str, Any]) -> list[Block]:
    """The request's prompt as a chain of blocks (see the module's docstring)."""
    route = body.get("prompt_cache_key")
    key = hashlib.blake2b(orjson.dumps(route if isinstance(route, str) else None), digest_size=16).digest()
    chain: list[Block] = []
    leading = {k: body[k] for k in LEADING if k in body}
    if leading:
        key = hashlib.blake2b(
            key + orjson.dumps(leading, option=orjson.OPT_SORT_KEYS), digest_size=16
        ).digest()
        chain.append(Block(key, 0, False))
    tokens = 0
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        plain, marked = _unmarked(message)
        key = hashlib.blake2b(key + orjson.dumps(plain, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()
        tokens += _tokens(message)
        chain.append(Block(key, tokens, marked))
    return chain


def _stored(chain: list[Block]) -> list[Block]:
    """The leading blocks a provider keeps for the next caller."""
    last_marked = max((i for i, b in enumerate(chain) if b.marked), default=None)
    if last_marked is not None:
        return chain[: last_marked + 1]
    return chain[:-1]


@dataclass
class _Kept:
    keys: frozenset[bytes]  # every leading run of the prefix, by its hash
    used: float  # when last read or written, on the mock's clock


class PrefixCache:
    """Per model, the few prefixes a provider keeps; `serve` reads and writes for one request."""

    def __init__(self, *, size: int, ttl: float, min_tokens: int, clock: Callable[[], float]) -> None:
        self.size, self.ttl, self.min_tokens, self.clock = size, ttl, min_tokens, clock
        self._models: dict[str, OrderedDict[bytes, _Kept]] = {}  # by the prefix's last block's hash

    def kept(self, model: str) -> int:
        """Prefixes held for `model` now."""
        now = self.clock()
        return sum(1 for p in self._models.get(model, {}).values() if now - p.used < self.ttl)

    def _fresh(self, model: str, now: float) -> OrderedDict[bytes, _Kept]:
        if model not in self._models and len(self._models) >= MODELS_SWEPT:
            for name in list(self._models):  # many models named: forget those whose prefixes expired
                if not self._fresh(name, now):
                    del self._models[name]
        kept = self._models.setdefault(model, OrderedDict())
        for key in [k for k, p in kept.items() if now - p.used >= self.ttl]:
            del kept[key]
        return kept

    def _use(self, kept: OrderedDict[bytes, _Kept], key: bytes, now: float) -> None:
        kept[key].used = now
        kept.move_to_end(key)

    def serve(self, body: dict[str, Any]) -> Served:
        now = self.clock()
        chain = blocks(body)
        model = str(body.get("model"))
        kept = self._fresh(model, now)
        cached, read = 0, None
        for key, prefix in kept.items():
            match = next((b.tokens for b in reversed(chain) if b.key in prefix.keys), 0)
            if match > cached:
                cached, read = match, key
        if read is None or cached < self.min_tokens:
            cached = 0
        else:
            self._use(kept, read, now)
        written = 0
        stored = _stored(chain)
        if stored and stored[-1].tokens >= self.min_tokens:
            last = stored[-1].key
            holder = next((k for k, p in kept.items() if last in p.keys), None)
            if holder is not None:
                self._use(kept, holder, now)
            else:
                keys = frozenset(b.key for b in stored)
                for key in [k for k in kept if k in keys]:  # prefixes this one extends
                    del kept[key]
                kept[last] = _Kept(keys, now)
                while len(kept) > self.size:
                    kept.popitem(last=False)
                if stored[-1].marked:
                    written = stored[-1].tokens - cached
        if not kept:
            del self._models[model]  # a model seen once holds nothing after its prefixes expire
        return Served(cached, written)
