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

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import InputError, SettingsError
from pipeline.input.images import Pending, locate, look, sizing_of

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_.-]*)(\?)?\}")
_KEYS = ("id", "messages", "max_image_bytes", "images", "image_root")
IMAGE_KEYS = ("max_side", "format", "quality")
MARKER = f"pipeline-image:{uuid.uuid4().hex}:"  # where a data URL goes, once read
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024


Render = Callable[[Mapping[str, Any], "Place"], Any]


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

        def one(record: Mapping[str, Any], _: Place) -> Any:
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

    def joined(record: Mapping[str, Any], _: Place) -> str:
        out = []
        for p in pieces:
            if isinstance(p, str):
                out.append(p)
            else:
                value = _lookup(record, p[0], p[1])
                out.append("" if value is None else _text(value))
        return "".join(out)

    return joined


@dataclass(slots=True)
class Place:
    """Where a record is rendered: the input's folder (relative image paths), the folder
    images must stay under, and the images the render found, to be read later."""

    base: Path
    root: Path
    images: list[Pending] = field(default_factory=list)


def _compile_image(part: Mapping[str, Any], where: str, cap: int, defaults: Mapping[str, Any]) -> Render:
    url_field, path_field = part.get("url"), part.get("path")
    detail = part.get("detail")
    if not url_field and not path_field:
        raise SettingsError(f'{where}: an image part needs url = "FIELD" or path = "FIELD"')
    for key in part:
        if key not in ("type", "url", "path", "detail", *IMAGE_KEYS):
            raise SettingsError(
                f"{where}: unknown key '{key}' in an image part; known: type, url, path, detail, "
                + ", ".join(IMAGE_KEYS)
            )
    sizing = sizing_of(part, defaults, where)

    def image(record: Mapping[str, Any], place: Place) -> dict[str, Any]:
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
            field_name = str(path_field)
            path = locate(raw_path, place.base, place.root, field_name)
            marker = f"{MARKER}{len(place.images)}"
            place.images.append(look(path, sizing, detail, field=field_name, cap=cap, marker=marker.encode()))
            url = marker
        inner: dict[str, Any] = {"url": url}
        if detail:
            inner["detail"] = detail
        return {"type": "image_url", "image_url": inner}

    return image


def _compile(node: Any, where: str, cap: int, images: Mapping[str, Any]) -> Render:
    if isinstance(node, str):
        return _compile_string(node)
    if isinstance(node, list):
        items = [_compile(v, where, cap, images) for v in node]
        return lambda record, place: [item(record, place) for item in items]
    if isinstance(node, dict):
        if node.get("type") == "image":
            return _compile_image(node, where, cap, images)
        entries = [(k, _compile(v, where, cap, images)) for k, v in node.items()]
        return lambda record, place: {k: v(record, place) for k, v in entries}
    return lambda record, place: node


_NOWHERE = Place(Path(), Path())  # an id needs no images


@dataclass(frozen=True, slots=True)
class Template:
    messages: Render
    custom_id: Render | None
    image_root: str | None = None  # relative to the job file, as the job file wrote it
    local_images: bool = False  # an image part may read a file (a `path`)

    def name(self, record: Mapping[str, Any]) -> str | None:
        """What to call a record in a message: its id, as far as it can be told."""
        if self.custom_id is not None:
            try:
                return _text(self.custom_id(record, _NOWHERE))
            except InputError:
                pass
        name = record.get("custom_id", record.get("id"))
        return None if name is None else _text(name)

    def id_of(self, record: Mapping[str, Any]) -> Any:
        """The record's custom_id: the template's `id`, else its own custom_id or id. Cheap,
        so a record already done is skipped before its messages (and images) are built."""
        if self.custom_id is not None:
            return _text(self.custom_id(record, _NOWHERE))
        return record.get("custom_id", record.get("id"))

    def messages_of(self, record: Mapping[str, Any], place: Place) -> list[Any]:
        messages: list[Any] = self.messages(record, place)
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
    images = raw.get("images", {})
    if not isinstance(images, dict):
        raise SettingsError(f"{where}: [template.images] must be a table of {', '.join(IMAGE_KEYS)}")
    for key in images:
        if key not in IMAGE_KEYS:
            raise SettingsError(
                f"{where}: unknown key '{key}' in [template.images]; known: {', '.join(IMAGE_KEYS)}"
            )
    root = raw.get("image_root")
    if root is not None and not isinstance(root, str):
        raise SettingsError(f"{where}: [template] image_root must be a folder path")
    id_template = raw.get("id")
    if id_template is not None and not isinstance(id_template, str):
        raise SettingsError(f'{where}: [template] id must be a string such as "{{asset_id}}"')
    return Template(
        messages=_compile(messages, where, cap, images),
        custom_id=_compile_string(id_template) if id_template else None,
        image_root=root,
        local_images=_has_paths(messages),
    )


def _has_paths(node: Any) -> bool:
    if isinstance(node, list):
        return any(_has_paths(v) for v in node)
    if isinstance(node, dict):
        if node.get("type") == "image":
            return bool(node.get("path"))
        return any(_has_paths(v) for v in node.values())
    return False
