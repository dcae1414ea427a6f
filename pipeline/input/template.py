"""Turn a record line into chat messages, as the job file's `[template]` says.

    [template]
    id = "{asset_id}"                  # optional; default: the record's custom_id or id
    [[template.messages]]
    role = "user"
    content = [
      { type = "text", text = "Alt text for {title} (tags: {tags?})" },
      { type = "image", url = "image_url", path = "image_path" },
    ]

`{name}` is replaced by the record's field; a string that is only `{name}` takes the value
as it is (a number stays a number). `{name?}` is optional: empty when the field is missing.
`{{` and `}}` are literal braces. An `image` part becomes an `image_url` part: the record's
`url` field as it is, or the file at its `path` field as a data URL (relative to the input).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, SettingsError

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_.-]*)(\?)?\}")
_KEYS = ("id", "messages", "max_image_bytes")
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024

# Magic numbers of the image types chat models accept.
_IMAGE_TYPES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)

Render = Callable[[Mapping[str, Any], Path], Any]


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _lookup(record: Mapping[str, Any], name: str, optional: bool) -> Any:
    value = record.get(name)
    if value is None and not optional:
        raise InputError(
            f"record has no field '{name}', which the job's [template] uses; "
            f"add it to the line or mark it optional as {{{name}?}}",
            field=name,
        )
    return value


def _compile_string(text: str) -> Render:
    whole = _PLACEHOLDER.fullmatch(text)
    if whole and whole.group(1):
        name, optional = whole.group(1), bool(whole.group(2))

        def one(record: Mapping[str, Any], _: Path) -> Any:
            value = _lookup(record, name, optional)
            return "" if value is None else value

        return one
    pieces: list[str | tuple[str, bool]] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        pieces.append(text[pos : m.start()])
        token = m.group(0)
        if token in ("{{", "}}"):
            pieces.append(token[0])
        else:
            pieces.append((m.group(1), bool(m.group(2))))
        pos = m.end()
    pieces.append(text[pos:])
    if not any(isinstance(p, tuple) for p in pieces):
        literal = "".join(p for p in pieces if isinstance(p, str))
        return lambda record, _: literal

    def joined(record: Mapping[str, Any], _: Path) -> str:
        out = []
        for p in pieces:
            if isinstance(p, str):
                out.append(p)
            else:
                value = _lookup(record, p[0], p[1])
                out.append("" if value is None else _text(value))
        return "".join(out)

    return joined


def _image_type(head: bytes) -> str | None:
    for magic, media_type in _IMAGE_TYPES:
        if head.startswith(magic):
            return media_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _data_url(path: Path, *, field: str, cap: int) -> str:
    try:
        size = path.stat().st_size
        if size > cap:
            raise InputError(
                f"image {str(path)!r} is {size:,} bytes, over the cap of {cap:,}; "
                "shrink it or raise [template] max_image_bytes",
                field=field,
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"image file {str(path)!r} not found", field=field) from None
    except IsADirectoryError:
        raise InputError(f"image path {str(path)!r} is a folder", field=field) from None
    except OSError as e:
        raise InputError(f"cannot read image {str(path)!r}: {e.strerror}", field=field) from None
    media_type = _image_type(data[:16])
    if media_type is None:
        raise InputError(
            f"{str(path)!r} is not a PNG, JPEG, GIF or WebP image", field=field, code="bad_image"
        )
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _compile_image(part: Mapping[str, Any], where: str, cap: int) -> Render:
    url_field, path_field = part.get("url"), part.get("path")
    detail = part.get("detail")
    if not url_field and not path_field:
        raise SettingsError(f'{where}: an image part needs url = "FIELD" or path = "FIELD"')
    for key in part:
        if key not in ("type", "url", "path", "detail"):
            raise SettingsError(f"{where}: unknown key '{key}' in an image part")

    def image(record: Mapping[str, Any], base: Path) -> dict[str, Any]:
        url = record.get(url_field) if url_field else None
        if url is not None and not isinstance(url, str):
            raise InputError(f"field '{url_field}' must be a URL string", field=url_field)
        if not url:
            raw_path = record.get(path_field) if path_field else None
            if not raw_path:
                names = " or ".join(f"'{f}'" for f in (url_field, path_field) if f)
                raise InputError(f"record has no image: set {names}", field=url_field or path_field)
            if not isinstance(raw_path, str):
                raise InputError(f"field '{path_field}' must be a file path", field=path_field)
            path = Path(raw_path).expanduser()
            url = _data_url(path if path.is_absolute() else base / path, field=str(path_field), cap=cap)
        inner: dict[str, Any] = {"url": url}
        if detail:
            inner["detail"] = detail
        return {"type": "image_url", "image_url": inner}

    return image


def _compile(node: Any, where: str, cap: int) -> Render:
    if isinstance(node, str):
        return _compile_string(node)
    if isinstance(node, list):
        items = [_compile(v, where, cap) for v in node]
        return lambda record, base: [item(record, base) for item in items]
    if isinstance(node, dict):
        if node.get("type") == "image":
            return _compile_image(node, where, cap)
        entries = [(k, _compile(v, where, cap)) for k, v in node.items()]
        return lambda record, base: {k: v(record, base) for k, v in entries}
    return lambda record, base: node


@dataclass(frozen=True, slots=True)
class Template:
    messages: Render
    custom_id: Render | None

    def name(self, record: Mapping[str, Any]) -> str | None:
        """What to call a record in a message: its id, as far as it can be told."""
        if self.custom_id is not None:
            try:
                return _text(self.custom_id(record, Path()))
            except InputError:
                pass
        name = record.get("custom_id", record.get("id"))
        return None if name is None else _text(name)

    def id_of(self, record: Mapping[str, Any]) -> Any:
        """The record's custom_id: the template's `id`, else its own custom_id or id. Cheap,
        so a record already done is skipped before its messages (and images) are built."""
        if self.custom_id is not None:
            return _text(self.custom_id(record, Path()))
        return record.get("custom_id", record.get("id"))

    def messages_of(self, record: Mapping[str, Any], base: Path) -> list[Any]:
        messages: list[Any] = self.messages(record, base)
        return messages


def compile_template(raw: Mapping[str, Any], *, where: str) -> Template:
    for key in raw:
        if key not in _KEYS:
            raise SettingsError(f"{where}: unknown key '{key}' in [template]; known: {', '.join(_KEYS)}")
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SettingsError(
            f"{where}: [template] needs messages, as [[template.messages]] tables "
            'with role = "..." and content = "..."'
        )
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise SettingsError(f"{where}: [[template.messages]] number {i} needs role and content")
    cap = raw.get("max_image_bytes", DEFAULT_MAX_IMAGE_BYTES)
    if not isinstance(cap, int) or cap <= 0:
        raise SettingsError(f"{where}: [template] max_image_bytes must be a whole number above 0")
    id_template = raw.get("id")
    if id_template is not None and not isinstance(id_template, str):
        raise SettingsError(f'{where}: [template] id must be a string such as "{{asset_id}}"')
    return Template(
        messages=_compile(messages, where, cap),
        custom_id=_compile_string(id_template) if id_template else None,
    )
