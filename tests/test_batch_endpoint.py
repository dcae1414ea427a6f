"""Where a folder's batches went, as its book keeps it for `pipeline cancel OUT`: never a secret
the base URL carried, and cancel does not guess where the URL was not kept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.batch import cancel
from pipeline.batch.book import ENDPOINT
from pipeline.errors import SettingsError
from pipeline.output.folder import LEDGER
from pipeline.output.ledger import Ledger
from pipeline.run.runner import run
from pipeline.settings import Settings
from tests.conftest import bodies
from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier

TOKEN = "sk-in-the-url-0123456789"


async def test_a_token_in_the_base_url_is_not_kept_in_the_folder(
    make_settings: Callable[..., Settings], server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user's token alone before the host (https://TOKEN@host/v1) is what `redacted` hides,
    # as much a secret as a password.
    url = server[0].replace("://", f"://{TOKEN}@", 1)
    settings = at_batch_tier(make_settings(url, bodies(2)))
    monkeypatch.delenv(settings.api_key_env)  # (the URL's credentials stand for the key)
    summary = await run(settings, FakeHost(FakeBatchApi(max_lines=4)))
    assert summary.exit_code == 0, summary.message
    ledger = Ledger(settings.folder / LEDGER)
    try:
        kept = ledger.get(ENDPOINT)
    finally:
        ledger.close(commit=False)
    assert kept["base_url"] is None
    assert kept["api_key_env"] == settings.api_key_env
    assert TOKEN not in (settings.folder / LEDGER).read_bytes().decode("utf-8", "replace")


def test_cancel_asks_for_the_base_url_the_folder_did_not_keep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run's URL had a password: not kept. The default endpoint is not where the batches
    # went, and the key the run used is not for it: nothing is opened, --base-url is asked for.
    monkeypatch.setenv("PROVIDER_KEY", "not-for-the-default-endpoint")
    ledger = Ledger(tmp_path / LEDGER)
    ledger.put(ENDPOINT, {"base_url": None, "api_key_env": "PROVIDER_KEY", "batch_api": "files"})
    ledger.close(commit=True)
    opened: list[str] = []

    def open_batch_api(base_url: str, *_: Any) -> Any:
        opened.append(base_url)
        raise AssertionError("opened an endpoint")

    import pipeline.send.batchclient as batchclient

    monkeypatch.setattr(batchclient, "open_batch_api", open_batch_api)
    with pytest.raises(SettingsError, match="--base-url"):
        cancel.cancel_folder(tmp_path)
    assert opened == []
