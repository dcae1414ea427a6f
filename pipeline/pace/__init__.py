"""When a request may start, and what its answer teaches.

    worker ── gate.enter(tokens, model)                        pace modules on its way:
                │   its model's Pacer (where it has a scope) ─┐  pacer
                │   the Window (in flight: the account's)     │  window
                │   the account's Pacer ──────────────────────┘  pacer
                ▼
    slot.go ── each scope's RateFinder.sent                      finder
    slot.answered / failed ── each scope's Pacer (its tokens     pacer, finder; a refusal:
                settled as the server counts) and RateFinder     Scopes.refused (scopes)
                                                                 says whose it is
    Pacer.budget: LocalBudget (this process: GCRA clocks)
               or LeasedBudget (leased) ── StoreLink (link) ── AccountStore (store):
                                           Redis (store.lua) or a Ray actor (actor,
                                           AccountPace: account)

A scope's rate finder (`finder`) reads a limit nobody states from the refusals in its send order
(`sendlog`, `capacity`, `probe`; `answers` sizes the window), or takes the one a
server states (`stated`); its `outage` judges one that lets nothing through (the account's, an
endpoint down). A pacer's `tokens`: how a server counts a token limit. A shared pace reads
the account's limit from every process's log (`reading`, `accountlog`) and spends leased
tokens (`lease`).
"""
