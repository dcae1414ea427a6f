"""What a 404 means: a model the server does not serve, or a URL that is wrong.

A 404 to POST {base_url}/chat/completions says one of two things, and they are told apart by
what the server says, never by which answer happens to come back first (a 404 comes back in
milliseconds, an answer in seconds):

- **A model it does not serve** (gone, or never there): the 404 says so, in words every
  server of the API uses. OpenRouter: "No endpoints found for old/retired."; OpenAI:
  `model_not_found`, "The model `X` does not exist or you do not have access to it"; vLLM,
  Ollama and others alike. The line fails with what the server said; the model is marked
  gone, and its later lines fail without being sent (`model_not_found`; the next run tries
  them again, as it does any failure); the run goes on. A 404 that names another model than
  the one asked for, or something the model cannot do ("No endpoints found that support tool
  use"), fails its own line only.
- **A URL that is wrong**: the 404 says nothing of a model (an HTML page, "Not Found",
  `{"detail": "Not Found"}`, an empty body). Unless the path is known to be right already (an
  answer came from it, or a 404 spoke of a model), the endpoint is asked, once a run: GET
  {base_url}/models. A list: the path is right, the line fails, and a model the list lacks
  is gone. No list (a wrong path, or a server without one): the other requests decide:
  the line waits until one of them answers (the path is right, and the line fails), or every
  request the workers hold is such a 404 waiting too: then the run stops (exit 3, resumable)
  naming the URL, the models and what the server said. A request that failed for now (a 5xx,
  a reset, an outage's pause, a backoff) is still in hand: it may answer yet, so it does not
  let the run stop (nothing being in flight for a moment did, and one 500 then stopped a run
  whose other model answered a moment later). Only a server that names no model in its 404s,
  has no /models, and is asked for nothing but the gone model at first, is taken for a wrong
  URL; the same command resumes it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any

import anyio

from pipeline.errors import HTTPStatusError, RunStopped
from pipeline.urls import redacted

# Words of a 404 that say the model is not served (matched without case: (?i)). These patterns
# are compiled by `re` at the first 404 (and kept): here, every run paid 4.4 million
# instructions (callgrind) to compile them, and most runs meet no 404.
_GONE = (
    r"(?i)no endpoints found for\b"
    r"|\bmodel\b.{0,200}?(?:does not exist|doesn't exist|not found|not exist|is not available"
    r"|unavailable|no longer|deprecated|decommissioned|retired|not supported|not served)"
    r"|\b(?:unknown|invalid|unsupported|no such)\s+model\b"
)
_GONE_CODE = r"(?i)model.*(?:not_found|not_exist|unavailable)"
_NAMED = r"(?i)`([^`\s]{1,200})`|'([^'\s]{1,200})'|\"([^\"\s]{1,200})\"|no endpoints found for (\S+)"
_NO_ENDPOINTS = "no endpoints found"  # OpenRouter: "...that support tool use", "...matching your data policy"


class Said(Enum):
    GONE = "the model asked for is not served"
    OTHER = "the server speaks of models, of another one or of what this request asks"
    SILENT = "nothing of a model: a page or a path not found"


class Undecided(Exception):
    """The run stopped while a 404 waited to learn whether the URL is wrong: its line stays
    to do."""


def _error_fields(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ""
    return " ".join(str(error.get(key) or "") for key in ("code", "type"))


def read_404(error: HTTPStatusError, model: str) -> Said:
    """What a 404 to a request for `model` says."""
    text = error.message
    names = {next(g for g in m.groups() if g).rstrip(".,;:") for m in re.finditer(_NAMED, text)}
    names_it = bool(model) and (model in names or _mentions(text, model))
    if re.search(_GONE, text) or re.search(_GONE_CODE, _error_fields(error.body)):
        return Said.GONE if names_it or not names else Said.OTHER
    if names_it or _NO_ENDPOINTS in text.lower():
        return Said.OTHER
    return Said.SILENT


def _mentions(text: str, model: str) -> bool:
    return re.search(rf"(?<![\w/.:-]){re.escape(model)}(?![\w/:-])", text) is not None


def _lists(listed: set[str], model: str) -> bool:
    """Whether a model list names `model`, leniently: a variant (`x/y:free`) or a prefix
    (`models/x`) is the same model."""
    base = model.split(":", 1)[0]
    return any(m in (model, base) or m.endswith(f"/{model}") or model.endswith(f"/{m}") for m in listed)


class NotFound:
    """The run's 404s: which models are gone, and whether the URL is right."""

    def __init__(
        self,
        url: str,
        models: Callable[[], Awaitable[list[str] | None]],
        in_hand: Callable[[], int],
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self._models = models  # GET {base_url}/models: the ids listed, or None
        self._in_hand = in_hand  # requests the workers hold, these waiting ones too
        self._say = say
        self.gone: dict[str, str] = {}  # model -> what the server said of it
        self.right = False  # the path is known to be right
        self._asked = False
        self._asking: anyio.Event | None = None
        self._listed: set[str] | None = None
        self._verdict = anyio.Event()  # the path is known right, or wrong, or the run stopped
        self._wrong = False
        self._stopped = False
        self._waiting = 0
        self._silent: dict[str, str] = {}  # models that got a 404 saying nothing -> its message

    def reached(self) -> None:
        """Something answered from the path (a 200, whatever it held): it is right."""
        if not self.right:
            self.right = True
            self._verdict.set()

    def ended(self) -> None:
        """A request ended: with nothing in hand but 404s waiting, a verdict may be due."""
        if self._waiting:
            self._check()

    def wake_all(self) -> None:
        """The run stops: whatever waits for a verdict finds out."""
        self._stopped = True
        self._verdict.set()

    async def judge(self, error: HTTPStatusError, model: str) -> RunStopped | None:
        """A request's final 404: None when its line fails alone (the model marked gone when
        it is), a `RunStopped` when the URL is wrong. Raises `Undecided` if the run stops
        while it waits to know."""
        said = read_404(error, model)
        if model and not _mentions(error.message, model):
            error.message = f"{error.message} (model {model})"  # its line says which
        if said is not Said.SILENT:
            self.reached()  # the server read the request: its path is right
            if said is Said.GONE:
                self._mark(model, error.message)
            return None
        await self._ask()
        if self._listed is not None:
            if self._listed and not _lists(self._listed, model):
                self._mark(model, f"{error.message}, and GET /models does not list it")
            return None
        if self.right:
            return None
        self._silent[model] = error.message
        self._waiting += 1
        try:
            self._check()
            await self._verdict.wait()
        finally:
            self._waiting -= 1
        if self._wrong:
            return self._stop()
        if not self.right:
            raise Undecided
        return None

    async def _ask(self) -> None:
        """GET /models, once a run; the others that need it wait for its answer."""
        if self._asked:
            return
        if self._asking is not None:
            await self._asking.wait()
            return
        self._asking = anyio.Event()
        try:
            listed = await self._models()
        finally:
            self._asked = True
            self._asking.set()
        if listed is not None:
            self._listed = set(listed)
            self.reached()

    def _check(self) -> None:
        if self._asked and not self.right and not self._stopped and self._in_hand() <= self._waiting:
            self._wrong = True
            self._verdict.set()

    def _mark(self, model: str, said: str) -> None:
        if model in self.gone:
            return
        self.gone[model] = said
        if self._say is not None:
            self._say(
                f"pipeline: the server does not serve model {model} ({said}); its lines fail, those "
                "not sent yet without being sent, and the run goes on"
            )

    def _stop(self) -> RunStopped:
        models = ", ".join(sorted(self._silent)[:3]) or "none named"
        last = next(reversed(self._silent.values()), "")
        base = redacted(self.url.removesuffix("/chat/completions"))
        return RunStopped(
            f"every answer so far is HTTP 404 Not Found from POST {redacted(self.url)} (model "
            f"{models}; the last said {last!r}), none naming a model, and GET {base}/models gives "
            "no list: check --base-url (most servers want the path that ends in /v1, without "
            "/chat/completions) and the model name; then run the same command again to resume",
            code="not_found",
        )
