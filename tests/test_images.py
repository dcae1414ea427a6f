"""Local images of a captioning job: sent the size the model sees, upright, read late, and a
broken one is one input error while the rest of the job goes on."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from PIL import Image

import pipeline
from pipeline.errors import SettingsError
from pipeline.estimate import estimate
from pipeline.input.images import tile_tokens
from pipeline.settings import build
from tests.conftest import read_jsonl, write_jsonl


def jpeg(width: int, height: int, *, orientation: int | None = None) -> bytes:
    """A photo whose top-left quarter is red and the rest blue, as stored (before EXIF)."""
    im = Image.new("RGB", (width, height), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, width // 2, height // 2))
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    im.save(out, format="JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (0, 200, 0)).save(out, format="PNG")
    return out.getvalue()


def bomb() -> bytes:
    """A PNG that says it is 30,000 x 30,000 pixels: a few bytes on disk, 2.7 GB decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def job(tmp_path: Path, **image: Any) -> Path:
    extra = "".join(f", {k} = {orjson.dumps(v).decode()}" for k, v in image.items())
    path = tmp_path / "job.toml"
    path.write_text(
        '[request]\nmodel = "vision/model"\nmax_tokens = 50\n'
        '[template]\nid = "{asset_id}"\n[[template.messages]]\nrole = "user"\n'
        'content = [{ type = "text", text = "Alt text for {asset_id}" }, '
        f'{{ type = "image", path = "image_path"{extra} }}]\n'
    )
    return path


def sent_images(server: Any) -> dict[str, bytes]:
    """What the server received, by asset: the image bytes inside each data URL."""
    found = {}
    for body in server.state.received:
        text, image = body["messages"][0]["content"]
        url = image["image_url"]["url"]
        assert url.startswith("data:image/")
        found[text["text"].rsplit(" ", 1)[1]] = base64.b64decode(url.split(",", 1)[1])
    return found


async def test_a_rotated_photo_arrives_upright_and_1024_px_long(mock, make_settings, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "rotated.jpg").write_bytes(jpeg(4000, 3000, orientation=6))  # "rotate 90 clockwise"
    (photos / "small.png").write_bytes(small := png(512))
    rows = [
        {"asset_id": "rotated", "image_path": "photos/rotated.jpg"},
        {"asset_id": "small", "image_path": "photos/small.png"},
    ]
    async with mock() as (url, server):
        src = write_jsonl(tmp_path / "in.jsonl", rows)
        summary = await pipeline.run(make_settings(url, job=job(tmp_path, max_side=1024), input=src))
        assert summary.exit_code == 0
        sent = sent_images(server)
    rotated = Image.open(io.BytesIO(sent["rotated"]))
    assert rotated.size == (768, 1024)  # upright: the 4000 px side is now the height
    top_right = rotated.getpixel((rotated.width - 10, 10))
    assert top_right[0] > 200  # the red quarter turned with the photo
    assert top_right[2] < 60
    assert sent["small"] == small  # already small enough: byte for byte, not re-encoded
    images = summary.usage["images"]
    assert images["count"] == 2
    assert images["bytes_read"] == len(jpeg(4000, 3000, orientation=6)) + len(small)
    assert images["bytes_sent"] == len(sent["rotated"]) + len(small)


async def test_detail_low_sends_512_px_unless_told_otherwise(mock, make_settings, tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(jpeg(3000, 2000))
    rows = [{"asset_id": "big", "image_path": "big.jpg"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    async with mock() as (url, server):
        await pipeline.run(make_settings(url, job=job(tmp_path, detail="low"), input=src))
        assert Image.open(io.BytesIO(sent_images(server)["big"])).size == (512, 341)
        server.state.received.clear()
        await pipeline.run(
            make_settings(
                url, job=job(tmp_path, detail="low", max_side=0), input=src, output=tmp_path / "as-is"
            )
        )
        assert sent_images(server)["big"] == (tmp_path / "big.jpg").read_bytes()


async def test_broken_images_are_each_one_input_error_and_the_rest_succeeds(
    mock, make_settings, tmp_path: Path
) -> None:
    catalogue = tmp_path / "catalogue"
    catalogue.mkdir()
    (catalogue / "good.jpg").write_bytes(jpeg(800, 600))
    (catalogue / "truncated.jpg").write_bytes(jpeg(800, 600)[:3000])
    (catalogue / "notes.png").write_bytes(b"this is a text file, not a PNG\n")
    (catalogue / "bomb.png").write_bytes(bomb())
    (tmp_path / "secret.jpg").write_bytes(jpeg(100, 100))
    (catalogue / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    names = ["good.jpg", "truncated.jpg", "notes.png", "bomb.png", "../secret.jpg", "link.jpg"]
    rows = [{"asset_id": f"a{i}", "image_path": name} for i, name in enumerate(names)]
    src = write_jsonl(catalogue / "in.jsonl", rows)
    async with mock() as (url, server):
        summary = await pipeline.run(make_settings(url, job=job(tmp_path, max_side=256), input=src))
        assert set(sent_images(server)) == {"a0"}  # nothing else was sent
    assert (summary.succeeded, summary.invalid_input, summary.exit_code) == (1, 5, 1)
    errors = {e["custom_id"]: e for e in read_jsonl(tmp_path / "out/errors.jsonl")}
    assert set(errors) == {"a1", "a2", "a3", "a4", "a5"}
    assert "cannot be read" in errors["a1"]["error"]["message"]  # truncated
    assert "not a PNG, JPEG, GIF or WebP" in errors["a2"]["error"]["message"]
    assert "decompression bomb" in errors["a3"]["error"]["message"]
    for outside in ("a4", "a5"):
        assert "leads outside" in errors[outside]["error"]["message"]
    assert all(e["error"]["field"] == "image_path" for e in errors.values())


async def test_paths_no_file_can_have_are_each_one_input_error_on_every_run(
    mock, make_settings, tmp_path: Path
) -> None:
    # Each of these ended the run as a bug (exit 70), on every resume: a NUL byte in the path
    # (ValueError), a symlink loop (RuntimeError on Python 3.11), ~ of a user who is not one.
    catalogue = tmp_path / "catalogue"
    catalogue.mkdir()
    (catalogue / "good.jpg").write_bytes(jpeg(80, 60))
    (catalogue / "loop.jpg").symlink_to("loop.jpg")
    (catalogue / "ping.jpg").symlink_to("pong.jpg")
    (catalogue / "pong.jpg").symlink_to("ping.jpg")
    names = ["good.jpg", "good.jpg\0.txt", "loop.jpg", "ping.jpg", "~no-such-user-here/x.jpg"]
    rows = [{"asset_id": f"a{i}", "image_path": name} for i, name in enumerate(names)]
    src = write_jsonl(catalogue / "in.jsonl", rows)
    for run in range(2):
        async with mock() as (url, server):
            summary = await pipeline.run(make_settings(url, job=job(tmp_path, max_side=0), input=src))
            assert set(sent_images(server)) == ({"a0"} if run == 0 else set())
        assert summary.exit_code == 1
        errors = {e["custom_id"]: e for e in read_jsonl(tmp_path / "out/errors.jsonl")}
        assert set(errors) == {"a1", "a2", "a3", "a4"}
        for error in errors.values():
            assert "cannot be found" in error["error"]["message"]
            assert error["error"]["field"] == "image_path"
        assert "a symlink loop" in errors["a2"]["error"]["message"]
        assert "a symlink loop" in errors["a3"]["error"]["message"]
    assert [r["custom_id"] for r in read_jsonl(tmp_path / "out/results.jsonl")] == ["a0"]


def test_estimate_counts_image_tokens_as_openai_bills_them(tmp_path: Path) -> None:
    (tmp_path / "wide.jpg").write_bytes(jpeg(4096, 2048))
    rows = [{"asset_id": "w", "image_path": "wide.jpg"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    high = estimate(build(job(tmp_path, detail="high", max_side=0), input=str(src)))
    low = estimate(build(job(tmp_path, detail="low"), input=str(src)))
    # 4096 x 2048 -> 2048 x 1024 -> 1536 x 768: 3 x 2 tiles of 512, 170 each, plus 85.
    assert tile_tokens(4096, 2048, "high") == 170 * 6 + 85
    text_only = low.models["vision/model"].prompt_tokens - 85
    assert high.models["vision/model"].prompt_tokens - text_only == 170 * 6 + 85


def test_sizing_options_are_checked_when_the_job_is_read(tmp_path: Path) -> None:
    for bad, message in (
        ({"max_side": -1}, "max_side must be"),
        ({"format": "bmp"}, "format must be one of jpeg, png, webp"),
        ({"quality": 101}, "quality must be"),
    ):
        with pytest.raises(SettingsError, match=message):
            build(job(tmp_path, **bad), input="in.jsonl")


async def test_records_sharing_a_photo_decode_it_once(
    mock, make_settings, tmp_path: Path, monkeypatch
) -> None:
    from pipeline.input import imagedata as images

    (tmp_path / "shared.jpg").write_bytes(jpeg(2000, 1500))
    decoded: list[Path] = []
    real = images._sized
    monkeypatch.setattr(
        images,
        "_sized",
        lambda data, sizing, path, field: decoded.append(path) or real(data, sizing, path, field),
    )
    monkeypatch.setattr(images, "_sized_cache", images._Sized(images.SIZED_CACHE_BYTES))
    rows = [{"asset_id": f"lang-{i}", "image_path": "shared.jpg"} for i in range(5)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    async with mock() as (url, server):
        summary = await pipeline.run(
            make_settings(url, job=job(tmp_path, max_side=300), input=src, concurrency=1)
        )
        sent = sent_images(server)
    assert summary.succeeded == 5
    assert len(decoded) == 1
    assert len(set(sent.values())) == 1  # the same bytes each time
    assert summary.usage["images"]["bytes_read"] == 5 * (tmp_path / "shared.jpg").stat().st_size
