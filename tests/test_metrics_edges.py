"""`--metrics-port` at its edges: a shard's port past 65535, a shard's lines, a model named "account"."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.errors import SettingsError
from pipeline.run.metrics import serving
from pipeline.settings import build


@pytest.mark.parametrize("port", [65536, 70000])
async def test_a_ray_shards_port_past_65535_is_refused_not_wrapped(port: int) -> None:
    # `pipeline ray --metrics-port 65535 --shards 3` gives shard 2 port 65536 (shard.py): on every
    # interface (no --metrics-host) it was served on a random port (65536), or on 70000 - 65536.
    settings = replace(build(input="in.jsonl", metrics_port=65535), metrics_port=port)
    with pytest.raises(SettingsError, match=f"--metrics-port {port}: not a port"):
        async with serving(settings):
            pass
