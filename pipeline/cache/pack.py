"""An answer's body as the cache keeps it: deflate (zlib level 1) primed with a preset
dictionary of what every chat completion body says, or stored (level 0) where that saves little.

Measured on OpenAI-shaped bodies (answers of 40 and 300 words, README text): deflate alone
keeps 59 and 53 % of the bytes, primed 29 and 42 % (820 bytes in 237, 2,285 in 959, before
the ten bytes of the check below): the names every body repeats ("choices", "finish_reason", "prompt_tokens_details") are most of a
short body. (Bodies shaped as the dictionary is: another provider's save less.) Packing costs
14 and 34 µs a body, in `AnswerCache.flush` (off the event loop where the caller flushes in a
thread); unpacking, on a hit, 4 and 11. Without packing the file would be twice the size for
the same answers, or keep half as many under the same bound.

Every answer is kept as a zlib stream (RFC 1950), not bare deflate: its header names the
dictionary it was primed with (its Adler-32), and its trailer checks the body (Adler-32 again),
ten bytes an answer. So a later dictionary, or a damaged page of the file, cannot turn a kept
answer into another: bare deflate read a one-bit flip, or the same bytes under a dictionary
changed by one word, as a different body without an error. Such an answer is a miss, sent
again. A new dictionary is still a new `PRIMED` number, the old one kept to read what was kept
with it; the check makes forgetting that a miss, never a wrong answer.
"""

from __future__ import annotations

import zlib

# 0 and 1, the first build's (kept as it came; bare deflate), are read no more: a miss. And
# that build reads a 2 as a miss, where it would have read this stream as bare deflate.
PRIMED = 2  # a zlib stream, window 2**15, primed with `_DICTIONARY`

# What a completion body says whatever the answer (OpenAI's shape and OpenRouter's), most
# common last: deflate finds the nearest match first.
_DICTIONARY = (
    b'{"id":"gen-","provider":"OpenAI","model":"openai/gpt-4o-mini","object":"chat.completion",'
    b'"created":1733500000,"choices":[{"logprobs":null,"finish_reason":"length","native_finish_reason":'
    b'"stop","index":0,"message":{"role":"assistant","content":"","refusal":null,"reasoning":null,'
    b'"tool_calls":[{"id":"call_","type":"function","function":{"name":"","arguments":"{\\"'
    b'"}}],"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":'
    b'0,"completion_tokens":0,"total_tokens":0,"cost":0.0,"is_byok":false,"prompt_tokens_details":'
    b'{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,'
    b'"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},'
    b'"service_tier":"default","system_fingerprint":"fp_'
    b'{"id":"chatcmpl-","object":"chat.completion","created":1733500000,"model":"gpt-4o-mini-2024-07-18",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"'
)
_WORTH = 0.9  # deflated must be at most this share of the body, else it is stored (level 0)


def pack(body: bytes) -> tuple[bytes, int]:
    """The bytes to keep for `body`, and how they were packed."""
    packed = _deflate(body, 1)
    if len(packed) > len(body) * _WORTH:  # (stored blocks: no smaller, but checked all the same)
        packed = _deflate(body, 0)
    return packed, PRIMED


def _deflate(body: bytes, level: int) -> bytes:
    packer = zlib.compressobj(level, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, _DICTIONARY)
    return packer.compress(body) + packer.flush()


def unpack(kept: bytes, how: int) -> bytes:
    """The body `pack` kept; ValueError when the bytes are damaged or packed in a way this
    version does not know."""
    if how != PRIMED:
        raise ValueError(f"an answer packed as {how}, which this version cannot read")
    unpacker = zlib.decompressobj(15, _DICTIONARY)
    try:
        body = unpacker.decompress(kept) + unpacker.flush()
    except zlib.error as e:
        raise ValueError(f"an answer's packed bytes are damaged ({e})") from None
    if not unpacker.eof:
        raise ValueError("an answer's packed bytes end early")
    return body
