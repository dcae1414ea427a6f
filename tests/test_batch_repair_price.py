"""A batch run killed, then the folder run again at the synchronous tier: the answers the
killed run wrote and never indexed are repaired at the price it paid (its open-run mark keeps
it, as `pipeline merge` reads it), not at the price of the run that finds them."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from pipeline.account.cost import tier_prices
from pipeline.mock.config import MockConfig
from pipeline.mock.hosting import start_mock
from pipeline.output.folder import LEDGER
from pipeline.output.ledger import OPEN_RUN, Ledger
from pipeline.output.repair import open_run_mark
from pipeline.run.runner import run
from pipeline.settings import Settings
from tests.conftest import bodies
from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier

PRICES = {"test/model": {"prompt": 1.0, "completion": 1.0, "batch_prompt": 0.5, "batch_completion": 0.5}}


async def test_a_killed_batch_runs_answers_are_repaired_at_the_batch_price_by_a_sync_run(
    make_settings: Callable[..., Settings],
) -> None:
    async with start_mock(MockConfig(cost=False)) as (url, _):  # no cost told: the table's
        settings = at_batch_tier(make_settings(url, bodies(2), prices=PRICES))
        paid = (await run(settings, FakeHost(FakeBatchApi()))).usage["cost"]["total"]
        assert paid > 0
        # The ledger as a kill leaves it: the batch run's mark still open, its results
        # written and not indexed (the index is rebuilt from results.jsonl).
        ledger = Ledger(settings.folder / LEDGER)
        ledger.put(OPEN_RUN, open_run_mark(time.time(), tier_prices(settings.prices, "batch")))
        ledger.put("results_offset", 0)
        ledger.close(commit=True)
        summary = await run(dataclasses.replace(settings, tier="sync"), FakeHost(FakeBatchApi()))
    assert summary.exit_code == 0, summary.message
    assert abs(summary.usage["cost"]["total"] - paid) < 1e-12  # not twice: the sync price
