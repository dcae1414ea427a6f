"""The shared prefix of a request: what a provider's prompt cache may hold for the next line.

A prompt is read as providers cache it, a chain of blocks: first, when the body has tools, a
tool choice or a response format, one block of them; then one block a content part of each
message (a string content is one text part, as both OpenAI and Anthropic read it), the first
part of a message with its role and other fields. The shared prefix is every block but the
last: the line's own last part (its question, its image) is what varies from line to line.
It is worth caching when it is long: at least `MIN_TOKENS` by the usual four characters a
token (a message's 4 tokens, an image's as `input.tokens` counts one), since providers cache
nothing shorter (1,024 tokens at OpenAI and Anthropic).

Its key hashes the model and the prefix's blocks as the model reads them: without any
`cache_control` marker (a body marked and the same body unmarked share it), a local image by
its file (its data URL is filled in later; `images`) rather than by its place in the line.

    prefix_key(body)      the key, or None when the body has no long shared prefix
    shared_prefix(body)   the key and where the prefix's blocks are
    prefix_blocks(body)   where they are, without the key (for `input.cachemarks`)
    group_key(body)       a key as `prefix_key`'s, quicker, for grouping one process's lines
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import orjson

from pipeline.input.tokens import IMAGE_HIGH, IMAGE_LOW, PER_MESSAGE

MIN_TOKENS = 1024
LEADING = ("tools", "tool_choice", "response_format")  # read before the messages
MARKER = "cache_control"
# A local image as the reader leaves it (its marker URL, filled with a data URL before it goes):
# by that URL, what identifies it (its file) and its tokens.
Images = Mapping[str, tuple[str, int]]


class Block(NamedTuple):
    """A block of the prompt's messages: in message `message`, part `part` (None: the content
    is a string, or no list), and the tokens of the prompt up to and with it."""

    message: int
    part: int | None
    tokens: int


class Prefix(NamedTuple):
    key: str
    blocks: list[Block]  # the prefix's message blocks in order (the last ends it; may be none)


def _dumps(value: Any) -> bytes:
    """`value` as JSON, keys sorted; what orjson cannot write (an integer past 64 bits, a
    nesting past 255 levels, as a line may hold) the standard library's way."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        import json

        return json.dumps(value, sort_keys=True, default=repr).encode("utf-8", "surrogatepass")


def _part_tokens(part: Any, images: Images | None) -> int:
    if not isinstance(part, dict):
        return 0
    text = part.get("text")
    if isinstance(text, str):
        return len(text) // 4
    if part.get("type") == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if images and isinstance(url, str) and url in images:
            return images[url][1]
        return IMAGE_LOW if isinstance(image, dict) and image.get("detail") == "low" else IMAGE_HIGH
    return len(_dumps(part)) // 4


def _blocks(body: Mapping[str, Any], images: Images | None) -> tuple[int, list[Block]]:
    """The tokens of the leading block (0: none), and the messages' blocks."""
    leading = sum(len(_dumps(body[k])) // 4 for k in LEADING if k in body)
    out: list[Block] = []
    tokens = leading
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else ()):
        tokens += PER_MESSAGE
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and content:
            for j, part in enumerate(content):
                tokens += _part_tokens(part, images)
                out.append(Block(i, j, tokens))
        else:
            if isinstance(content, str):
                tokens += len(content) // 4
            elif isinstance(message, dict) and message.get("tool_calls"):
                tokens += len(_dumps(message["tool_calls"])) // 4
            out.append(Block(i, None, tokens))
    return leading, out


def _plain(value: Any) -> Any:
    return {k: v for k, v in value.items() if k != MARKER} if isinstance(value, dict) else value


def _identity(part: Any, images: Images | None) -> Any:
    part = _plain(part)
    if images and isinstance(part, dict) and part.get("type") == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else None
        if isinstance(image, dict) and isinstance(url, str) and url in images:
            part = {**part, "image_url": {**image, "url": "file:" + images[url][0]}}
    return part


def prefix_blocks(
    body: Mapping[str, Any], images: Images | None = None, *, min_tokens: int = MIN_TOKENS
) -> tuple[int, list[Block]] | None:
    """The tokens of the body's leading block (0: none) and its prefix's message blocks, when
    the prefix is at least `min_tokens` long (None: it is not, or there is none)."""
    leading, blocks = _blocks(body, images)
    chain = blocks[:-1] if blocks else []
    if not leading and not chain:
        return None
    if (chain[-1].tokens if chain else leading) < min_tokens:
        return None
    return leading, chain


def shared_prefix(
    body: Mapping[str, Any],
    model: str | None = None,
    images: Images | None = None,
    *,
    min_tokens: int = MIN_TOKENS,
) -> Prefix | None:
    """The body's shared prefix (see the module's docstring), when at least `min_tokens` long;
    `model`: the one the request goes to (else the body's)."""
    found = prefix_blocks(body, images, min_tokens=min_tokens)
    if found is None:
        return None
    leading, chain = found
    digest = hashlib.sha256()  # (quicker than BLAKE2b here: CPUs have SHA instructions)
    digest.update(_dumps(model if model is not None else body.get("model")))
    if leading:
        digest.update(b"t" + _dumps({k: body[k] for k in LEADING if k in body}))
    messages = body["messages"] if chain else []
    for block in chain:
        message = messages[block.message]
        if not isinstance(message, dict):  # (a checked line's never is: its role is there)
            digest.update(b"m" + _dumps(message))
            continue
        if block.part is None or block.part == 0:
            head = {k: v for k, v in message.items() if k != MARKER and k != "content"}
            digest.update(b"m" + _dumps(head))
        content = message.get("content")
        if block.part is not None and isinstance(content, list):
            part = content[block.part]
        else:  # (a string is read as its one text part: marked, it becomes that)
            part = {"type": "text", "text": content} if isinstance(content, str) else content
        digest.update(b"p" + _dumps(_identity(part, images)))
    return Prefix(digest.hexdigest()[:16], chain)


def prefix_key(body: Mapping[str, Any], model: str | None = None, images: Images | None = None) -> str | None:
    """The key of the body's long shared prefix (lines with the same one may share a provider's
    cached prompt), or None when it has none."""
    prefix = shared_prefix(body, model, images)
    return None if prefix is None else prefix.key


def _text(part: Any) -> str | None:
    """The text of a part that is a text alone (a marker aside), else None."""
    if type(part) is dict and part.get("type") == "text":
        text = part.get("text")
        if type(text) is str and all(k in ("type", "text", MARKER) for k in part):
            return text
    return None


def _plain_key(body: Mapping[str, Any], model: str | None) -> str | Literal[False] | None:
    """`group_key` of the usual body, messages of a role and a text each and nothing before them,
    without walking its blocks (`_blocks`, half of `group_key`'s time); False where the body is
    not such."""
    messages = body.get("messages")
    if type(messages) is not list or len(messages) < 2 or any(k in body for k in LEADING):
        return False
    last = messages[-1]
    if type(last) is not dict or type(last.get("content")) is not str:
        return False
    parts: list[Any] = [model if model is not None else body.get("model")]
    tokens = 0
    for i in range(len(messages) - 1):
        message = messages[i]
        if type(message) is not dict or len(message) != 2:
            return False
        role, content = message.get("role"), message.get("content")
        if type(role) is not str or type(content) is not str:
            return False
        tokens += PER_MESSAGE + len(content) // 4
        parts.append((role, content))
    if tokens < MIN_TOKENS:
        return None
    return format(hash(tuple(parts)) & 0xFFFFFFFFFFFFFFFF, "x")


def group_key(body: Mapping[str, Any], model: str | None = None, images: Images | None = None) -> str | None:
    """A key that lines share when `prefix_key`'s is the same, and differ in when it differs
    (but for a 64-bit hash's collision, which only has two prefixes' lines sent together), for
    `run.grouping`: Python's hash of the prefix's texts (and of the JSON of what is not a text),
    where `prefix_key` hashes their JSON with SHA-256 (3.4 µs a line of 2,000 tokens where 12 µs:
    at 20 ms answers, the client's CPU the bottleneck, grouping's own work shows in the wall). It
    differs from one process to the next: never sent, never kept."""
    quick = _plain_key(body, model)
    if quick is not False:
        return quick
    found = prefix_blocks(body, images)
    if found is None:
        return None
    leading, chain = found
    parts: list[Any] = [model if model is not None else body.get("model")]
    if leading:
        parts.append(("t", _dumps({k: body[k] for k in LEADING if k in body})))
    messages = body["messages"] if chain else []
    for block in chain:
        message = messages[block.message]
        if not isinstance(message, dict):
            parts.append(("m", _dumps(message)))
            continue
        head: Any = None
        if block.part is None or block.part == 0:
            role = message.get("role")
            if type(role) is str and all(k in ("role", "content", MARKER) for k in message):
                head = role
            else:
                head = (_dumps({k: v for k, v in message.items() if k != MARKER and k != "content"}),)
        content = message.get("content")
        if block.part is not None and isinstance(content, list):
            part = content[block.part]
            text = _text(part)
        else:
            part, text = content, content if type(content) is str else None
        # (JSON in a 1-tuple: a str and the bytes of the same characters hash alike)
        parts.append((head, text if text is not None else (_dumps(_identity(part, images)),)))
    return format(hash(tuple(parts)) & 0xFFFFFFFFFFFFFFFF, "x")
