"""The generated input (bare request bodies, one a line) and the ids a client got back."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from pipeline.input.tokens import TokenEstimator, max_completion_tokens
from pipeline.mock.limits import charged_tokens

MODEL = "bench/model"
MAX_TOKENS = 64
_WORDS = (
    "harbour",
    "lantern",
    "granite",
    "meadow",
    "copper",
    "violet",
    "orchard",
    "thunder",
    "saddle",
    "pebble",
    "ember",
    "quartz",
    "willow",
    "beacon",
    "canyon",
    "marble",
    "falcon",
    "juniper",
    "velvet",
    "glacier",
    "timber",
    "cobalt",
    "prairie",
    "hollow",
    "summit",
    "cedar",
    "ripple",
    "amber",
    "tundra",
    "compass",
)


def _prompt(rng: random.Random, n: int) -> str:
    words = [f"Describe item {n} in one short paragraph:"]
    size = len(words[0])
    while size < 200:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def custom_id(n: int, width: int) -> str:
    return f"r-{n:0{width}d}"


def input_file(folder: Path, lines: int, *, stream: bool = False) -> Path:
    """`folder/requests-N.jsonl` (`-stream` for streamed answers), written streaming on first
    use and reused after."""
    path = folder / f"requests-{lines}{'-stream' if stream else ''}.jsonl"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rng = random.Random(lines)
    width = max(6, len(str(lines)))
    with tmp.open("wb", buffering=1 << 20) as out:
        for n in range(1, lines + 1):
            body = {
                "custom_id": custom_id(n, width),
                "model": MODEL,
                "messages": [{"role": "user", "content": _prompt(rng, n)}],
                "max_tokens": MAX_TOKENS,
            }
            if stream:
                body["stream"] = True
            out.write(orjson.dumps(body) + b"\n")
    tmp.replace(path)  # only a whole file ever has the final name
    return path


def models_input(folder: Path, counts: tuple[tuple[str, int], ...]) -> Path:
    """`folder/models-....jsonl`: `counts` lines for each model, the models' lines spread evenly
    through the file (a job mixing models as it goes), written on first use and reused after."""
    name = "-".join(f"{model.replace('/', '_').replace(':', '_')}-{n}" for model, n in counts)
    path = folder / f"models-{name}.jsonl"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    # Each line's place in the file: the k-th of a model's n lines at (k + 0.5) / n.
    places = sorted(((k + 0.5) / n, model) for model, n in counts for k in range(n))
    rng = random.Random(len(places))
    width = max(6, len(str(len(places))))
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as out:
        for n, (_, model) in enumerate(places, start=1):
            body = {
                "custom_id": custom_id(n, width),
                "model": model,
                "messages": [{"role": "user", "content": _prompt(rng, n)}],
                "max_tokens": MAX_TOKENS,
            }
            out.write(orjson.dumps(body) + b"\n")
    tmp.replace(path)
    return path


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield orjson.loads(line)


def input_ids(path: Path) -> set[str]:
    return {str(doc["custom_id"]) for doc in _lines(path)}


def _mean(path: Path, tokens: Callable[[dict[str, Any]], float], sample: int) -> float:
    """The mean of `tokens` over the first `sample` requests of the input."""
    total = count = 0.0
    for doc in _lines(path):
        total += tokens(doc)
        count += 1
        if count == sample:
            break
    return total / max(count, 1)


def mean_token_cost(path: Path, sample: int = 2000, *, count_as: str = "usage") -> float:
    """Tokens the mock's --tpm limit counts per request, counted its `count_as` way: what the
    answer uses (prompt + completion), or the prompt and max_tokens on arrival."""
    return _mean(path, lambda doc: charged_tokens(doc, count=count_as), sample)


def mean_reservation(path: Path, sample: int = 2000) -> float:
    """Tokens pipeline reserves of a token limit per request: its prompt estimate (exact, as
    with --tpm) and max_tokens."""
    estimator = TokenEstimator()
    return _mean(path, lambda doc: estimator.prompt_tokens(doc) + max_completion_tokens(doc), sample)


def _completion(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The chat completion in a result line: pipeline's Batch shape or the naive client's."""
    response = doc.get("response")
    if not isinstance(response, dict):
        return None
    body = response.get("body", response)
    return body if isinstance(body, dict) else None


def answered_ids(path: Path) -> tuple[set[str], int]:
    """Ids whose result holds a real completion (a message in a choice), and the count of
    result lines that do not (an error inside a 200 or a malformed body kept as a result)."""
    ids: set[str] = set()
    bad = 0
    if not path.exists():
        return ids, bad
    for doc in _lines(path):
        body = _completion(doc)
        choices = body.get("choices") if body else None
        if (
            isinstance(choices, list)
            and choices
            and isinstance(choices[0], dict)
            and choices[0].get("message")
        ):
            ids.add(str(doc.get("custom_id")))
        else:
            bad += 1
    return ids, bad
