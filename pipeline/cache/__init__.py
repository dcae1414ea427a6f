"""The answer cache (issue 23, point 2): an answer kept under the key of the exact request
that bought it, so that a later run, into any folder, takes it instead of paying again.

    key        `request_key`: the request as sent, in a canonical form, hashed
    store      `AnswerCache`: the answers in SQLite at DIR/answers.sqlite, shared by
               processes, bounded, oldest first out; never fails a run
    evict      the store kept under its bound, the least recently used out first
    pack       an answer's body as kept on disk (deflate, a preset dictionary)
    broken     the one warning line of a cache that cannot be used, and what to do
    inflight   `Inflight`: within one run, identical requests in flight at once sent once
"""
