"""How a value from outside (an input line's, a server's) is shown in a message: short,
whatever it holds, and never failing.

`repr` and `str` fail on what JSON can carry: a list nested a thousand levels deep
(RecursionError), an integer of more than 4,300 digits (ValueError, since Python 3.11); and a
value of megabytes would make a message of megabytes in errors.jsonl and on the terminal.
"""

from __future__ import annotations

import reprlib
from typing import Any

TEXT_LIMIT = 300  # characters of a server's own message kept


class _Short(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxstring = 160
        self.maxlong = 40
        self.maxother = 160
        self.maxdict = self.maxlist = 6

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:  # past what repr may print (and past what anyone reads)
            return f"<a number of about {int(x.bit_length() * 0.30103) + 1:,} digits>"
        return super().repr_int(x, level)


_SHORT = _Short()


def quote(value: Any) -> str:
    """`repr(value)`, cut short: at most a few levels deep and a few hundred characters."""
    return _SHORT.repr(value)


def brief(value: Any, *, limit: int = TEXT_LIMIT) -> str:
    """A message a server wrote, on one line and at most `limit` characters; a value that is
    not a string is quoted."""
    said = value if isinstance(value, str) else quote(value)
    return " ".join(said.split())[:limit]
