"""The API key leaves the process only in the Authorization header: never in a file, a
report, a log line or an error message, even when a server echoes it back. Nor does the
password of a URL (`--base-url http://user:password@...`) appear in any message."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web

import pipeline as package
from pipeline import run as pipeline_run
from pipeline.cli import main
from pipeline.errors import SettingsError
from pipeline.settings import build
from tests.conftest import FAKE_KEY, bodies, write_jsonl
from tests.scripted import scripted
from tests.test_cli import pipeline


def assert_nowhere(folder: Path, *texts: str) -> None:
    for text in texts:
        assert FAKE_KEY not in text
        assert FAKE_KEY[8:] not in text
    for path in folder.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


async def test_an_echoed_key_is_redacted_everywhere(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [*bodies(6), b"{bad line"])
    out = tmp_path / "out"
    async with mock(echo_key=True, script=[400, 500, 429, 200, 400], retry_after=0.01) as (url, server):
        code, stdout, stderr = await pipeline(
            "run", "--input", str(src), "--output", str(out), "--base-url", url
        )
    assert code == 1
    assert any("Bearer" in h.get("Authorization", "") for h in server.state.headers)
    errors = (out / "errors.jsonl").read_text()
    assert "[REDACTED]" in errors  # the server did echo it; we did not write it
    assert_nowhere(out, stdout, stderr)


async def test_a_refused_key_is_not_repeated_in_the_stop_message(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(3))
    out = tmp_path / "out"
    async with mock(echo_key=True, api_key="another-key") as (url, _):
        code, stdout, stderr = await pipeline(
            "run", "--input", str(src), "--output", str(out), "--base-url", url
        )
    assert code == 3
    assert "refused the API key" in stdout + stderr
    assert_nowhere(out, stdout, stderr)


async def test_quiet_and_progress_lines_hold_no_key(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(3))
    out = tmp_path / "out"
    async with mock(echo_key=True, script=[500]) as (url, _):
        code, stdout, stderr = await pipeline(
            "run", "--input", str(src), "--output", str(out), "--base-url", url, "--quiet"
        )
    assert code == 0
    assert_nowhere(out, stdout, stderr)


def test_no_settings_message_shows_a_urls_password(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    for url in ("ftp://someone:hunter2secret@host/v1", "http://someone:hunter2secret@host:99999/v1"):
        with pytest.raises(SettingsError) as caught:
            build(input=src, base_url=url)
        assert "hunter2secret" not in str(caught.value)
        assert "someone:***@" in str(caught.value)


async def test_a_url_with_a_password_and_an_api_key_is_refused_not_a_crash(make_settings, server) -> None:
    url, _ = server
    settings = make_settings(url.replace("http://", "http://someone:hunter2secret@"), bodies(2))
    with pytest.raises(SettingsError) as caught:
        await package.run(settings)
    assert "hunter2secret" not in str(caught.value)
    assert "LUMENFALL_API_KEY" in str(caught.value)


PASSWORD = "s3cret-PW-in-the-url"


def with_password(url: str) -> str:
    return url.replace("://", f"://alice:{PASSWORD}@", 1)


async def test_a_password_in_the_base_url_is_in_no_message_nor_file(
    mock, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(6))
    # With an API key: aiohttp refused every request (the user and password go in the header
    # the key is in), a ValueError each, exit 70. Now a settings error, before anything is sent.
    async with mock() as (url, server):
        with pytest.raises(SettingsError) as refused:
            await pipeline_run(make_settings(with_password(url), input=src))
        assert server.state.received == []
    assert "holds a user and password" in str(refused.value)
    assert "alice:***@127.0.0.1" in str(refused.value)
    # Without a key, for a server that is not this machine: the message that asks for one.
    monkeypatch.delenv("LUMENFALL_API_KEY")
    with pytest.raises(SettingsError) as no_key:
        await pipeline_run(make_settings(with_password("https://api.example.com/v1"), input=src))
    # Not a URL the tool can use.
    for bad in ("htps://api.example.com:99/v1", "https://api.example.com:99999/v1"):
        assert main(["run", "--input", str(src), "--base-url", with_password(bad)]) == 2
    said = capsys.readouterr()
    assert (str(no_key.value) + said.err).count("alice:***@api.example.com") == 3
    assert PASSWORD not in str(no_key.value) + said.out + said.err

    # The stop after 404s that name no model names the URL it posted to (a loopback proxy, its
    # user and password and no key): in the message, and so in usage.json and report.md.
    async def nothing_here(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="Not Found")

    async with scripted(nothing_here) as proxy:
        summary = await pipeline_run(make_settings(with_password(proxy.url), input=src))
    assert summary.exit_code == 3
    assert "HTTP 404 Not Found from POST http://alice:***@127.0.0.1:" in summary.message
    assert PASSWORD not in summary.message
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
