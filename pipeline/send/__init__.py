"""One request to one outcome: pace, send (`client`, `sse`), judge (`status`, `verdict`, the
retry policy in `retry`), account; `worker` walks a request through them."""
