"""Stream the input file, one line at a time, into requests or input errors.

Three line shapes are accepted (DESIGN.md): an OpenAI Batch API line, a bare request body,
or, when the job has a `[template]`, a record rendered through it. Every body parameter is
passed on untouched, unknown ones too. A line without an id gets one derived from its bytes,
so the same line gets the same id on every run (the n-th identical line gets a `-n` suffix).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from pipeline.errors import InputError
from pipeline.input import jsonl
from pipeline.input.body import check_body, type_name
from pipeline.input.images import Pending
from pipeline.input.pipe import PipeLines, is_pipe
from pipeline.input.shard import Shard
from pipeline.input.source import lines
from pipeline.input.template import Place, Template, compile_template
from pipeline.input.tokens import TokenEstimator, max_completion_tokens
from pipeline.job import Failure, Outcome, Request
from pipeline.output.ledger import Ledger
from pipeline.quote import quote
from pipeline.run.control import Refill
from pipeline.settings import Settings

BATCH_URL = "/v1/chat/completions"
YIELD_EVERY = 64  # lines: a refill of the request buffer does not hold the loop for long


@dataclass(slots=True)
class Parsed:
    """A line turned into a body, before ids are checked against the run's ledger."""

    body: dict[str, Any] | None  # None until `render` builds it (a record)
    custom_id: str | None
    metadata: Any
    render: Callable[[], tuple[dict[str, Any], list[Pending]]] | None = None


def _as_id(value: Any) -> str | None:
    """An id as a line may write it (a whole number stands for its digits); None if it is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and value else None


class LineParser:
    """Turns one raw input line into a `Request`, or raises `InputError`."""

    def __init__(self, settings: Settings, *, exact_tokens: bool = False, every_token: bool = False) -> None:
        self.defaults = dict(settings.request)
        self.default_model = settings.default_model
        self.template: Template | None = None
        if settings.template is not None:
            self.template = compile_template(settings.template, where=str(settings.job_file))
        self.base = settings.input.parent
        # Images must stay under the catalogue's folder: the input's, or the job's image_root.
        self.image_root = self.base
        if self.template is not None and self.template.image_root is not None:
            where = settings.job_file.parent if settings.job_file is not None else Path()
            self.image_root = where / Path(self.template.image_root).expanduser()
        self.max_line_bytes = settings.max_line_bytes
        self.estimator = TokenEstimator(exact=exact_tokens, every=every_token)
        self.own_model = 0  # lines that name a model of their own, not the job's
        self.shard = settings.shard

    def _shape(self, obj: dict[str, Any]) -> Parsed:
        if self.template is not None:
            template, base, root = self.template, self.base, self.image_root

            def named(error: InputError) -> InputError:
                name = template.name(obj)
                if name is not None:
                    error.message = f"record {quote(name)}: {error.message}"
                error.metadata = obj
                return error

            def render() -> tuple[dict[str, Any], list[Pending]]:
                place = Place(base, root)
                try:
                    return {"messages": template.messages_of(obj, place)}, place.images
                except InputError as e:
                    raise named(e) from None

            try:
                custom_id = template.id_of(obj)
            except InputError as e:
                raise named(e) from None
            return Parsed(None, custom_id, obj, render)
        if "body" in obj and ("url" in obj or "method" in obj or "custom_id" in obj):
            url = obj.get("url")
            if url != BATCH_URL:
                raise InputError(
                    f"Batch line for url {quote(url)}; only {BATCH_URL} is supported", field="url"
                )
            method = obj.get("method", "POST")
            if method != "POST":
                raise InputError(
                    f"Batch line with method {quote(method)}; only POST is supported", field="method"
                )
            body = obj["body"]
            if not isinstance(body, dict):
                raise InputError(f"'body' is {type_name(body)}; it must be a request object", field="body")
            check_body(body, "body.")
            return Parsed(body, obj.get("custom_id"), obj.get("metadata"))
        if "messages" not in obj:
            raise InputError(
                "no 'messages': a line must be a request body, an OpenAI Batch line, "
                "or a record for a job file with a [template]",
                field="messages",
            )
        check_body(obj)
        custom_id = obj.pop("custom_id", None)
        return Parsed(obj, custom_id, obj.get("metadata"))

    def parse(self, raw: bytes) -> Parsed:
        try:
            return self._parse(raw)
        except InputError:
            raise
        except Exception as e:
            raise _unforeseen(e) from e

    def request(self, parsed: Parsed, *, custom_id: str, line: int) -> Request:
        try:
            return self._request(parsed, custom_id=custom_id, line=line)
        except InputError:
            raise
        except Exception as e:
            raise _unforeseen(e) from e

    def _parse(self, raw: bytes) -> Parsed:
        obj = jsonl.load_line(raw)
        if not isinstance(obj, dict):
            raise InputError(f"line is {type_name(obj)}, not a JSON object", code="not_object")
        try:
            parsed = self._shape(obj)
        except InputError as e:
            e.custom_id = self._named_id(obj)  # so errors.jsonl ties the bad line to its id
            raise
        if parsed.custom_id is not None:
            custom_id = _as_id(parsed.custom_id)
            if custom_id is None:
                raise InputError(
                    f"custom_id must be a non-empty string, not {quote(parsed.custom_id)}", field="custom_id"
                )
            parsed.custom_id = custom_id
        return parsed

    def _named_id(self, obj: dict[str, Any]) -> str | None:
        """The id a line names, read as leniently as can be: for a line that is bad anyway."""
        named: Any = obj.get("custom_id")
        if self.template is not None:
            try:
                named = self.template.id_of(obj)
            except InputError:
                return None
        return _as_id(named)

    def _request(self, parsed: Parsed, *, custom_id: str, line: int) -> Request:
        body = parsed.body
        images: list[Pending] = []
        if body is None:
            assert parsed.render is not None
            body, images = parsed.render()
        own = body.get("model")
        if own and own != self.default_model:
            self.own_model += 1
        if not own and "model" in body:
            # An empty or null model names none: the job's is sent (sent as it was, while the
            # line counted as the job's model's, a 404 for it said the job's model was gone,
            # and every other line of that model failed unsent).
            body = {key: value for key, value in body.items() if key != "model"}
        if self.defaults:
            body = {**self.defaults, **body}
        model = body.get("model") or self.default_model
        fallbacks = body.get("models")
        if not model and isinstance(fallbacks, list) and fallbacks and isinstance(fallbacks[0], str):
            model = fallbacks[0]  # OpenRouter's fallback list stands in for a model
        elif not model:
            raise InputError(
                'no model: add "model" to the line, or set model in the job file or with --model',
                field="model",
            )
        elif "model" not in body:
            body = {"model": model, **body}
        stream = body.get("stream") is True
        if stream:
            options = body.get("stream_options")
            if not isinstance(options, dict) or "include_usage" not in options:
                # Without it a streamed reply carries no usage, and the run cannot be costed.
                body = {**body, "stream_options": {**(options or {}), "include_usage": True}}
        request = Request(
            custom_id=custom_id,
            line=line,
            payload=jsonl.dumps(body),
            metadata=parsed.metadata,
            model=str(model),
            stream=stream,
        )
        if images:
            request.images = images
        request.prompt_tokens = self.estimator.prompt_tokens(
            body, {image.marker.decode(): image.tokens for image in images} if images else None
        )
        request.max_completion_tokens = max_completion_tokens(body)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        request.bounded = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
        return request


def _unforeseen(error: Exception) -> InputError:
    """What no check above foresaw is still one line's failure, not the end of the run (and
    of every run after it, reading the same line): said as what it is, a bug to report."""
    return InputError(
        f"the reader failed on this line ({type(error).__name__}: {quote(str(error))}); "
        "the run goes on without it; this is a bug in pipeline worth reporting, with the line",
        code="reader_error",
    )


def stable_id(raw: bytes) -> str:
    return "line-" + hashlib.blake2b(raw.strip(), digest_size=8).hexdigest()


def input_failure(
    error: InputError, *, line: int, custom_id: str | None = None, metadata: Any = None
) -> Failure:
    return Failure(
        line=line,
        code=error.code,
        message=error.message,
        custom_id=custom_id,
        metadata=metadata,
        extra={"field": error.field} if error.field else {},
    )


@dataclass(slots=True)
class ReadCounts:
    total: int | None = None  # lines in the file, once counted
    read: int = 0  # lines read so far
    empty: int = 0
    skipped: int = 0  # already in results.jsonl from an earlier run
    elsewhere: int = 0  # another shard's lines (and, but for shard 1, the bad ones)
    finished: bool = False  # the whole file was read


def read_requests(
    path: Path,
    parser: LineParser,
    ledger: Ledger,
    counts: ReadCounts,
    *,
    is_done: Callable[[str], bool] | None = None,
    source: Iterable[tuple[int, bytes | int] | None] | None = None,
    shard: Shard | None = None,
) -> Iterator[Request | Failure | None]:
    """Every line still to do, as a request, and every bad line, as a failure; empty lines
    and ids already done (`is_done`, by default the ledger's) are counted and skipped. Now
    and then a None, so that a long stretch of skipped lines does not hold the loop (and
    when `source`, the lines, has none ready yet)."""
    # Only ids done by earlier runs can come again: an id of this run is never read twice.
    done = is_done or (ledger.is_done if ledger.done_count else None)
    for line in source if source is not None else lines(path, max_bytes=parser.max_line_bytes):
        if line is None:
            yield None
            continue
        number, raw = line
        counts.read = number
        if number % YIELD_EVERY == 0:
            yield None  # a chance for the loop to run other tasks, even when nothing is sent
        if isinstance(raw, int):
            if shard is not None and not shard.reports_bad_lines:
                counts.elsewhere += 1
                continue
            error = InputError(
                f"the line is {raw:,} bytes, over the limit of {parser.max_line_bytes:,}; "
                "shrink it (smaller images?) or raise max_line_bytes in the job file",
                code="line_too_long",
            )
            yield input_failure(error, line=number)
            continue
        if not raw.strip():
            counts.empty += 1
            continue
        custom_id: str | None = None
        parsed: Parsed | None = None
        try:
            try:
                parsed = parser.parse(raw)
            except InputError:
                if shard is not None and not shard.reports_bad_lines:
                    counts.elsewhere += 1
                    continue
                raise
            custom_id = parsed.custom_id
            if custom_id is None:
                derived = stable_id(raw)
                if shard is not None and not shard.owns(derived):
                    counts.elsewhere += 1
                    continue
                custom_id = ledger.see_copy(derived, number)
            else:
                if shard is not None and not shard.owns(custom_id):
                    counts.elsewhere += 1
                    continue
                earlier = ledger.see(custom_id, number)
                if earlier is not None:
                    raise InputError(
                        f"custom_id {quote(custom_id)} is already used on line {earlier}; "
                        "give every line its own custom_id",
                        field="custom_id",
                        code="duplicate_custom_id",
                    )
            if done is not None and done(custom_id):
                counts.skipped += 1
                continue
            yield parser.request(parsed, custom_id=custom_id, line=number)
        except InputError as e:
            metadata = parsed.metadata if parsed is not None else e.metadata
            yield input_failure(e, line=number, custom_id=custom_id or e.custom_id, metadata=metadata)
    counts.finished = True


async def feed(
    path: Path,
    parser: LineParser,
    ledger: Ledger,
    requests: MemoryObjectSendStream[Request],
    failures: MemoryObjectSendStream[Outcome],
    counts: ReadCounts,
    refill: Refill | None = None,
) -> None:
    """Send every line still to do to the workers, and every bad line to the writer.
    Stops early when the receiving side closes (the run stopped dispatching). With `refill`,
    a full request buffer is topped up by halves (see `Refill`)."""
    pipe = PipeLines(lambda: lines(path, max_bytes=parser.max_line_bytes)) if is_pipe(path) else None
    async with requests, failures:
        for item in read_requests(path, parser, ledger, counts, source=pipe, shard=parser.shard):
            if item is None:
                await (pipe.wait() if pipe is not None else anyio.lowlevel.checkpoint())
                continue
            sent = (
                await _send(requests, item, refill)
                if isinstance(item, Request)
                else await _send(failures, item)
            )
            if not sent:
                return


async def _send(stream: MemoryObjectSendStream[Any], item: Any, refill: Refill | None = None) -> bool:
    """False when the other side is gone: the run stopped dispatching."""
    try:
        if refill is not None:
            size = len(item.payload)
            while not refill.fits(size):
                await refill.room(1)  # the buffer holds its bytes' worth: wait for a take
            refill.put(size)
        try:
            stream.send_nowait(item)
        except anyio.WouldBlock:
            if refill is not None:
                await refill.room()  # until half the buffer is taken: room for a batch
            await stream.send(item)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        return False
    return True
