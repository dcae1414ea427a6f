"""Records rendered through a job's [template] into (multimodal) messages."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from pipeline.errors import InputError, SettingsError
from pipeline.input.imagedata import encode
from pipeline.input.template import Place, compile_template


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, format="PNG")
    return out.getvalue()


PNG = _png()

TEMPLATE = {
    "id": "{asset_id}",
    "messages": [
        {"role": "system", "content": "Alt text, {{short}}."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Title: {title}; tags: {tags?}; year {year?}"},
                {"type": "image", "url": "image_url", "path": "image_path", "detail": "low"},
            ],
        },
    ],
}


def test_a_record_becomes_a_multimodal_message(tmp_path: Path) -> None:
    t = compile_template(TEMPLATE, where="job")
    record = {"asset_id": "a1", "title": "Pier", "tags": ["sea", "dusk"], "image_url": "https://x/1.jpg"}
    messages, custom_id = t.messages_of(record, Place(tmp_path, tmp_path)), t.id_of(record)
    assert custom_id == "a1"
    assert messages[0] == {"role": "system", "content": "Alt text, {short}."}
    assert messages[1]["content"] == [
        {"type": "text", "text": "Title: Pier; tags: sea, dusk; year "},
        {"type": "image_url", "image_url": {"url": "https://x/1.jpg", "detail": "low"}},
    ]


def test_a_local_image_becomes_a_data_url(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img/a.png").write_bytes(PNG)
    t = compile_template(TEMPLATE, where="job")
    place = Place(tmp_path, tmp_path)
    messages = t.messages_of({"asset_id": "a", "title": "t", "image_path": "img/a.png"}, place)
    url = messages[1]["content"][1]["image_url"]["url"]
    (image,) = place.images
    assert url == image.marker.decode()  # read when the request goes, not now
    data_url, read, sent = encode(image)
    assert data_url == b"data:image/png;base64," + base64.b64encode(PNG)  # 8 px: sent as it is
    assert read == sent == len(PNG)


def test_a_whole_placeholder_keeps_the_value_type(tmp_path: Path) -> None:
    t = compile_template({"messages": [{"role": "user", "content": "{parts}"}]}, where="job")
    parts = [{"type": "text", "text": "hi"}]
    messages, custom_id = (
        t.messages_of({"parts": parts}, Place(tmp_path, tmp_path)),
        t.id_of({"parts": parts}),
    )
    assert messages[0]["content"] == parts
    assert custom_id is None


@pytest.mark.parametrize(
    ("record", "files", "message"),
    [
        ({"asset_id": "a", "image_url": "u"}, {}, "record has no field 'title'"),
        ({"asset_id": "a", "title": "t"}, {}, "record has no image: set 'image_url' or 'image_path'"),
        ({"asset_id": "a", "title": "t", "image_path": "nope.png"}, {}, "not found"),
        (
            {"asset_id": "a", "title": "t", "image_path": "doc.txt"},
            {"doc.txt": b"hello"},
            "not a PNG, JPEG, GIF or WebP",
        ),
        ({"asset_id": "a", "title": "t", "image_url": 5}, {}, "must be a URL string"),
    ],
)
def test_records_that_cannot_be_rendered_say_why(
    tmp_path: Path, record: dict, files: dict, message: str
) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    t = compile_template(TEMPLATE, where="job")
    with pytest.raises(InputError, match=message):
        t.messages_of(record, Place(tmp_path, tmp_path))


def test_an_image_over_the_cap_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(PNG + b"\x00" * 100)
    t = compile_template({**TEMPLATE, "max_image_bytes": 50}, where="job")
    with pytest.raises(InputError, match="over the cap of 50"):
        t.messages_of({"asset_id": "a", "title": "t", "image_path": "big.png"}, Place(tmp_path, tmp_path))


def test_a_template_without_messages_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="needs messages"):
        compile_template({"id": "{x}"}, where="job.toml")
