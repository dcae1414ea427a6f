"""When a request may start, and what its answer teaches.

    worker ── gate.enter(tokens, model) ─────────────────────────────── the request's scopes:
                │   its model's scope (where it has one) ─┐             scopes.Scope = a pace,
                │   the window (in flight: the account's) │ each: Pacer  its finder, its token
                │   the account's scope ──────────────────┘  (pacer)    count; Scopes: which
                ▼                                               │        one a refusal is
    slot.go / answered / failed ── each scope's tokens, finder  │
                                                                ▼
                                          budget: LocalBudget (this process: GCRA clocks)
                                               or LeasedBudget (leased) ── StoreLink (link)
                                                                       ── AccountStore (store):
                                                                          Redis (store.lua) or
                                                                          a Ray actor (actor,
                                                                          AccountPace: account)

A scope's rate finder (`finder`) reads a limit nobody states from the refusals in its send order
(`sendlog`, `capacity`, `rhythm`, `probe`; `answers` sizes the window), or takes the
one a server states (`stated`); the account's also judges an endpoint down (`outage`) and a
server that lets nothing through (`outage.GiveUp`). `tokens`: how a server counts a token limit. A
shared pace reads the account's limit from every process's log (`reading`, `accountlog`) and
spends leased tokens (`lease`).
"""
