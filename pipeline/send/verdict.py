"""Structured replies checked against the job's JSON schema, and counted.

    [request.response_format]            # what the model is asked for
    type = "json_schema"
    json_schema = { name = "verdict", schema = { ... } }

    [verdict]
    field = "flagged"                    # the report counts verdicts by this field's value
    max_attempts = 3                     # answers that break the schema, at most, per request

A reply is a verdict when its content parses as JSON and validates against the schema
(`[verdict] schema`, else the one in `response_format`). A valid one is stored on the result
line, parsed, beside the raw body. An invalid one was still paid for: it is an
`InvalidOutput`, retried until `max_attempts` such answers, then written to errors.jsonl
with its raw text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from pipeline.errors import InvalidOutput, SettingsError

if TYPE_CHECKING:  # jsonschema takes 30 ms to import: only jobs with a [verdict] pay for it
    from jsonschema import Draft202012Validator

_KEYS = ("field", "max_attempts", "schema")


class Verdict(NamedTuple):  # (as a frozen dataclass, 2.7 million instructions more of every start)
    validator: Draft202012Validator
    field: str | None
    max_attempts: int

    def check(self, body: Mapping[str, Any]) -> Any:
        """The parsed verdict (a list of them when the reply has several choices)."""
        verdicts = [self._one(choice) for choice in body.get("choices") or ()]
        return verdicts[0] if len(verdicts) == 1 else verdicts

    def _one(self, choice: Any) -> Any:
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str) or not content.strip():
            raise InvalidOutput("the reply has no content to read a verdict from", status=200, body=choice)
        try:
            value = orjson.loads(_unfenced(content))
        except orjson.JSONDecodeError as e:
            raise InvalidOutput(f"the reply is not JSON ({e.msg}): {content[:200]!r}", status=200) from None
        from jsonschema.exceptions import best_match

        error = best_match(self.validator.iter_errors(value))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "the top level"
            raise InvalidOutput(
                f"the reply breaks the verdict schema at {where}: {error.message}", status=200
            )
        return value

    def label(self, verdict: Any) -> str | None:
        """How the report counts a verdict: "flagged: true"."""
        if self.field is None or not isinstance(verdict, dict):
            return None
        value = verdict.get(self.field)
        shown = orjson.dumps(value).decode() if not isinstance(value, str) else value
        return f"{self.field}: {shown}"


def _unfenced(text: str) -> str:
    """Models sometimes wrap JSON in a ``` fence even when asked not to."""
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return text


def compile_verdict(raw: Mapping[str, Any], request: Mapping[str, Any], *, where: str) -> Verdict:
    for key in raw:
        if key not in _KEYS:
            raise SettingsError(f"{where}: unknown key '{key}' in [verdict]; known: {', '.join(_KEYS)}")
    schema = raw.get("schema")
    if schema is None:
        fmt = request.get("response_format")
        if isinstance(fmt, Mapping) and isinstance(fmt.get("json_schema"), Mapping):
            schema = fmt["json_schema"].get("schema")
    if not isinstance(schema, Mapping):
        raise SettingsError(
            f"{where}: [verdict] needs a JSON schema: set [request.response_format] with "
            'type = "json_schema" and json_schema.schema, or [verdict] schema'
        )
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise SettingsError(f"{where}: the verdict schema is not a valid JSON schema: {e.message}") from None
    field = raw.get("field")
    if field is not None and not isinstance(field, str):
        raise SettingsError(f'{where}: [verdict] field must be the name of a field, such as "flagged"')
    attempts = raw.get("max_attempts", 3)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise SettingsError(f"{where}: [verdict] max_attempts must be a whole number above 0")
    return Verdict(Draft202012Validator(dict(schema)), field, attempts)
