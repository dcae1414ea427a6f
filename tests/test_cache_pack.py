"""An answer as kept on disk: a damaged byte, or a dictionary other than the one it was packed
with, is a miss (the request sent again), never another answer served as this one's."""

from __future__ import annotations

import random

import orjson
import pytest

from pipeline.cache import pack as pack_module
from pipeline.cache.pack import pack, unpack


def completion(words: int) -> bytes:
    text = " ".join(f"word{(7 * j) % 97}" for j in range(words))
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": words, "total_tokens": 100 + words},
        }
    )


BODIES = {
    "short": completion(3),
    "long": completion(300),
    "incompressible": random.Random(5).randbytes(700),  # (kept in stored blocks)
}


@pytest.mark.parametrize("name", BODIES)
def test_every_one_bit_flip_of_a_kept_answer_is_a_miss(name: str) -> None:
    body = BODIES[name]
    kept, how = pack(body)
    assert unpack(kept, how) == body
    misread = []
    for at in range(len(kept)):
        flipped = bytearray(kept)
        flipped[at] ^= 1 << (at % 8)
        try:
            if unpack(bytes(flipped), how) != body:
                misread.append(at)
        except ValueError:
            pass
    assert misread == []  # (bare deflate read a flip in the third byte as another body)


def test_an_answer_kept_with_another_dictionary_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    body = completion(40)
    kept, how = pack(body)
    # The dictionary changed by a word, its number left as it was: a mistake the format catches.
    later = pack_module._DICTIONARY.replace(b"chatcmpl-", b"chatcmpX-")
    monkeypatch.setattr(pack_module, "_DICTIONARY", later)
    with pytest.raises(ValueError, match="packed bytes"):
        unpack(kept, how)  # (it read "chatcmpX-1" for "chatcmpl-1", without an error)
