"""The last requests sent, in order: when each left and whether the server refused it.

A rate limit shows in send order, not in the order answers arrive: once a server's count is
full, every request sent after is refused until it has room again (a run of refusals), while
answers to earlier ones may come seconds later; and what it let through between two moments
is the requests sent between them it did not refuse. A ring keeps the last `SIZE` requests at
three stores a request: the third, the model each named (its tag), tells one model's limit
from the account's (`scopes`).
"""

from __future__ import annotations

SIZE = 1 << 14  # more than are ever in flight at once, and seconds of history at high rates
MAX_RUN = 64  # a run this long is long enough: no need to look further
REACH = 4096  # requests looked through for one model's run among the others'


class SendLog:
    def __init__(self, size: int = SIZE) -> None:
        self._size = size
        self._mask = size - 1
        self._times = [0.0] * size
        self._refused = bytearray(size)
        self._tags = [0] * size
        self.next = 0  # the number the next request sent gets

    def send(self, now: float, tag: int = 0) -> int:
        seq = self.next
        i = seq & self._mask
        self._times[i] = now
        self._refused[i] = 0
        self._tags[i] = tag
        self.next = seq + 1
        return seq

    def kept(self, seq: int) -> bool:
        return self.oldest <= seq < self.next  # (-1: a request the log never held)

    def sent_at(self, seq: int) -> float:
        return self._times[seq & self._mask]

    def refused(self, seq: int) -> bool:
        return bool(self._refused[seq & self._mask])

    def refuse(self, seq: int) -> None:
        if self.kept(seq):
            self._refused[seq & self._mask] = 1

    def run(self, seq: int) -> tuple[int, int]:
        """The first and last request of the run of refusals `seq` belongs to."""
        refused, mask = self._refused, self._mask
        oldest = self.oldest
        first = seq
        while first > oldest and seq - first < MAX_RUN and refused[(first - 1) & mask]:
            first -= 1
        last = seq
        while last + 1 < self.next and last - seq < MAX_RUN and refused[(last + 1) & mask]:
            last += 1
        return first, last

    def tags(self, first: int, last: int) -> set[int]:
        """The tags of the requests from `first` to `last` (a run of refusals: whose they were)."""
        oldest = self.oldest
        return {self._tags[seq & self._mask] for seq in range(max(first, oldest), min(last + 1, self.next))}

    def run_of(self, seq: int, tag: int) -> tuple[int, int, int]:
        """The run of refusals `seq` belongs to among the requests of its tag alone (one
        model's, in the order they left); how many requests of other tags sent among them
        went through; and how many sent from the request of its tag before the run to the one
        after it: a model refused while the others are not."""
        refused, tags, mask = self._refused, self._tags, self._mask
        oldest = self.oldest
        run = 1
        between = around = 0
        for step in (-1, 1):
            among, at = 0, seq + step  # others not refused since the last refusal of the tag
            while oldest <= at < self.next and run < MAX_RUN and abs(at - seq) < REACH:
                i = at & mask
                if tags[i] == tag:
                    if not refused[i]:
                        break
                    run, between, among = run + 1, between + among, 0
                elif not refused[i]:
                    among += 1
                    around += 1
                at += step
        return run, between, around

    def move(self, tag: int, into: SendLog) -> dict[int, int]:
        """The requests of `tag` held, copied in order into `into` (their model's own log from
        now on): their numbers there, by their numbers here."""
        numbers: dict[int, int] = {}
        for seq in range(max(self.next - self._size, 0), self.next):
            i = seq & self._mask
            if self._tags[i] == tag:
                numbers[seq] = into.send(self._times[i])
                if self._refused[i]:
                    into.refuse(numbers[seq])
        return numbers

    @property
    def oldest(self) -> int:
        """The first request still held."""
        return max(self.next - self._size, 0)

    def since(self, at: float, before: int) -> int:
        """The first request up to `before` sent at `at` or later (or the oldest held):
        requests leave in the order of their times."""
        times, mask, seq, oldest = self._times, self._mask, before, self.oldest
        while seq > oldest and times[(seq - 1) & mask] >= at:
            seq -= 1
        return seq

    def accepted(self, first: int, before: int) -> int:
        """Requests from `first` up to `before` (excluded) not refused, of those still held."""
        refused, mask = self._refused, self._mask
        return sum(1 for seq in range(max(first, self.oldest), before) if not refused[seq & mask])
