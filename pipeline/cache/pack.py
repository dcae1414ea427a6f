"""An answer's body as the cache keeps it: deflate (zlib level 1) primed with a preset
dictionary of what every chat completion body says, or as it came where that saves little.

Measured on OpenAI-shaped bodies (answers of 40 and 300 words, README text): deflate alone
keeps 59 and 53 % of the bytes, primed 29 and 42 % (820 bytes in 237, 2,285 in 959): the
names every body repeats ("choices", "finish_reason", "prompt_tokens_details") are most of a
short body. (Bodies shaped as the dictionary is: another provider's save less.) Packing costs
14 and 34 µs a body, in `AnswerCache.flush` (off the event loop where the caller flushes in a
thread); unpacking, on a hit, 4 and 11. Without packing the file would be twice the size for
the same answers, or keep half as many under the same bound.

The dictionary is part of the format: a new one is a new `PRIMED` number, the old one kept to
read what was kept with it.
"""

from __future__ import annotations

import zlib

AS_IS = 0
PRIMED = 1  # raw deflate, window 2**15, with `_DICTIONARY`

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
_WORTH = 0.9  # packed must be at most this share of the body, else it is kept as it came


def pack(body: bytes) -> tuple[bytes, int]:
    """The bytes to keep for `body`, and how they were packed."""
    packer = zlib.compressobj(1, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, _DICTIONARY)
    packed = packer.compress(body) + packer.flush()
    if len(packed) > len(body) * _WORTH:
        return body, AS_IS
    return packed, PRIMED


def unpack(kept: bytes, how: int) -> bytes:
    """The body `pack` kept; ValueError when the bytes are damaged or packed in a way this
    version does not know."""
    if how == AS_IS:
        return kept
    if how != PRIMED:
        raise ValueError(f"an answer packed as {how}, which this version cannot read")
    unpacker = zlib.decompressobj(-15, _DICTIONARY)
    try:
        body = unpacker.decompress(kept) + unpacker.flush()
    except zlib.error as e:
        raise ValueError(f"an answer's packed bytes are damaged ({e})") from None
    if not unpacker.eof:
        raise ValueError("an answer's packed bytes end early")
    return body
