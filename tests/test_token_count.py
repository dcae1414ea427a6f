"""A given --tpm on either token accounting (issue 21, point 3): the server counts a request's
prompt and max_tokens on arrival (OpenAI's way), or what its answer used. pipeline reserves
what such a limiter counts, and learns which way the server counts."""

from __future__ import annotations

from pathlib import Path

import orjson

from pipeline.input.line import LineParser
from pipeline.mock.limits import charged_tokens
from pipeline.settings import build

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hum",
]


def prose(i: int, words: int = 40) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words))


def test_a_request_reserves_what_a_limiter_counting_characters_charges(tmp_path: Path) -> None:
    # English prose runs about five characters a token, where OpenAI's limiter counts four
    # (the mock's arrival count does the same): the exact count alone reserved some 13 % less
    # than the server charged, and a pace at the limit went 13 % over it.
    parser = LineParser(
        build(None, input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out")), exact_tokens=True
    )
    for i in range(20):
        body = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": prose(i)}]}
        request = parser.request(parser.parse(orjson.dumps(body)), custom_id=f"job-{i}", line=i)
        assert request.prompt_tokens < request.token_estimate - 64  # the tokenizer counts fewer
        assert request.token_estimate == charged_tokens(body, count="arrival")
