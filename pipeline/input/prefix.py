"""A request's prefix key: what a provider's prompt cache could keep of it for the next line.

Providers cache the leading part of a prompt (OpenAI from 1,024 tokens, in steps; Anthropic
from 1,024 or 2,048 by model, up to a `cache_control` marker), and a later request that starts
with the same tokens reads it at a tenth to a half of the price. Lines that share a long prefix
(a system prompt with few-shot examples, the same photo asked about in five languages) read it
only if they are sent close together, so the run groups them (`pipeline.run.grouping`).

The key: a hash of the model, the blocks before the messages (`tools`, `tool_choice`,
`response_format`, `prompt_cache_key`: a prefix matches only with the same ones) and every
part of the messages but the last one, the line's own (a whole message of text is one part; a
message of parts, an image then the question, is several: a prefix may end inside a message).
Only a prefix of at least MIN_TOKENS by the usual four characters a token (an image: what
`input.tokens` counts for it) gets a key: providers cache nothing shorter, and a short prefix
is not worth holding a line back for. A local image (a template's) is known by its path and
sizing, not by the marker its body holds until it is read.

Computed once, by the reader, and only for a line whose whole prompt is that long already (one
comparison for every other line).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from pipeline.input.tokens import IMAGE_HIGH, IMAGE_LOW, PER_MESSAGE

MIN_TOKENS = 1024
LEADING = ("tools", "tool_choice", "response_format", "prompt_cache_key")


def _part(part: Any, images: Mapping[str, tuple[str, int]] | None) -> tuple[Any, int]:
    """A content part's identity and tokens."""
    if not isinstance(part, dict):
        return part, 0
    text = part.get("text")
    if isinstance(text, str):
        return part, len(text) // 4
    image = part.get("image_url")
    if part.get("type") == "image_url" and isinstance(image, dict):
        url = image.get("url")
        local = images.get(url) if images and isinstance(url, str) else None
        if local is not None:
            return {"local": local[0], "detail": image.get("detail")}, local[1]
        return part, IMAGE_LOW if image.get("detail") == "low" else IMAGE_HIGH
    return part, 0


def prefix_key(
    body: Mapping[str, Any], model: str, images: Mapping[str, tuple[str, int]] | None = None
) -> bytes | None:
    """The key of `body`'s prefix (everything before its last part), or None where that is
    shorter than MIN_TOKENS. `images`: a local image's identity and tokens, by its marker."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    parts: list[tuple[Any, int]] = []  # (identity, tokens)
    for message in messages:
        if not isinstance(message, dict):
            parts.append((message, PER_MESSAGE))
            continue
        content = message.get("content")
        head = {k: v for k, v in message.items() if k != "content"}
        if isinstance(content, list) and content:
            parts.append((head, PER_MESSAGE))
            parts += [_part(item, images) for item in content]
        else:
            head["content"] = content
            parts.append((head, PER_MESSAGE + (len(content) // 4 if isinstance(content, str) else 0)))
    parts.pop()  # the line's own part
    if sum(n for _, n in parts) < MIN_TOKENS:
        return None
    leading = {k: body[k] for k in LEADING if k in body}
    try:
        data = orjson.dumps(
            [model, leading, [identity for identity, _ in parts]], option=orjson.OPT_SORT_KEYS
        )
    except TypeError:  # (a value orjson cannot write: no key, the line goes as it comes)
        return None
    return hashlib.blake2b(data, digest_size=16).digest()
