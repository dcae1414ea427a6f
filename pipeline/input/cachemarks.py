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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.input.prefix import MARKER, MIN_TOKENS, Block, Images, prefix_blocks, shared_prefix
from pipeline.jobfile import anthropic

BREAKPOINTS = 4  # cache_control markers one Anthropic request may hold
KEY = "prompt_cache_key"
# Parts Anthropic (through OpenRouter) lets bear a marker: text, an image, a document.
_MARKABLE = ("text", "image_url", "file")


def mark(body: dict[str, Any], model: str, images: Images | None = None) -> dict[str, Any]:
    """`body` with the markers its provider needs to cache its shared prefix (a new dict
    where it changes: the line's own objects are left as they are)."""
    if anthropic(model):  # (its models cache only what is marked)
        found = prefix_blocks(body, images)
        return body if found is None else _marked(body, found[1])
    if KEY in body:
        return body
    key = shared_prefix(body, model, images)
    return body if key is None else {**body, KEY: key.key}


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


def _marked(body: dict[str, Any], blocks: list[Block]) -> dict[str, Any]:
    if _markers(body) >= BREAKPOINTS:
        return body
    messages = body["messages"]
    for block in reversed(blocks):
        if block.tokens < MIN_TOKENS:
            return body
        message = messages[block.message]
        bears = _bears(message, block)
        if bears is None:
            continue
        if bears:
            return body
        content = message["content"]
        ephemeral = {"type": "ephemeral"}
        if block.part is None:
            parts = [{"type": "text", "text": content, MARKER: ephemeral}]
        else:
            parts = list(content)
            parts[block.part] = {**parts[block.part], MARKER: ephemeral}
        messages = list(messages)
        messages[block.message] = {**message, "content": parts}
        return {**body, "messages": messages}
    return body
