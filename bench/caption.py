"""Captioning a catalogue of camera photos (issue 11): 400 records pointing at 40 local JPEGs
of a few MB, answers in 0.5 s, sent whole and sized to 1,024 px, at concurrency 64 and 4.
Judged: peak RSS, bytes sent (usage.json) and wall."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import orjson

from bench.mock import MockFlags
from bench.report import Check, ScenarioResult
from bench.runs import Client, ClientRun
from bench.scenarios import Done, Options, _lost_check, _run

PHOTOS = 40
RECORDS = 400
LATENCY_MS = 500.0
SIDE = 1024
# (concurrency, max_side or 0 for whole) -> peak RSS target in MB
RSS_TARGETS = {(64, 0): 400.0, (4, 0): 150.0, (64, SIDE): 150.0, (4, SIDE): None}
SENT_RATIO = 10.0  # at least this many times fewer bytes sent when sized
WALL_RATIO = 1.05  # sized / whole, at most: no slower (with 5 % for a shared machine's noise)


def _photos(folder: Path) -> list[Path]:
    """Camera-like JPEGs, 3,000 x 2,000, of 2 to 4 MB; made once and kept."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo-{i:02d}.jpg" for i in range(PHOTOS)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        print(f"[bench] caption: making {len(missing)} photos of 3000x2000 ...", file=sys.stderr, flush=True)
    for i, path in enumerate(missing):
        grain = Image.merge("RGB", [Image.effect_noise((3000, 2000), 30 + i % 10) for _ in range(3)])
        shapes = Image.effect_mandelbrot((3000, 2000), (-2.0, -1.0, 1.0, 1.0), 50 + i).convert("RGB")
        out = io.BytesIO()
        Image.blend(grain, shapes, 0.6).save(out, format="JPEG", quality=90)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(out.getvalue())
        tmp.replace(path)
    return paths


def _inputs(out: Path) -> tuple[Path, dict[int, Path]]:
    folder = out / "inputs" / "caption"
    photos = _photos(folder / "photos")
    records = folder / "catalogue.jsonl"
    if not records.exists():
        with records.open("wb") as f:
            for i in range(RECORDS):
                photo = photos[i % PHOTOS].relative_to(folder)
                row = {"custom_id": f"asset-{i:04d}", "image_path": str(photo), "title": f"Photo {i}"}
                f.write(orjson.dumps(row) + b"\n")
    jobs = {}
    for side in (0, SIDE):
        job = jobs[side] = folder / f"caption-{side or 'whole'}.toml"
        job.write_text(
            '[request]\nmodel = "vision/model"\nmax_tokens = 60\n'
            '[template]\n[[template.messages]]\nrole = "user"\n'
            'content = [{ type = "text", text = "Alt text for {title}" }, '
            f'{{ type = "image", path = "image_path", detail = "high", max_side = {side} }}]\n'
        )
    return records, jobs


def caption(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    records, jobs = _inputs(opts.out)
    size = sum(p.stat().st_size for p in (records.parent / "photos").glob("*.jpg")) / PHOTOS
    flags = MockFlags(latency_ms=LATENCY_MS)
    runs: dict[tuple[int, int], ClientRun] = {}
    sent: dict[tuple[int, int], int] = {}
    for (concurrency, side), _ in RSS_TARGETS.items():
        what = f"{side} px" if side else "whole"
        client = Client(
            name=f"pipeline, {what}, concurrency {concurrency}", kind="pipeline", flags=(str(jobs[side]),)
        )
        run = runs[concurrency, side] = _run("caption", opts, client, records, flags, concurrency=concurrency)
        usage = opts.out / "runs" / "caption" / _folder(client) / "output" / "usage.json"
        images = orjson.loads(usage.read_bytes())["images"] if usage.exists() else {}
        sent[concurrency, side] = int(images.get("bytes_sent", 0))
    checks: list[Check] = []
    for key, target in RSS_TARGETS.items():
        run = runs[key]
        rss = run.measurement.peak_rss_mb
        label = f"{run.client.name}: peak RSS"
        checks.append(
            Check(label, f"{rss:.0f} MB", f"≤ {target:g} MB", rss <= target)
            if target is not None
            else Check(label, f"{rss:.0f} MB")
        )
        checks.append(_lost_check(run))
    whole, sized = sent[64, 0], sent[64, SIDE]
    fewer = whole / sized if sized else float("inf")
    checks.append(
        Check(
            f"bytes sent whole / sized to {SIDE} px (usage.json)",
            f"{whole / 1e6:,.0f} MB / {sized / 1e6:,.1f} MB = {fewer:.0f}x",
            f"≥ {SENT_RATIO:g}x",
            fewer >= SENT_RATIO,
        )
    )
    for concurrency in (64, 4):
        a, b = runs[concurrency, SIDE].measurement.wall, runs[concurrency, 0].measurement.wall
        checks.append(
            Check(
                f"concurrency {concurrency}: wall sized / whole",
                f"{a:.1f} s / {b:.1f} s = {a / b:.2f}x",
                f"≤ {WALL_RATIO:g}x (no slower)",
                a / b <= WALL_RATIO,
            )
        )
    title = (
        f"{RECORDS} records pointing at {PHOTOS} local JPEGs of 3000x2000 ({size / 1e6:.1f} MB on "
        f"average), mock latency {LATENCY_MS / 1000:g} s; whole and sized to {SIDE} px"
    )
    notes = [
        "the mock is on loopback, where an upload costs nothing: the wall compares the work of "
        "reading, decoding, resizing and encoding against sending whole photos",
        f"a whole photo in flight is its base64 body, about {size * 4 / 3 / 1e6:.1f} MB: at concurrency "
        f"64 that alone is {64 * size * 4 / 3 / 1e6:.0f} MB",
        f"the {RECORDS} records share {PHOTOS} photos, as in the issue's run: each photo is decoded "
        "and sized once and its sized copy kept (16 MB of them); with a photo per record, sizing "
        "cost 61 ms of CPU a photo here (2 cores), and the sized run at concurrency 64 was CPU-bound "
        "at 1.8x the whole one's wall (commit 2e2cc31, before the copies were kept)",
    ]
    return ScenarioResult(
        "caption", title, runs=list(runs.values()), checks=checks, notes=notes, load_before=load
    )


def _folder(client: Client) -> str:
    from bench.scenarios import _slug

    return _slug(client)


SCENARIOS = {"caption": caption}
