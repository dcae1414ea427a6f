"""One input line into a request, or the `InputError` that says what is wrong with it.

Three line shapes are accepted (DESIGN.md): an OpenAI Batch API line, a bare request body,
or, when the job has a `[template]`, a record rendered through it. Every body parameter is
passed on untouched, unknown ones too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError
from pipeline.input import jsonl
from pipeline.input.body import check_body, type_name
from pipeline.input.prefix import MIN_TOKENS, group_key
from pipeline.input.tokens import BODY_TEXT, Pieces, TokenEstimator, completion_bound
from pipeline.input.usual import BATCH_URL, read_usual
from pipeline.job import Request
from pipeline.prices import anthropic
from pipeline.quote import quote
from pipeline.settings import Settings

if TYPE_CHECKING:
    # Only a job with a template reads records and local images: imported when one does.
    from pipeline.input.images import Pending
    from pipeline.input.template import Template


class Parsed:
    """A line turned into a body, before ids are checked against the run's ledger. (A plain
    class: a slots dataclass cost half a millisecond of every run's start to build.)"""

    __slots__ = ("body", "custom_id", "metadata", "pieces", "render")

    def __init__(
        self,
        body: dict[str, Any] | None,  # None until `render` builds it (a record)
        custom_id: str | None,
        metadata: Any,
        render: Callable[[], tuple[dict[str, Any], list[Pending]]] | None = None,
        pieces: Pieces | None = None,  # the token estimate's, where the line's one pass read them
    ) -> None:
        self.body, self.custom_id, self.metadata, self.render = body, custom_id, metadata, render
        self.pieces = pieces


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
            from pipeline.input.template import compile_template

            self.template = compile_template(settings.template, where=str(settings.job_file))
        self.base = settings.input.parent
        # Images must stay under the catalogue's folder: the input's, or the job's image_root.
        self.image_root = self.base
        if self.template is not None and self.template.image_root is not None:
            where = settings.job_file.parent if settings.job_file is not None else Path()
            self.image_root = where / Path(self.template.image_root).expanduser()
        self.max_line_bytes = settings.max_line_bytes
        self.estimator = TokenEstimator(exact=exact_tokens, every=every_token)
        # The pieces a line's one pass read are its body's as sent, but where the job's request
        # adds text the model reads (tools, say).
        self.pieces_hold = BODY_TEXT.isdisjoint(self.defaults)
        self.own_model = 0  # lines that name a model of their own, not the job's
        self.shard = settings.shard
        # Lines that share a long prefix are sent close together (`run.grouping`): the key of
        # each line's prefix, where its prompt is long enough to have one.
        self.prefixes = settings.reorder and settings.tier == "sync"
        self.mark: Callable[..., tuple[dict[str, Any], str | None]] | None = None
        if settings.prompt_cache:  # (only a job with prompt_cache imports the marking)
            from pipeline.input.cachemarks import Marks

            self.mark = Marks().keyed

    def _shape(self, obj: dict[str, Any]) -> Parsed:
        if self.template is not None:
            from pipeline.input.template import Place

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
            usual, value = read_usual(raw) if self.template is None else (None, None)
            if usual is None:
                return self._parse(raw, value)
            # (most lines: read in one pass, and their Parsed made here, one call fewer)
            body, named, metadata, pieces = usual
            custom_id = str(named) if type(named) is int else named  # (as `_as_id` has it)
            return Parsed(body, custom_id, metadata, None, pieces)
        except InputError:
            raise
        except Exception as e:
            raise _unforeseen(e) from e

    def _parse(self, raw: bytes, value: Any = None) -> Parsed:
        obj = jsonl.load_line(raw, value)
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

    def request(self, parsed: Parsed, *, custom_id: str, line: int) -> Request:
        # (one call, where a wrapper called the building: every line comes here)
        try:
            body = parsed.body
            images: list[Pending] | None = None
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
            fallbacks = body.get("models") if not model else None
            if fallbacks and isinstance(fallbacks, list) and isinstance(fallbacks[0], str) and fallbacks[0]:
                model = fallbacks[0]  # OpenRouter's fallback list stands in for a model (one that names one)
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
            prefix = None
            if self.mark is not None:
                # (marking finds the shared prefix, and keys it for the grouping: once)
                body, prefix = self.mark(
                    body,
                    model if type(model) is str else str(model),
                    {p.marker.decode(): (str(p.path), p.tokens) for p in images} if images else None,
                )
            prompt, charged = self.estimator.counts(
                body,
                {image.marker.decode(): image.tokens for image in images} if images else None,
                parsed.pieces if self.pieces_hold else None,
            )
            most, bounded = completion_bound(body)
            if not self.prefixes:
                prefix = None
            elif self.mark is None and max(prompt, charged) >= MIN_TOKENS:
                name = model if type(model) is str else str(model)
                if not anthropic(name):  # (unmarked, its models cache nothing: no use holding it)
                    local = (
                        {im.marker.decode(): (str(im.path), im.tokens) for im in images} if images else None
                    )
                    prefix = group_key(body, name, local)
            # (built in one call, its fields in order: every line comes here)
            return Request(
                custom_id,
                line,
                jsonl.dumps(body),
                parsed.metadata,
                model if type(model) is str else str(model),
                stream,
                prompt,
                charged,
                most,
                bounded,
                images or None,
                prefix,
            )
        except InputError:
            raise
        except Exception as e:
            raise _unforeseen(e) from e


def _unforeseen(error: Exception) -> InputError:
    """What no check above foresaw is still one line's failure, not the end of the run (and
    of every run after it, reading the same line): said as what it is, a bug to report."""
    return InputError(
        f"the reader failed on this line ({type(error).__name__}: {quote(str(error))}); "
        "the run goes on without it; this is a bug in pipeline worth reporting, with the line",
        code="reader_error",
    )
