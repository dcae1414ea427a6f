"""What the client makes of an answer: Retry-After, and 200s that are not results."""

from __future__ import annotations

import email.utils
import time

import pytest

from pipeline.errors import MalformedResponse, ProviderError
from pipeline.send.client import check_completion, retry_after, said_wait


def test_retry_after_in_seconds_milliseconds_and_http_dates() -> None:
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "0.5"}) == 0.5
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (retry_after({"retry-after": when}) or 0) <= 31
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None


def test_a_refusal_that_says_when_in_its_message_only() -> None:
    # OpenAI's wording; some servers send nothing else.
    said = "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, Used 3. Please try again in 71ms."
    assert said_wait(said) == pytest.approx(0.071)
    assert said_wait("Please try again in 1.5s. Visit https://...") == pytest.approx(1.5)
    assert said_wait("please try again in 6m0s") == pytest.approx(360)
    assert said_wait("Rate limit reached") is None


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ({"error": {"message": "boom", "code": 502}}, ProviderError, "boom"),
        ({"object": "list", "data": []}, MalformedResponse, "no choices"),
        ([1, 2], MalformedResponse, "not a JSON object"),
        (
            {"choices": [{"index": 0, "finish_reason": "error", "message": {}}]},
            ProviderError,
            "finished with an error",
        ),
    ],
)
def test_a_200_that_is_not_a_completion_is_a_failure(body: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        check_completion(body)


async def test_a_body_of_megabytes_arrives_whole(mock, make_settings) -> None:
    import pipeline

    text = "".join(chr(ord("a") + i % 26) for i in range(3_000_000))  # 3 MB: sent in slices
    rows = [{"custom_id": "big", "model": "m", "messages": [{"role": "user", "content": text}]}]
    async with mock() as (url, server):
        summary = await pipeline.run(make_settings(url, rows))
        assert summary.succeeded == 1
        assert server.state.received[0]["messages"][0]["content"] == text
