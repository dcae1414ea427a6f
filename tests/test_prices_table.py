"""`[prices]` read whatever it holds: a price is a finite number of dollars or the job file is
refused in one line; what a batch pays is never less than the table says (no half of a price
silently $0); the table survives the trip to a Ray shard whole. Hypothesis writes the tables:
TOML's values of every kind (nan, inf, integers past a float, booleans, strings, dates, lists,
tables in tables) under the keys `[prices]` knows and their near misses."""

from __future__ import annotations

import datetime as dt
import math
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.account.cost import money, priced, tier_prices, unpriced_batches
from pipeline.errors import SettingsError
from pipeline.prices import Price, check_prices
from pipeline.settings import build

TOP = 'input = "in.jsonl"\noutput = "out"\n'


def _build(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "job.toml"
    path.write_text(TOP + text)
    return build(path)


@pytest.mark.parametrize(
    "value",
    ["nan", "inf", "-inf", "1" + "0" * 400, "true", '"nan"', '"1e400"'],
)
@pytest.mark.parametrize("key", ["prompt", "batch_completion"])
def test_a_price_that_is_no_finite_number_is_refused(tmp_path: Path, key: str, value: str) -> None:
    # nan made every cost nan, and a budget never stops on nan (no comparison with it is
    # true); an integer past a float's range was an OverflowError, a crash, not exit 2.
    with pytest.raises(SettingsError, match=f'job.toml: \\[prices."m"\\] .*{key}.* must be numbers'):
        _build(tmp_path, f'[prices."m"]\n{key} = {value}\n')


def test_minus_zero_is_shown_as_zero(tmp_path: Path) -> None:
    s = _build(tmp_path, '[prices]\nbatch = -0.0\n[prices."m"]\nprompt = 1.0\ncompletion = 2.0\n')
    assert money(priced(tier_prices(s.prices, "batch")["m"], 1000, 1000)) == "$0.0000"  # not $-0.0000
    free = _build(tmp_path, '[prices."m"]\nprompt = -0.0\ncompletion = -0.0\n')
    assert money(priced(free.prices["m"], 1000, 1000)) == "$0.0000"


@pytest.mark.parametrize(("share", "completion"), [("batch = 0.5\n", 10.0), ("", 20.0)])
def test_a_batch_price_given_for_one_half_takes_the_other_as_a_batch_would(
    tmp_path: Path, share: str, completion: float
) -> None:
    # batch_prompt alone made every completion of a batch free: in usage.json, and to the budget.
    s = _build(
        tmp_path,
        f'tier = "batch"\n[prices]\n{share}[prices."m"]\nprompt = 10.0\ncompletion = 20.0\nbatch_prompt = 1.0\n',
    )
    assert tier_prices(s.prices, "batch")["m"] == Price(1.0, completion)
    assert tier_prices(s.prices, "sync")["m"] == Price(10.0, 20.0)


def test_a_share_given_after_a_models_table_is_applied_to_it() -> None:
    raw = {"m": {"prompt": 2.0, "completion": 4.0, "batch_completion": 1.0}, "batch": 0.25}
    assert tier_prices(check_prices("job.toml", raw), "batch")["m"] == Price(0.5, 1.0)


def test_tables_that_a_batch_pays_apart_are_not_equal() -> None:
    plain = check_prices("job.toml", {"m": {"prompt": 1.0}})
    halved = check_prices("job.toml", {"batch": 0.5, "m": {"prompt": 1.0}})
    assert plain != halved  # (as mappings of the prices now, they were equal)
    assert plain == {"m": Price(1.0, 0.0)} == check_prices("job.toml", {"m": {"prompt": 1.0}})
    assert pickle.loads(pickle.dumps(halved)) == halved


KEYS = st.one_of(
    st.sampled_from(
        [
            "m",
            "openrouter/m",
            "batch",
            "Batch",
            "bacth",
            "prompt",
            "completion",
            "batch_prompt",
            "batch_completion",
        ]
    ),
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=6),
)
SCALARS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=100),
    st.integers(min_value=-(10**3), max_value=10**3),
    st.integers(min_value=300, max_value=400).map(lambda digits: 10**digits),
    st.booleans(),
    st.sampled_from(["0.5", " 2 ", "nan", "inf", "-0", "1e400", "", "cheap"]),
    st.just(dt.date(2024, 1, 1)),
    st.just(dt.datetime(2024, 1, 1, 12, tzinfo=dt.UTC)),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
# A model's table with the keys it may hold: else nearly every table is refused for a key.
PRICE = st.dictionaries(
    st.sampled_from(
        [
            "prompt",
            "completion",
            "cached",
            "cache_write",
            "batch_prompt",
            "batch_completion",
            "batch_cached",
            "batch_cache_write",
        ]
    ),
    SCALARS,
)


@given(st.dictionaries(KEYS, st.one_of(PRICE, PRICE, SCALARS, VALUES), max_size=5))
def test_any_prices_table_is_read_or_refused_in_one_line(raw: dict[str, Any]) -> None:
    try:
        prices = check_prices("job.toml", raw)
    except SettingsError as e:
        said = str(e)
    else:
        said = None
    if said is not None:  # one line that names the file and the table
        assert said.startswith("job.toml: [prices")
        assert "\n" not in said
        return
    now, batch = tier_prices(prices, "sync"), tier_prices(prices, "batch")
    for price in (*now.values(), *batch.values()):
        assert all(
            math.isfinite(half) and math.copysign(1.0, half) == 1.0 for half in price if half is not None
        )
    assert set(now) | set(batch) == {model for model, entry in raw.items() if isinstance(entry, dict)}
    assert set(now) <= set(batch)  # what a request may cost, a batch may too
    factor = 1.0 if prices.share is None else prices.share
    for model, price in now.items():
        for half, key in enumerate(("batch_prompt", "batch_completion")):
            if key not in raw[model]:  # a half the table leaves out: as the share (or price) says
                assert batch[model][half] == price[half] * factor
        # a cached or write price left out: the same share of the batch's prompt price as now
        ratio = batch[model].prompt / price.prompt if price.prompt else factor
        for half, key in ((2, "batch_cached"), (3, "batch_cache_write")):
            if key not in raw[model] and price[half] is not None:
                assert batch[model][half] == pytest.approx(price[half] * ratio)
    assert set(unpriced_batches(prices)) <= set(now)
    assert pickle.loads(pickle.dumps(prices)) == prices
