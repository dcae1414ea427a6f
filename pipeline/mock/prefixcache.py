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
  them, but a prefix matches only with the same ones); then one block a part of each message
  (a text alone is one text part, as both providers read it; an image, a document, then the
  question that varies: a prefix may end inside a message, as theirs do), the first with its role
  and 4 tokens, each its text's tokens as `estimate_tokens` counts them (len // 4; an image
  none), its identity without `cache_control` markers. Each block is hashed with every block
  before it and with `prompt_cache_key` (so the same key routes to the same prefixes, and a
  different key to others; all keys share the model's places): a prefix is known by its last
  block's hash, and nothing of the text is kept.
- The cache holds, per model, at most `size` prefixes, each dropped `ttl` seconds after its last
  use, the least recently used dropped first when a new one needs the room.
- Read, when the request arrives: its cached tokens are the tokens of its longest leading run of
  blocks that a kept prefix starts with, if at least `min_tokens` (else 0). The prefix read
  counts as used.
- Write, when the answer is made (so that requests sent together with the same new prefix all
  miss it, as at both providers: a prefix is cached once a request has processed it): without
  markers, the whole prompt, as OpenAI keeps it; with markers, the blocks up to the last marked
  one. Stored if at least `min_tokens`: a prefix already held (whole, or as the start of a
  longer one) is only refreshed; a new one takes the place of the kept prefixes it extends or
  shares a cacheable start with (one place a shared system prompt, whatever follows it). With
  markers, the tokens up to the last one beyond those read are reported as written
  (`cache_write_tokens`), by every request that did not read them; without, 0.
- Anthropic's models (`prices.anthropic`) cache only at markers: a request with none reads
  and writes nothing; one with markers reads only a prefix written before, whole (its entry
  ends at a marked block of the request: the lookback to earlier blocks finds entries, not
  the leading runs of longer ones), and each written prefix is an entry of its own.
- On the mock's clock (`config.clock`: tests move a fake one).

Not modelled: OpenAI's 128-token granularity (blocks are whole texts or parts), its overflow of
a busy prefix to other machines (so a `prompt_cache_key` here only partitions, never helps), a
cache hit's shorter latency, images' tokens (the mock counts none, so an image alone never
makes a prefix long enough), and the batch APIs (their lines are answered without it, and say
so: none of their prompt cached). The cost the mock states charges cached tokens at a quarter
of the prompt price and written ones at 1.25x (`answers.completion`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from pipeline.prices import anthropic

LEADING = ("tools", "tool_choice", "response_format")  # what sits before the messages of a prompt
MARKER = "cache_control"
# Models held at most (so that the mock's memory and time stay bounded, whatever the names a
# client sends), the least recently asked forgetting its prefixes first.
MODELS_KEPT = 256


class Served(NamedTuple):
    """What the cache gave a request: prompt tokens read from it, and written to it."""

    cached: int
    written: int


class Block(NamedTuple):
    key: bytes  # the hash of this block and every one before it
    tokens: int  # the tokens of this block and every one before it
    marked: bool  # a cache_control breakpoint on it


class Reading(NamedTuple):
    """What a request read from the cache when it arrived, for `PrefixCache.write` to finish."""

    model: str
    chain: list[Block]
    cached: int


def _text_tokens(part: Any) -> int:
    text = part.get("text") if isinstance(part, dict) else None
    return len(text) // 4 if isinstance(text, str) else 0


def _pieces(message: Any) -> list[tuple[bytes, int, bool]]:
    """A message's blocks, each (what identifies it, its tokens, marked): one for a text, one a
    part for a list of parts, the first with the message's role and other fields (and its 4
    tokens). Their tokens add up to no more than the message's share of
    `answers.estimate_tokens`, so the cached tokens of a prompt never exceed its prompt tokens."""
    if not isinstance(message, dict):
        return [(b"m" + orjson.dumps(message, option=orjson.OPT_SORT_KEYS), 4, False)]
    head = {k: v for k, v in message.items() if k not in (MARKER, "content")}
    marked = MARKER in message
    content = message.get("content")
    if isinstance(content, str):  # the same as one text part (both providers read it so)
        content = [{"type": "text", "text": content}]
    parts: list[Any] = content if isinstance(content, list) and content else [content]
    out = []
    for i, part in enumerate(parts):
        plain = {k: v for k, v in part.items() if k != MARKER} if isinstance(part, dict) else part
        identity = {"head": head, "part": plain} if i == 0 else {"part": plain}
        tokens = (4 if i == 0 else 0) + _text_tokens(part)
        out.append(
            (
                (b"m" if i == 0 else b"p") + orjson.dumps(identity, option=orjson.OPT_SORT_KEYS),
                tokens,
                isinstance(part, dict) and MARKER in part,
            )
        )
    if marked:  # a marker on the message: its last part ends the prefix
        last = out[-1]
        out[-1] = (last[0], last[1], True)
    return out


def _hash(key: bytes, piece: bytes) -> bytes:
    return hashlib.blake2b(key + piece, digest_size=16).digest()


def blocks(body: dict[str, Any]) -> list[Block]:
    """The request's prompt as a chain of blocks (see the module's docstring)."""
    route = body.get("prompt_cache_key")
    key = _hash(b"", orjson.dumps(route if isinstance(route, str) else None))
    chain: list[Block] = []
    leading = {k: body[k] for k in LEADING if k in body}
    if leading:
        key = _hash(key, b"t" + orjson.dumps(leading, option=orjson.OPT_SORT_KEYS))
        chain.append(Block(key, 0, False))
    tokens = 0
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        for piece, piece_tokens, marked in _pieces(message):
            key = _hash(key, piece)
            tokens += piece_tokens
            chain.append(Block(key, tokens, marked))
    return chain


def _stored(chain: list[Block]) -> list[Block]:
    """The leading blocks a provider keeps for the next caller: up to the last marker, or the
    whole prompt (OpenAI's cache holds the prefix of the prompt it processed, its last message
    too)."""
    last_marked = max((i for i, b in enumerate(chain) if b.marked), default=None)
    if last_marked is not None:
        return chain[: last_marked + 1]
    return chain


@dataclass
class _Kept:
    keys: frozenset[bytes]  # every leading run of the prefix, by its hash
    used: float  # when last read or written, on the mock's clock


class PrefixCache:
    """Per model, the few prefixes a provider keeps; `serve` reads and writes for one request."""

    def __init__(self, *, size: int, ttl: float, min_tokens: int, clock: Callable[[], float]) -> None:
        self.size, self.ttl, self.min_tokens, self.clock = size, ttl, min_tokens, clock
        # by model, least recently asked first; then by the prefix's last block's hash
        self._models: OrderedDict[str, OrderedDict[bytes, _Kept]] = OrderedDict()

    def kept(self, model: str) -> int:
        """Prefixes held for `model` now."""
        now = self.clock()
        return sum(1 for p in self._models.get(model, {}).values() if now - p.used < self.ttl)

    def _fresh(self, model: str, now: float) -> OrderedDict[bytes, _Kept]:
        kept = self._models.get(model)
        if kept is None:
            if len(self._models) >= MODELS_KEPT:  # the model least recently asked forgets its prefixes
                self._models.popitem(last=False)
            kept = self._models[model] = OrderedDict()
        else:
            self._models.move_to_end(model)
        for key in [k for k, p in kept.items() if now - p.used >= self.ttl]:
            del kept[key]
        return kept

    def _use(self, kept: OrderedDict[bytes, _Kept], key: bytes, now: float) -> None:
        kept[key].used = now
        kept.move_to_end(key)

    def _done(self, model: str, kept: OrderedDict[bytes, _Kept]) -> None:
        if not kept:
            self._models.pop(model, None)  # a model seen once holds nothing after its prefixes expire

    def read(self, body: dict[str, Any]) -> Reading:
        """On the request's arrival: the tokens of its longest leading run of blocks a kept prefix
        starts with, if at least `min_tokens` (else 0); the prefix read counts as used."""
        now = self.clock()
        chain = blocks(body)
        model = str(body.get("model"))
        kept = self._fresh(model, now)
        cached, read = 0, None
        if anthropic(model):  # (an entry read whole, only by a request with a marker)
            ends = _stored(chain) if any(b.marked for b in chain) else []
            read = next((b.key for b in reversed(ends) if b.key in kept), None)
            cached = next(b.tokens for b in chain if b.key == read) if read is not None else 0
        for key, prefix in kept.items() if not anthropic(model) else ():
            match = next((b.tokens for b in reversed(chain) if b.key in prefix.keys), 0)
            if match > cached:
                cached, read = match, key
        if read is None or cached < self.min_tokens:
            cached = 0
        else:
            self._use(kept, read, now)
        self._done(model, kept)
        return Reading(model, chain, cached)

    def write(self, reading: Reading) -> Served:
        """When the answer is made: keep the request's prefix for the next caller (a request that
        arrived meanwhile did not find it), and say what it read and wrote."""
        now = self.clock()
        kept = self._fresh(reading.model, now)
        written = 0
        own = anthropic(reading.model)  # (its entries its own, and none without a marker)
        stored = _stored(reading.chain) if not own or any(b.marked for b in reading.chain) else []
        if stored and stored[-1].tokens >= self.min_tokens:
            last = stored[-1].key
            holder = last if own and last in kept else None
            if not own:
                holder = next((k for k, p in kept.items() if last in p.keys), None)
            if holder is not None:
                self._use(kept, holder, now)
            else:
                keys = frozenset(b.key for b in stored)
                shared = {b.key for b in stored if b.tokens >= self.min_tokens}
                # One place a shared start: the prefixes this one extends, or that begin with a
                # cacheable run it begins with too, give it theirs (their other tails are lost).
                for key in [k for k, p in kept.items() if k in keys or p.keys & shared] if not own else ():
                    del kept[key]
                kept[last] = _Kept(keys, now)
                while len(kept) > self.size:
                    kept.popitem(last=False)
            if stored[-1].marked and stored[-1].tokens > reading.cached:
                written = stored[-1].tokens - reading.cached
        self._done(reading.model, kept)
        return Served(reading.cached, written)

    def serve(self, body: dict[str, Any]) -> Served:
        """A request read and written at once (an answer made the moment it arrives)."""
        return self.write(self.read(body))
