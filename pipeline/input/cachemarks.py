"""`prompt_cache = true`: the markers a provider needs to keep a request's shared prefix.

- Anthropic's models (a name with `claude`, or `anthropic/...`) cache only what is marked: a
  `cache_control: {"type": "ephemeral"}` (5 minutes, written at 1.25x the prompt price, read at
  a tenth) on the last block of the shared prefix, as OpenRouter passes it on. A string
  content becomes a one-text-part list to bear it (the same prompt to the model). No marker
  when the line has one there already, or has the most breakpoints a request may (4), or the
  prefix ends on a block that cannot bear one (then the last one before it that can and is
  long enough bears it).
- Every other model (OpenAI, and any OpenAI-compatible endpoint; Gemini and DeepSeek cache
  without markers, at no cost to write): `prompt_cache_key`, the prefix's key, which OpenAI
  routes by, so that lines of one prefix meet the machine that holds it; a line's own is kept.

Only the body changes, and only by these markers: the answer cache's key leaves them out
(`cache.key`). A body without a long shared prefix (`input.prefix`) is sent as it is.

A run marks through `Marks`, which remembers the prefixes of the lines before (the last
`SEEN`): a line is marked at the longest block of its prefix that an earlier line had too
(for other models, keyed by that prefix), and not at all when none had. A prefix is shared or not by other lines, which one
line cannot tell; a marker on one that no other line has is written at 1.25x and never read.
A line's own last block is not always what varies: `[system, user, assistant "{"]` (a
prefill) ends its prefix on the user's question, `[user: [document, question]]` on the
document; marked there, every line paid a quarter more for its prompt and read nothing.
The first line of a prefix goes unmarked (at the prompt price, not the write's), the second
writes it, the rest read it. At OpenAI, a key of its own routes a line apart from the lines
that share its start, which it would meet with no key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import orjson

from pipeline.input.prefix import LEADING, MARKER, MIN_TOKENS, Block, Images, prefix_blocks, shared_prefix
from pipeline.prices import anthropic

BREAKPOINTS = 4  # cache_control markers one Anthropic request may hold
SEEN = 1 << 16  # prefixes `Marks` remembers (16 bytes each), the least recently seen dropped
KEY = "prompt_cache_key"
# Parts Anthropic (through OpenRouter) lets bear a marker: text, an image, a document.
_MARKABLE = ("text", "image_url", "file")


def mark(body: dict[str, Any], model: str, images: Images | None = None) -> dict[str, Any]:
    """`body` with the markers its provider needs to cache its shared prefix (a new dict
    where it changes: the line's own objects are left as they are)."""
    if anthropic(model):  # (its models cache only what is marked)
        found = prefix_blocks(body, images)
        return body if found is None else _marked(body, found[1])[0]
    if KEY in body:
        return body
    key = shared_prefix(body, model, images)
    return body if key is None else {**body, KEY: key.key}


class Marks:
    """`mark` for a run's lines, in order: a line's marker (or key) only where an earlier
    line's prefix ran as far (see the module's docstring)."""

    def __init__(self, size: int = SEEN) -> None:
        self.size = size
        self.seen: dict[bytes, None] = {}  # (in the order last seen: the oldest first out)

    def __call__(self, body: dict[str, Any], model: str, images: Images | None = None) -> dict[str, Any]:
        return self.keyed(body, model, images)[0]

    def keyed(
        self, body: dict[str, Any], model: str, images: Images | None = None
    ) -> tuple[dict[str, Any], str | None]:
        """The body marked, and the key of its shared prefix for `run.grouping` (as
        `input.prefix.prefix_key`'s, computed once): None where the line has no long shared
        prefix, or, at Anthropic, bears no marker on it (it can neither write nor read the
        cache: holding it to go with its kin would gain nothing)."""
        own = anthropic(model)
        found = prefix_blocks(body, images)
        if found is None:
            return body, None
        leading, blocks = found
        digests = _digests(body, blocks, model, images)  # (the leading block's last, at -1)
        key = _hex(digests[-2] if blocks else digests[-1])
        if not own and KEY in body:
            return body, key
        seen, shared = self.seen, set()
        for i, digest in enumerate(digests):
            if digest is None:
                continue
            if digest in seen:
                del seen[digest]
                shared.add(i if i < len(blocks) else -1)
            seen[digest] = None
        while len(seen) > self.size:
            del seen[next(iter(seen))]
        if own:
            body, marked = _marked(body, blocks, shared)
            return body, key if marked else None
        # A key no other line has would route the line apart from those that share its start
        # (OpenAI routes by the key with the prompt's start): the longest prefix seen before.
        for i in range(len(blocks) - 1, -1, -1):
            if blocks[i].tokens < MIN_TOKENS:
                break
            if i in shared:
                return {**body, KEY: _hex(digests[i])}, key
        if leading >= MIN_TOKENS and -1 in shared:
            return {**body, KEY: _hex(digests[-1])}, key
        return body, key


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # (an integer past 64 bits, a nesting past 255 levels)
        return json.dumps(value, sort_keys=True, default=repr).encode("utf-8", "surrogatepass")


def _hex(digest: bytes | None) -> str:
    return "" if digest is None else digest[:8].hex()


def _digests(
    body: Mapping[str, Any], blocks: list[Block], model: str, images: Images | None
) -> list[bytes | None]:
    """Each block's prefix (the model, the leading block, every block to it), hashed as the
    model reads it: without markers, a string content as its one text part, a local image by
    its file; and last, the leading block's alone (None: the body has none)."""
    digest = hashlib.sha256(model.encode("utf-8", "surrogatepass"))
    leading = {k: body[k] for k in LEADING if k in body}
    lead = None
    if leading:
        digest.update(b"t" + _dumps(leading))
        lead = digest.copy().digest()[:16]
    out: list[bytes | None] = []
    messages = body["messages"] if blocks else []
    for block in blocks:
        message = messages[block.message]
        content = message.get("content") if isinstance(message, dict) else message
        if block.part is None or block.part == 0:
            head = (
                message
                if not isinstance(message, dict)
                else {k: v for k, v in message.items() if k != MARKER and k != "content"}
            )
            digest.update(b"m" + _dumps(head))
        if block.part is not None and isinstance(content, list):
            part = content[block.part]
        else:
            part = {"type": "text", "text": content} if isinstance(content, str) else content
        if isinstance(part, dict):
            part = {k: v for k, v in part.items() if k != MARKER}
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if images and isinstance(image, dict) and isinstance(url, str) and url in images:
                part["image_url"] = {**image, "url": "file:" + images[url][0]}
        digest.update(b"p" + _dumps(part))
        out.append(digest.copy().digest()[:16])
    out.append(lead)
    return out


def _markers(body: Mapping[str, Any]) -> int:
    count = 0
    for name in ("messages", "tools"):
        items = body.get(name)
        for item in items if isinstance(items, list) else ():
            if not isinstance(item, dict):
                continue
            count += MARKER in item
            content = item.get("content")
            if isinstance(content, list):
                count += sum(1 for part in content if isinstance(part, dict) and MARKER in part)
    return count


def _bears(message: Mapping[str, Any], block: Block) -> bool | None:
    """Whether the block bears a marker already (True), may bear one (False), or cannot (None)."""
    content = message.get("content")
    if block.part is None or not isinstance(content, list):
        return (MARKER in message) if isinstance(content, str) else None
    part = content[block.part]
    if not isinstance(part, dict) or part.get("type") not in _MARKABLE:
        return None
    return MARKER in part or (MARKER in message and block.part == len(content) - 1)


def _marked(
    body: dict[str, Any], blocks: list[Block], shared: set[int] | None = None
) -> tuple[dict[str, Any], bool]:
    """The body marked on the last of its prefix's blocks that may bear a marker (of those
    in `shared`, where given), unless the line marked one of them itself; and whether its
    prefix bears a marker now (the line's own or this one)."""
    if _markers(body) >= BREAKPOINTS:
        return body, True
    messages = body["messages"]
    for i in range(len(blocks) - 1, -1, -1):
        block = blocks[i]
        if block.tokens < MIN_TOKENS:
            return body, False
        message = messages[block.message]
        bears = _bears(message, block)
        if bears is None:
            continue
        if bears:
            return body, True
        if shared is not None and i not in shared:
            continue
        content = message["content"]
        ephemeral = {"type": "ephemeral"}
        if block.part is None:
            parts = [{"type": "text", "text": content, MARKER: ephemeral}]
        else:
            parts = list(content)
            parts[block.part] = {**parts[block.part], MARKER: ephemeral}
        messages = list(messages)
        messages[block.message] = {**message, "content": parts}
        return {**body, "messages": messages}, True
    return body, False
