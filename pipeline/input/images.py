"""The local images of a template's image parts: found under the catalogue's folder, read as
late as possible, and sent the size the model sees them.

The reader only looks: it finds the file (under `image_root`: a `..` or a symlink out is an
input error), reads its header for the size, and puts a marker where the data URL will go,
so that a request waiting in the read-ahead buffer holds a few bytes, not megabytes. The
worker fills the markers just before the first attempt (`fill`, in a thread: decoding and
resizing hold no event loop), and the body is let go once the request is sent for good.

Sizing (Pillow): the longest side is brought down to `max_side` (by default 512 for
`detail = "low"`, which is all the model looks at; never up), EXIF orientation applied, and
the image encoded as `format` at `quality`. An image already small enough and upright goes
byte for byte, whatever its format (re-encoding it would gain nothing), but is decoded once: a truncated file, a text
file named .png or a decompression bomb is an input error naming the record, and the run
goes on.
"""

from __future__ import annotations

import base64
import errno
import io
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, SettingsError
from pipeline.quote import brief, quote

FORMATS = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
LOW_DETAIL_SIDE = 512  # what OpenAI's `detail: low` looks at
MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
PIL_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp"}
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def pillow_available() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Sizing:
    """How an image part's images are sent: as they are (max_side None), or sized."""

    max_side: int | None = None
    format: str | None = None  # of a re-encoded image: "jpeg", "png", "webp"; None: as it was
    quality: int = 85

    @property
    def changes(self) -> bool:
        return self.max_side is not None or self.format is not None


def sizing_of(part: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> Sizing:
    """The part's `max_side`, `format` and `quality`, else the job's `[template.images]`, else
    what `detail` implies (512 px at low); `max_side = 0` sends images as they are."""

    def pick(key: str) -> Any:
        return part.get(key, defaults.get(key))

    max_side = pick("max_side")
    if max_side is None and part.get("detail") == "low":
        max_side = LOW_DETAIL_SIDE
    if max_side is not None and (not isinstance(max_side, int) or isinstance(max_side, bool) or max_side < 0):
        raise SettingsError(f"{where}: max_side must be a whole number of pixels (0: as they are)")
    fmt = pick("format")
    if fmt is not None and fmt not in FORMATS:
        raise SettingsError(f"{where}: format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    quality = pick("quality") or 85
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise SettingsError(f"{where}: quality must be a whole number from 1 to 100")
    sizing = Sizing(max_side or None, fmt, quality)
    if sizing.changes and not pillow_available():
        raise SettingsError(
            f"{where}: sizing images (max_side {sizing.max_side}, format {sizing.format}) needs "
            "Pillow: pip install 'pipeline[images]' (make installs it), or set max_side = 0 to "
            "send images as they are"
        )
    return sizing


def locate(raw: str, base: Path, root: Path, field: str) -> Path:
    """The file a record names, which must resolve (symlinks followed) under `root`."""
    try:
        path = Path(raw).expanduser()
        path = path if path.is_absolute() else base / path
        resolved = path.resolve()
    except (OSError, ValueError, RuntimeError) as e:
        # A NUL byte (ValueError), a symlink loop (RuntimeError on Python 3.11, OSError
        # later), ~someone who is not a user here (RuntimeError): a path no file has.
        loop = getattr(e, "errno", None) == errno.ELOOP or "symlink loop" in str(e).lower()
        why = "a symlink loop" if loop else brief(str(e) or type(e).__name__, limit=120)
        raise InputError(f"image {quote(raw)} cannot be found: {why}", field=field) from None
    if not resolved.is_relative_to(root.resolve()):
        raise InputError(
            f"image {quote(raw)} leads outside {root} (through '..', a symlink or an absolute path); "
            "images must be under the catalogue's folder, or set image_root in [template]",
            field=field,
            code="image_outside",
        )
    return resolved


def media_type(head: bytes) -> str | None:
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def tile_tokens(width: int, height: int, detail: str | None) -> int:
    """What OpenAI bills for an image: 85 at low detail; else fitted into 2048 px, its short
    side brought to 768 px, then 170 a 512 px tile, plus 85."""
    if detail == "low":
        return 85
    scale = min(1.0, 2048 / max(width, height, 1))
    w, h = width * scale, height * scale
    scale = min(1.0, 768 / max(min(w, h), 1))
    w, h = w * scale, h * scale
    return 170 * math.ceil(w / 512) * math.ceil(h / 512) + 85


def _sent_size(width: int, height: int, sizing: Sizing) -> tuple[int, int]:
    side = sizing.max_side
    if side is None or max(width, height) <= side:
        return width, height
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(slots=True)
class Pending:
    """An image the body's marker stands for, to be read just before the request goes."""

    marker: bytes
    path: Path
    sizing: Sizing
    field: str
    cap: int  # bytes the file may have
    tokens: int  # what the model will bill for it, as it will be sent
    size: int = 0  # bytes on disk when the reader looked


def _check_size(path: Path, cap: int, field: str) -> int:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError(f"image file {quote(str(path))} not found", field=field) from None
    except OSError as e:
        raise InputError(f"cannot read image {quote(str(path))}: {e.strerror}", field=field) from None
    if path.is_dir():
        raise InputError(f"image path {quote(str(path))} is a folder", field=field)
    if size > cap:
        raise InputError(
            f"image {quote(str(path))} is {size:,} bytes, over the cap of {cap:,}; shrink it or raise "
            "[template] max_image_bytes",
            field=field,
        )
    return size


def look(path: Path, sizing: Sizing, detail: str | None, *, field: str, cap: int, marker: bytes) -> Pending:
    """What the reader does: the file is there, an image, this big; nothing kept of it."""
    size = _check_size(path, cap, field)
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as e:
        raise InputError(f"cannot read image {quote(str(path))}: {e.strerror}", field=field) from None
    if media_type(head) is None:
        raise InputError(
            f"{quote(str(path))} is not a PNG, JPEG, GIF or WebP image", field=field, code="bad_image"
        )
    width = height = 1024  # a guess where the header cannot be read without Pillow
    if pillow_available():
        width, height = _header_size(path, field)
    width, height = _sent_size(width, height, sizing)
    return Pending(marker, path, sizing, field, cap, tile_tokens(width, height, detail), size)


def _bad(path: Path, field: str, why: str) -> InputError:
    return InputError(f"image {quote(str(path))} cannot be read: {why}", field=field, code="bad_image")


def _header_size(path: Path, field: str) -> tuple[int, int]:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if im.getexif().get(0x0112) in ROTATED:
                    width, height = height, width
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bad(path, field, "too many pixels (a decompression bomb?)") from None
    except Exception as e:
        raise _bad(path, field, str(e) or type(e).__name__) from None
    return width, height


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
    size = _check_size(path, image.cap, field)
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
            raise _bad(path, field, "the JPEG is truncated (no end-of-image marker)")
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
                raise _bad(path, field, "too many pixels (a decompression bomb?)")
            original = PIL_FORMATS.get(im.format or "")
            target = _sent_size(im.width, im.height, sizing)
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
        raise _bad(path, field, str(e) or type(e).__name__) from None
