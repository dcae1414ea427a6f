"""What `make run` runs (the Makefile's mock flags, jobs/demo.toml over samples/demo.jsonl) stays
valid: checked in-process, without the half minute the demo takes."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

import pipeline
from pipeline.estimate import estimate
from pipeline.mock.command import mock_config
from pipeline.mock.hosting import start_mock
from pipeline.parser import parser
from tests.conftest import FAKE_KEY

ROOT = Path(__file__).parent.parent


def _make_variable(name: str) -> str:
    """A `NAME := ...` of the Makefile, its continued lines joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    found = re.search(rf"^{name} := (.*)$", text, flags=re.M)
    assert found, f"the Makefile sets no {name}"
    return found.group(1)


def test_the_demo_mock_plays_a_slow_limited_faulty_endpoint() -> None:
    args = parser("mock").parse_args(["mock", *shlex.split(_make_variable("DEMO_MOCK"))])
    config = mock_config(args)
    assert config.latency >= 1  # seconds, not milliseconds
    assert config.latency_max is not None
    assert config.rpm  # a limit nobody states:
    assert config.wait_said == "none"
    assert not config.ratelimit_headers
    faults = config.fail_rate + config.drop_rate + config.malformed_rate + config.cut_stream_rate
    assert 0.01 <= faults <= 0.1  # a few percent, retried away: none at random fails a line for good
    assert config.stall_rate == 0  # a stall waits out --idle-timeout (60 s): longer than the demo


def test_the_demo_job_reads_every_record_as_a_streamed_request(tmp_path: Path) -> None:
    run = (ROOT / "Makefile").read_text()
    assert "pipeline run jobs/demo.toml" in run
    assert "out/demo/report.html" in run
    settings = pipeline.settings_from(ROOT / "jobs/demo.toml", output=str(tmp_path / "out"))
    assert settings.request.get("stream") is True
    result = estimate(settings)
    assert (result.invalid, result.failures) == (0, [])
    assert 200 <= result.requests == result.counts.read <= 500  # a few hundred, every one a request
    records = (ROOT / "samples/demo.jsonl").read_text().splitlines()
    assert sum('"image_path"' in record for record in records) >= 10  # local images, sized by Pillow


async def test_the_demo_report_claims_no_saving_the_mock_did_not_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's report says what the prompt cache saved: what was spent plus that saving must
    be what its tokens cost at the full price of the job's [prices], or the saving is made up
    (the mock, as the Makefile starts it, bills the tokens it says were cached in full)."""
    monkeypatch.setenv("LUMENFALL_API_KEY", FAKE_KEY)
    args = parser("mock").parse_args(["mock", *shlex.split(_make_variable("DEMO_MOCK"))])
    faults = {"fail_rate": 0.0, "drop_rate": 0.0, "malformed_rate": 0.0, "cut_stream_rate": 0.0}
    fast = dataclasses.replace(mock_config(args), latency=0.0, latency_max=None, rpm=None, **faults)
    async with start_mock(fast) as (url, _):
        job = pipeline.settings_from(ROOT / "jobs/demo.toml", output=str(tmp_path / "out"), base_url=url)
        await pipeline.run(job)
    usage = json.loads((tmp_path / "out" / "usage.json").read_text())
    price = job.prices["google/gemini-3-flash-preview"]
    tokens = usage["tokens"]
    full = (tokens["prompt_tokens"] * price.prompt + tokens["completion_tokens"] * price.completion) / 1e6
    spent, saved = usage["cost"]["total"], usage["prompt_cache"]["saved"] or 0.0
    assert spent + saved == pytest.approx(full), (spent, saved, full)
