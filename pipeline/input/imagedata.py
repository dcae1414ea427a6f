"""An image's bytes as they are sent: read just before the request goes (in a thread), checked
whole, sized and encoded with Pillow where the part asks for it, and kept a while once sized.
What the reader finds and looks at first is `pipeline.input.images`.
"""

from __future__ import annotations

import base64
import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.input.images import (
    FORMATS,
    Pending,
    Sizing,
    bad_image,
    check_size,
    media_type,
    pillow_available,
    sent_size,
)
from pipeline.quote import quote

PIL_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}


class _Sized:
    """The images sized lately, by file and sizing, up to `SIZED_CACHE_BYTES` of them: records
    that share a photo (a caption per language, a product in several listings) decode it
    once. Only sized images are kept (small); one sent as it is is read again, which is cheap."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._items: OrderedDict[tuple[Any, ...], tuple[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._working: dict[tuple[Any, ...], threading.Lock] = {}  # one decode per image at a time

    def lock_for(self, key: tuple[Any, ...]) -> threading.Lock:
        with self._lock:
            return self._working.setdefault(key, threading.Lock())

    def done(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            self._working.pop(key, None)

    def get(self, key: tuple[Any, ...]) -> tuple[str, bytes] | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple[Any, ...], value: tuple[str, bytes]) -> None:
        if len(value[1]) > self.limit // 8:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.held += len(value[1])
            while self.held > self.limit:
                _, (_, old) = self._items.popitem(last=False)
                self.held -= len(old)


SIZED_CACHE_BYTES = 16 * 1024 * 1024
_sized_cache = _Sized(SIZED_CACHE_BYTES)


def encode(image: Pending) -> tuple[bytes, int, int]:
    """Read, check, size and encode one image (in a thread): its data URL, the bytes read
    (the file's size) and the bytes sent."""
    path, field = image.path, image.field
    size = check_size(path, image.cap, field)
    key: tuple[Any, ...] | None = None
    if image.sizing.changes:
        try:
            key = (path, path.stat().st_mtime_ns, size, image.sizing)
        except OSError:
            key = None
    if key is None:
        return _encode(image, size, None)
    with _sized_cache.lock_for(key):  # a second record of the same photo waits for the first
        found = _sized_cache.get(key)
        if found is not None:
            return _data_url(*found), size, len(found[1])
        try:
            return _encode(image, size, key)
        finally:
            _sized_cache.done(key)


def _encode(image: Pending, size: int, key: tuple[Any, ...] | None) -> tuple[bytes, int, int]:
    path, field = image.path, image.field
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read image {quote(str(path))}: {e.strerror}", field=field) from None
    kind = media_type(data[:16])
    if kind is None:
        raise InputError(
            f"{quote(str(path))} is not a PNG, JPEG, GIF or WebP image", field=field, code="bad_image"
        )
    if pillow_available():
        sized = _sized(data, image.sizing, path, field)
        if sized is not None:
            kind, data = sized
            if key is not None:
                _sized_cache.put(key, sized)
    return _data_url(kind, data), size, len(data)


def _data_url(kind: str, data: bytes) -> bytes:
    return b"data:" + kind.encode() + b";base64," + base64.b64encode(data)


def _check_whole(im: Any, data: bytes, path: Path, field: str) -> None:
    """An image sent as it is must still be whole: a JPEG ends in its end-of-image marker
    (a truncated one does not), a PNG's chunks all check out; others are decoded."""
    if im.format == "JPEG":
        if not data.rstrip(b"\0")[-2:] == b"\xff\xd9":
            raise bad_image(path, field, "the JPEG is truncated (no end-of-image marker)")
    elif im.format == "PNG":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as fresh:
            fresh.verify()  # every chunk's CRC, without decoding the pixels
    else:
        im.load()


def _sized(data: bytes, sizing: Sizing, path: Path, field: str) -> tuple[str, bytes] | None:
    """The image decoded (always: a broken file is caught here) and, where it must change,
    re-encoded; None when it goes as it is."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise bad_image(path, field, "too many pixels (a decompression bomb?)")
            original = PIL_FORMATS.get(im.format or "")
            target = sent_size(im.width, im.height, sizing)
            upright = im.getexif().get(0x0112, 1) == 1
            if target == im.size and upright and original is not None:
                _check_whole(im, data, path, field)
                return None
            if target != im.size and im.format == "JPEG":
                # Decode at a reduced scale (1/2 to 1/8) no smaller than the target: far quicker.
                im.draft("RGB", target)
            im.load()
            out = ImageOps.exif_transpose(im)
            if sizing.max_side:
                out.thumbnail((sizing.max_side, sizing.max_side), Image.Resampling.BICUBIC)
            fmt = sizing.format or ("png" if original in ("image/png", "image/gif") else "jpeg")
            if fmt == "jpeg" and out.mode not in ("RGB", "L"):
                out = out.convert("RGB")
            buffer = io.BytesIO()
            options: dict[str, Any] = {"quality": sizing.quality} if fmt != "png" else {"optimize": True}
            out.save(buffer, format=fmt.upper(), **options)
            return FORMATS[fmt], buffer.getvalue()
    except InputError:
        raise
    except Exception as e:  # Pillow's many ways to say a file is broken
        raise bad_image(path, field, str(e) or type(e).__name__) from None
