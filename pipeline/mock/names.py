"""The choices the mock's flags name, apart from the modules that act on them: the command
line's parser lists them, and importing the mock's limits for that cost every run's start-up
8 million instructions."""

from __future__ import annotations

WAYS = ("exact", "seconds", "ms", "message", "none")  # how a refusal says its wait (`admission`)
STYLES = ("second", "minute", "bucket")  # how a limit counts over time (`limits`)
BATCH_APIS = ("files", "inline", "none")  # the batch API served (`batchroutes`)
COUNTS = ("usage", "arrival")  # how a token limit counts a request (see `limits`)
Change = tuple[str, float, float]  # the model ("" for the account), seconds after the first request, rpm
