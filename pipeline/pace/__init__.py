"""When a request may start: the pacer and the in-flight window (`local`), and a limit nobody
states, found from the refusals (`finder`, with `sendlog`, `capacity`, `latency`)."""
