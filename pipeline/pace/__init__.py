"""When a request may start: the pacer and the in-flight window (`local`), a limit nobody
states, found from the refusals (`finder`, with `sendlog`, `capacity`, `latency`), the endpoint
down as a whole (`outage`), and the account's pace shared (`shared`, `lease`, `store`, `actor`)."""
