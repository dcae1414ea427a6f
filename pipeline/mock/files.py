"""The mock's files API, as OpenAI serves it for batches: upload (multipart, `purpose=batch`),
list, get, content, delete.

Files live on disk in a folder the server owns (made at the first upload, removed when the
server stops), never in memory: an upload is streamed to disk as it arrives and a download
streamed from it, so a 100,000-line batch costs the mock no more memory than a small one.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from pipeline.mock.state import BatchTally

CHUNK = 1 << 16


def error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None
) -> web.Response:
    """An error as OpenAI's batch and files paths send it."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json")


@dataclass
class MockFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    path: Path

    def described(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


class FileStore:
    """Every file the mock holds: uploaded inputs, and the output and error files of batches."""

    def __init__(self, clock: Callable[[], float], tally: BatchTally) -> None:
        self.clock, self.tally = clock, tally
        self.files: dict[str, MockFile] = {}
        self.made = 0
        self._folder: Path | None = None

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="pipeline-mock-"))
        return self._folder

    def new_path(self) -> tuple[str, Path]:
        """A fresh file id and where its bytes go."""
        self.made += 1
        file_id = f"file-mock{self.made:08d}"
        return file_id, self.folder / file_id

    def add(self, file_id: str, path: Path, *, filename: str, purpose: str) -> MockFile:
        made = MockFile(file_id, filename, purpose, path.stat().st_size, int(self.clock()), path)
        self.files[file_id] = made
        self.tally.files_alive = len(self.files)
        return made

    def kept(self, file_id: str, path: Path, *, filename: str, purpose: str) -> str | None:
        """A batch's output or error file, made only where it holds a line: its id, or None."""
        if not path.stat().st_size:
            path.unlink(missing_ok=True)
            return None
        return self.add(file_id, path, filename=filename, purpose=purpose).id

    def close(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    async def upload(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return error(400, "Expected a multipart/form-data body with 'purpose' and 'file'")
        reader = await request.multipart()
        purpose: str | None = None
        kept: tuple[str, Path, str] | None = None
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart: not something a files API takes
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                file_id, path = self.new_path()
                with path.open("wb") as out:
                    while chunk := await part.read_chunk(CHUNK):
                        out.write(chunk)
                kept = (file_id, path, part.filename or "upload.jsonl")
        if kept is None:
            return error(400, "Missing required parameter: 'file'", param="file")
        file_id, path, filename = kept
        if not purpose:
            path.unlink(missing_ok=True)
            return error(400, "Missing required parameter: 'purpose'", param="purpose")
        self.tally.files_uploaded += 1
        return json(self.add(file_id, path, filename=filename, purpose=purpose).described())

    async def listed(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        data = [f.described() for f in self.files.values() if purpose is None or f.purpose == purpose]
        return json({"object": "list", "data": data[::-1], "has_more": False})

    def _named(self, request: web.Request) -> MockFile | None:
        return self.files.get(request.match_info["file_id"])

    async def get(self, request: web.Request) -> web.Response:
        found = self._named(request)
        if found is None:
            return error(404, f"No such File object: {request.match_info['file_id']}", param="id")
        return json(found.described())

    async def content(self, request: web.Request) -> web.StreamResponse:
        found = self._named(request)
        if found is None:
            return error(404, f"No such File object: {request.match_info['file_id']}", param="id")
        return web.FileResponse(
            found.path, chunk_size=CHUNK, headers={"Content-Type": "application/octet-stream"}
        )

    async def delete(self, request: web.Request) -> web.Response:
        found = self.files.pop(request.match_info["file_id"], None)
        if found is None:
            return error(404, f"No such File object: {request.match_info['file_id']}", param="id")
        self.tally.files_alive = len(self.files)
        found.path.unlink(missing_ok=True)
        return json({"id": found.id, "object": "file", "deleted": True})
