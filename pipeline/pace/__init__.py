"""When a request may start: the gate (`gate`) routes it to its scopes (`scopes`: the account,
and its model when that has a limit of its own); each scope has a pacer (`local`), a limit
nobody states found from the refusals (`finder`, with `sendlog`, `capacity`, `latency`), and
the account the endpoint down as a whole (`outage`); a pace shared by processes (`shared`,
`lease`, `store`, `actor`)."""
