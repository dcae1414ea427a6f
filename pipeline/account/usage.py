"""Running totals of a run and of every earlier run into the same folder.

Constant memory whatever the input size: counters per model and per status, and latency
histograms with logarithmic buckets (5 % wide, so a percentile is within about 2.5 %).
The whole state round-trips through `state()` / `from_state()`, so it is saved with each
checkpoint and a resumed run adds to it instead of starting over.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pipeline.account.answered import answer_tokens, cache_tokens, reports_usage
from pipeline.account.histogram import Histogram, bucket
from pipeline.account.timeline import Timeline
from pipeline.account.totals import ModelUsage
from pipeline.job import Failure, Success

SLOWEST = 10  # the slowest requests kept, by id
MESSAGES = 5  # the commonest messages kept for each failure code
__all__ = ["Counted", "Histogram", "ModelUsage", "Usage", "answer_tokens", "cache_tokens", "reports_usage"]
# An answer as counted: the model it counts under, the cost the server reported (None: it
# said none), its prompt and completion tokens, and of its prompt those read from the
# provider's prompt cache and written to it (read once, for the books to cost it too).
Counted = tuple[str, float | None, int, int, int, int]


class Usage:
    # A plain class: as a dataclass of 19 fields, it cost every run's start 7 million
    # instructions (callgrind); it is never compared nor shown, and starts empty.
    def __init__(self) -> None:
        self.models: dict[str, ModelUsage] = {}
        self.outcomes: Counter[str] = Counter()  # succeeded / failed / invalid_input
        self.answers: Counter[str] = Counter()  # every attempt: "200", "429", "timeout"
        self.errors: Counter[str] = Counter()  # final failures by code
        self.requested_models: Counter[str] = Counter()  # asked for -> see models
        self.verdicts: Counter[str] = Counter()
        self.attempts = 0
        self.retries = 0
        self.discarded = 0  # answers paid for but not kept (invalid verdicts, empty or broken), in the totals
        self.images = 0  # local images read and sent (each attempt sends the same bytes again)
        self.reused = 0  # results taken from the answer cache, or shared in flight: not paid
        self.reused_cost = 0.0  # the dollars those would have cost (not spent)
        self.reused_unpriced = 0  # of those, whose cost was not known
        self.image_bytes_read = 0  # their size on disk
        self.image_bytes_sent = 0  # their size as sent, before base64
        self.latency = Histogram()
        self.ttft = Histogram()
        self.runs: list[dict[str, Any]] = []
        self.redos: list[dict[str, Any]] = []  # each --redo: what it chose, why, what changed
        self.run_started = time.time()
        self.timeline = Timeline()
        self.slowest: list[tuple[float, str]] = []  # (latency, custom_id), slowest first
        self.messages: dict[str, Counter[str]] = {}  # failure code -> commonest messages

    # -- recording -------------------------------------------------------------------------

    def answer(self, key: str, attempts: int = 1) -> None:
        self.attempts += attempts
        self.answers[key] += attempts

    def add_body(self, body: dict[str, Any], requested: str | None = None) -> Counted:
        """Count a completion's usage; returns it as counted. (Every answer kept comes here:
        `_counts` is written out.)"""
        model = body.get("model")
        name = model if isinstance(model, str) and model else requested or "unknown"
        m = self.models.get(name)
        if m is None:
            m = self.models[name] = ModelUsage()
        m.requests += 1
        choices = body.get("choices")
        if isinstance(choices, list):  # (a body thrown away may hold anything)
            m.choices += len(choices)
        if requested:
            self.requested_models[f"{requested} -> {name}"] += 1
        usage = body.get("usage")
        if not isinstance(usage, dict):
            return name, None, 0, 0, 0, 0
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        total = usage.get("total_tokens")
        # (A body is read from JSON: a whole number in it is an int, never a subclass but
        # bool, and one look at its type tells.)
        prompt = prompt if type(prompt) is int else 0
        completion = completion if type(completion) is int else 0
        total = total if type(total) is int else 0
        m.prompt_tokens += prompt
        m.completion_tokens += completion
        m.total_tokens += total or prompt + completion
        # (`cache_tokens` written out, Anthropic's own names looked for only where they may add)
        details = usage.get("prompt_tokens_details")
        cached = written = 0
        if isinstance(details, dict):
            value = details.get("cached_tokens")
            if type(value) is int and value > 0:
                cached = value
            value = details.get("cache_write_tokens")
            if type(value) is int and value > 0:
                written = value
        if (not written and "cache_creation_input_tokens" in usage) or (
            not cached and "cache_read_input_tokens" in usage
        ):
            cached, written = cache_tokens(usage)
        if cached:
            m.cached_tokens += cached
        if written:
            m.cache_write_tokens += written
        details = usage.get("completion_tokens_details")
        if isinstance(details, dict):
            value = details.get("reasoning_tokens")
            if type(value) is int:
                m.reasoning_tokens += value
        cost = usage.get("cost")
        if type(cost) is float or type(cost) is int:
            m.cost_reported += cost
            m.with_cost += 1
            return name, float(cost), prompt, completion, cached, written
        return name, None, prompt, completion, cached, written

    def add_times(self, successes: Sequence[Success]) -> tuple[list[int], list[int]]:
        """Successes counted, with their attempts and times (one write's, in one loop: each
        latency put in its bucket once); the buckets of their latencies and times to first
        token, for the timeline's histograms."""
        self.outcomes["succeeded"] += len(successes)
        latencies: list[int] = []
        firsts: list[int] = []
        slowest = self.slowest
        last, last_bucket = -1.0, 0  # (a batch's answers share one latency: bucketed once)
        for success in successes:
            if success.attempts > 1:
                self.retries += success.attempts - 1
            reply = success.reply
            latency = reply.latency
            if latency != last:
                last, last_bucket = latency, bucket(latency)
            latencies.append(last_bucket)
            if len(slowest) < SLOWEST or latency > slowest[-1][0]:
                slowest = sorted([*slowest, (latency, success.request.custom_id)], reverse=True)[:SLOWEST]
            if reply.ttft is not None:
                firsts.append(bucket(reply.ttft))
        self.slowest = slowest
        self.latency.count(latencies)
        self.ttft.count(firsts)
        return latencies, firsts

    def add_priced(self, model: str, cost: float) -> None:
        """A result the server did not cost, costed from the job's price table."""
        m = self.models[model]
        m.cost_priced += cost
        m.priced += 1

    def add_cache(self, model: str, saved: float | None, extra: float | None) -> None:
        """What the prompt cache saved on an answer counted under `model` (0.0: it read
        nothing), and what its writes cost above the prompt price (0.0: it wrote nothing), as
        the job's prices tell (None: they cannot)."""
        m = self.models[model]
        if saved is None:
            m.cache_unpriced += 1
        else:
            m.cache_saved += saved
        if extra is None:
            m.cache_write_unpriced += 1
        else:
            m.cache_write_extra += extra

    def add_discarded(self, body: dict[str, Any], requested: str | None) -> Counted:
        """An answer paid for but not kept (a verdict that broke the schema, an empty or broken
        answer that reported usage): its tokens and cost count, though it is no result."""
        self.discarded += 1
        return self.add_body(body, requested)

    def add_failure(self, failure: Failure, message: str) -> None:
        """A failure, with its message as it may be kept (the API key out of it)."""
        self.outcomes["invalid_input" if failure.is_input_error else "failed"] += 1
        self.errors[failure.code] += 1
        messages = self.messages.setdefault(failure.code, Counter())
        message = message[:300]
        if message in messages or len(messages) < MESSAGES * 4:  # bounded: the commonest come early
            messages[message] += 1
        self.retries += max(failure.attempts - 1, 0)

    def add(self, other: Usage, *, label: str) -> None:
        """Add another folder's totals (a shard's, labelled so in the run list)."""
        for name, theirs in other.models.items():
            mine = self.models.setdefault(name, ModelUsage())
            for key, value in theirs.as_dict().items():
                setattr(mine, key, getattr(mine, key) + value)
        for counter in ("outcomes", "answers", "errors", "requested_models", "verdicts"):
            getattr(self, counter).update(getattr(other, counter))
        for total in (
            "attempts",
            "retries",
            "discarded",
            "images",
            "image_bytes_read",
            "image_bytes_sent",
            "reused",
            "reused_cost",
            "reused_unpriced",
        ):
            setattr(self, total, getattr(self, total) + getattr(other, total))
        self.latency.merge(other.latency)
        self.ttft.merge(other.ttft)
        self.runs += [{**run, "shard": label} for run in other.runs]
        self.redos += [{**redo, "shard": label} for redo in other.redos]
        self.timeline.add(other.timeline.state(), label)
        self.slowest = sorted([*self.slowest, *other.slowest], reverse=True)[:SLOWEST]
        for code, counts in other.messages.items():
            self.messages.setdefault(code, Counter()).update(counts)

    # -- reading -----------------------------------------------------------------------------

    def totals(self) -> ModelUsage:
        total = ModelUsage()
        for m in self.models.values():
            for key, value in m.as_dict().items():
                setattr(total, key, getattr(total, key) + value)
        return total

    # -- persistence -------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "models": {k: v.as_dict() for k, v in self.models.items()},
            "outcomes": dict(self.outcomes),
            "answers": dict(self.answers),
            "errors": dict(self.errors),
            "requested_models": dict(self.requested_models),
            "verdicts": dict(self.verdicts),
            "attempts": self.attempts,
            "retries": self.retries,
            "discarded": self.discarded,
            "images": self.images,
            "image_bytes_read": self.image_bytes_read,
            "image_bytes_sent": self.image_bytes_sent,
            "reused": self.reused,
            "reused_cost": self.reused_cost,
            "reused_unpriced": self.reused_unpriced,
            "latency": self.latency.state(),
            "ttft": self.ttft.state(),
            "runs": self.runs,
            **({"redos": self.redos} if self.redos else {}),
            "timeline": self.timeline.state(),
            "slowest": [list(s) for s in self.slowest],
            "messages": {
                code: dict(counts.most_common(MESSAGES * 4)) for code, counts in self.messages.items()
            },
        }

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Usage:
        usage = cls()
        if not state:
            return usage
        usage.models = {k: ModelUsage(**v) for k, v in state.get("models", {}).items()}
        usage.outcomes = Counter(state.get("outcomes", {}))
        usage.answers = Counter(state.get("answers", {}))
        usage.errors = Counter(state.get("errors", {}))
        usage.requested_models = Counter(state.get("requested_models", {}))
        usage.verdicts = Counter(state.get("verdicts", {}))
        usage.attempts = int(state.get("attempts", 0))
        usage.retries = int(state.get("retries", 0))
        usage.discarded = int(state.get("discarded", 0))
        usage.images = int(state.get("images", 0))
        usage.image_bytes_read = int(state.get("image_bytes_read", 0))
        usage.image_bytes_sent = int(state.get("image_bytes_sent", 0))
        usage.reused = int(state.get("reused", 0))
        usage.reused_cost = float(state.get("reused_cost", 0.0))
        usage.reused_unpriced = int(state.get("reused_unpriced", 0))
        usage.latency = Histogram.from_state(state.get("latency"))
        usage.ttft = Histogram.from_state(state.get("ttft"))
        usage.runs = list(state.get("runs", []))
        usage.redos = list(state.get("redos", []))
        usage.timeline = Timeline(list(state.get("timeline", [])))
        usage.slowest = [(float(s), str(i)) for s, i in state.get("slowest", [])]
        usage.messages = {code: Counter(m) for code, m in state.get("messages", {}).items()}
        return usage
