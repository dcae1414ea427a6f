"""One request to one outcome: pace, send (`client`, `sse`), judge (`status`, a 404 in
`notfound`, what a server says about waiting in `waits`, `verdict`, the retry policy in
`retry`), account; `attempts` walks a request through them, `worker` hands it the requests."""
