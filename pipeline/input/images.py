"""The local images of a template's image parts: found under the catalogue's folder, read as
late as possible, and sent the size the model sees them.

The reader only looks: it finds the file (under `image_root`: a `..` or a symlink out is an
input error), reads its header for the size, and puts a marker where the data URL will go,
so that a request waiting in the read-ahead buffer holds a few bytes, not megabytes. The
worker fills the markers just before the first attempt (`imagedata.encode`, in a thread:
decoding and resizing hold no event loop), and the body is let go once it is sent for good.

Sizing (Pillow): the longest side is brought down to `max_side` (by default 512 for
`detail = "low"`, which is all the model looks at; never up), EXIF orientation applied, and
the image encoded as `format` at `quality`. An image already small enough and upright goes
byte for byte, whatever its format (re-encoding it would gain nothing), but is decoded once:
a truncated file, a text file named .png or a decompression bomb is an input error naming
the record, and the run goes on.
"""

from __future__ import annotations

import errno
import math
import warnings
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
            "Pillow, a dependency of chat-pipeline missing here (installed with --no-deps?): "
            "pip install pillow, or set max_side = 0 to send images as they are"
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


def sent_size(width: int, height: int, sizing: Sizing) -> tuple[int, int]:
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


def check_size(path: Path, cap: int, field: str) -> int:
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
    size = check_size(path, cap, field)
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
    width, height = sent_size(width, height, sizing)
    return Pending(marker, path, sizing, field, cap, tile_tokens(width, height, detail), size)


def bad_image(path: Path, field: str, why: str) -> InputError:
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
        raise bad_image(path, field, "too many pixels (a decompression bomb?)") from None
    except Exception as e:
        raise bad_image(path, field, str(e) or type(e).__name__) from None
    return width, height
