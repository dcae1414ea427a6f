"""Lines that share a long prefix sent close together, so that the provider's prompt cache
holds it for all but the first (issue 23, point 3).

A provider caches a prompt's prefix once a request has been processed with it, keeps a few per
machine for some minutes, and reads it for a later request that starts with it. Lines in input
order over 50 system prompts of 2,000 tokens find theirs cached 16 % of the time; sent grouped,
one at a time, 98 %. But lines of a new prefix sent at once all miss it (32 at once: 58 %). So,
between the reader and the workers, by the key of each line's prefix (`input.prefix`):

- A key's first line goes at once (a line alone, or the leader of those to come). Lines of its
  key read while it is in flight are held, and go once its answer is in (any outcome). A
  failed leader has the next held line lead in its stead, up to `FAILING` leaders failed in a
  row: then its lines fail alike, a 400 each, and go as they would have, not one at a time.
  So does a leader answered from the answer cache: never sent, it warmed no prompt cache.
- Keys take turns at sending their held lines, at most `most_open` at a time (so that the few
  prefixes a provider keeps are not pushed out by others between a leader's answer and its
  followers' arrival): a key whose leader answered while that many have a turn waits for one,
  oldest first, and then leads again with one line alone (its prefix may be gone by then),
  unless a line of it was among the last `most_open` answered. Up to `most_open_idle` keys
  have a turn where the lines to take run short: fewer than the workers take in a leader's
  round trip (`ahead`, the pool's size), counting those the leaders in flight will release,
  the next key leads now (`_look_ahead`), so that its turn is ready when they are taken; and
  with workers about to wait for lack of lines (`more`). A
  turn's lines read later go at once too, up to `per_turn` lines a turn, so that no key keeps
  a turn for ever. A turn ends once every line it released is in a worker's hands (not
  answered: the next key's leader overlaps the followers' round trip, so the pool never waits
  for one turn's answers before the next turn starts).
- Where answers take long (leaders answered in half a second or more, as real models
  answer), a worker never waits while lines are held: one about to wait for lack of lines takes
  a held line all the same (`more`: a turn, else `_spill`), and a line read while one waits goes
  to it. Such a line may find its prefix cold, as in input order: grouping adds cached tokens,
  never wall time (bench prefix, answers in 1 s: 42 % to 45 % cached where 14 % to 15 %, as
  fast; with workers left to wait for leaders, 78 % but 1.16x to 1.25x input order's wall).
  Where leaders answer sooner, none has been out longer, and fewer than an eighth of the pool
  wait, a worker waits for a leader rather than send a line cold (`run.patience`): each line sent
  cold writes its prefix in one of the provider's few places, pushing out the prefix of a turn
  whose lines are on their way (bench prefix, answers in 20 ms, the client's CPU the
  bottleneck: 89 % to 93 % cached where 67 % to 80 % with spills, median 0.98x input order's
  wall). A worker waits only while a leader is in flight: a turn whose lines are all taken has
  ended, and the next key's begins.
- Lines without a key (no long prefix) never come here: they go as they are read; nor do an
  Anthropic model's lines unmarked (`input.cachemarks`): they write and read no cache.
- The reader holds lines here and reads on, so the read-ahead window is the hold's size
  (`run.hold`: `most` lines, `max_bytes` of payload), not the workers' buffer's; with the hold
  full, it waits for room. At the end of the input it waits here until every held line has gone
  (`drain`). Held lines of a run that stops stay to do: holding only changes the order.

Released lines are handed straight to workers waiting on the buffer, or put into the buffer
while it is empty (`offer`, the buffer's sending side: a worker about to wait may not be
counted as waiting yet); else they go into `ready`, which workers take from before the buffer. Everything here runs in the event loop; only the reader's `room` and `drain` await.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from pipeline.job import Request
from pipeline.run.hold import Hold
from pipeline.run.patience import Patience

# Turns at a time: the mock keeps 8 prefixes a model, and a provider's machine a few; the keys
# whose lines are in flight touch theirs too (bench prefix, answers in 1 s: with up to 6 turns
# at once, 78 % of the prompt tokens were cached; 10, 49 %; 16, 16 %, as in input order).
MOST_OPEN = 3
# Turns at a time at most, where lines to take run short or workers would wait for lack of them
# (bench prefix, answers in 20 ms, WARM 2: 86 % to 90 % cached; with 5, 70 % and 84 %).
MOST_OPEN_IDLE = 4
PER_TURN = 256
# Prefixes a provider likely still holds: those of the keys answered last. A worker that would
# wait takes a held line of one of them first (`_spill`). Far fewer than the mock keeps (8 a
# model): the keys with a turn touch theirs too, and each other key's line sent pushes one out
# (bench prefix, answers in 20 ms: WARM 2, 86 % to 90 % cached; 4, 76 % to 86 %; 8, 70 % to 78 %).
WARM = 2
HOLD = 4096  # lines held at most (or 16 a worker, where more)
# Leaders of a key failed in a row after which its lines go without one: a key whose every line
# fails (a parameter its model refuses) was sent one line at a time, 100 lines at 20 ms in 3.6 s
# with 8 workers.
FAILING = 2


class _Key:
    __slots__ = ("failed", "held", "lead_at", "leader", "open", "out", "queued", "sent")

    def __init__(self) -> None:
        self.held: deque[Request] = deque()
        self.leader: Request | None = None  # in flight alone; the held wait for its answer
        self.open = False  # has a turn
        self.out = 0  # lines sent and not yet done
        self.queued = 0  # lines released into `ready`, not yet taken
        self.sent = 0  # lines sent in this turn
        self.failed = 0  # its leaders failed in a row
        self.lead_at = 0.0  # when its leader went (the grouping's clock)


class Grouping:
    def __init__(
        self,
        *,
        most: int,
        max_bytes: int,
        most_open: int = MOST_OPEN,
        most_open_idle: int = MOST_OPEN_IDLE,
        per_turn: int = PER_TURN,
        ahead: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hold = Hold(most, max_bytes)
        # Lines the workers take in a leader's round trip, about: the pool's size (each request
        # in flight is answered within one, and its worker takes the next line). 0: none looked
        # ahead for.
        self.ahead = ahead
        self.most_open, self.most_open_idle, self.per_turn = most_open, most_open_idle, per_turn
        self.held = 0  # lines held here
        self.ready: deque[Request] = deque()  # released, for the next worker to take
        # Hands a released request to a worker waiting for one; False where none waits.
        self.offer: Callable[[Request], bool] = lambda _: False
        self.idle: Callable[[], int] = lambda: 0  # workers waiting on the buffer
        self._keys: dict[str, _Key] = {}
        self._open = 0  # keys with a turn
        self._waiting: OrderedDict[str, _Key] = OrderedDict()  # keys with lines held, no turn
        # The keys answered last, most recent last: one of them is most likely still cached,
        # and its turn needs no leader.
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._warm: OrderedDict[str, None] = OrderedDict()  # the last `WARM` keys answered
        self._leading: dict[str, _Key] = {}  # keys whose leader is in flight
        self.clock = clock
        self.patience = Patience(clock)

    def add(self, request: Request) -> None:
        """The reader's, for a request with a prefix key: it goes now, or is held."""
        key = request.prefix
        assert key is not None
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key()
            state.leader = request
            state.out = 1
            state.lead_at = self.clock()
            self._leading[key] = state
            self._send(request, state)  # (in input order, as a line alone would go)
            return
        if state.open and state.leader is None and not state.held and state.sent < self.per_turn:
            state.out += 1
            state.sent += 1
            self._send(request, state)
            return
        if not self.patient and self.offer(request):  # (held, it would cost a worker time)
            state.out += 1
            return
        state.held.append(request)
        self.held += 1
        self.hold.put(len(request.payload))
        if state.leader is None and not state.open and key not in self._waiting:
            self._waiting[key] = state
            self._start()

    def take(self) -> Request:
        """A worker's: the next released request."""
        request = self.ready.popleft()
        self.hold.left(len(request.payload))
        key = request.prefix
        state = self._keys.get(key) if key is not None else None
        if state is not None:
            if request is state.leader:  # (its round trip from now: not its wait in `ready`)
                state.lead_at = self.clock()
            state.queued -= 1
            if not state.queued and state.open and state.leader is None:
                self._end_turn(request.prefix, state)
        if self._waiting and self._open < self.most_open_idle and len(self.ready) < self.ahead:
            self._look_ahead()
        return request

    def _look_ahead(self) -> None:
        """The lines to take run short: the next waiting keys' turns begin now (their leaders
        first in line), while the workers still have a leader's round trip's worth of lines
        (those released, and those the leaders in flight will release), so that a turn is
        ready when these are taken rather than the workers waiting for its leader, or taking
        lines held behind it, cold (bench prefix, answers in 20 ms, WARM 4: 76 % to 87 % of the
        prompt tokens cached where 76 % to 80 % without, spilling a third fewer lines cold)."""
        per_turn = self.per_turn
        while self._waiting and self._open < self.most_open_idle:
            coming = sum(min(len(state.held), per_turn) for state in self._leading.values())
            if len(self.ready) + coming >= self.ahead:
                return
            self._turn()

    def done(self, request: Request, *, failed: bool, reused: bool = False) -> None:
        """A worker's, once a request with a prefix key has its outcome (or was abandoned);
        `reused`: its answer came from the answer cache (or an identical request's), so that it
        was never sent and warmed no prompt cache."""
        key = request.prefix
        state = self._keys.get(key) if key is not None else None
        if key is None or state is None:
            return
        state.out -= 1
        if not reused:  # (a reused answer was never sent: it warmed no prompt cache)
            recent, warm = self._recent, self._warm
            recent[key] = None
            recent.move_to_end(key)
            if len(recent) > self.most_open:
                recent.popitem(last=False)
            warm[key] = None
            warm.move_to_end(key)
            if len(warm) > WARM:
                warm.popitem(last=False)
        if request is state.leader:
            state.leader = None
            del self._leading[key]
            if not reused:
                state.failed = state.failed + 1 if failed else 0
                self.patience.answered(state.lead_at)
            if state.held and (reused or (failed and state.failed < FAILING)):
                self._lead(key, state)  # the next line leads in its stead
            elif state.open:
                self._release(key, state)
            elif state.held:
                if self._open < self.most_open:
                    self._open += 1
                    state.open, state.sent = True, 1
                    self._release(key, state)
                else:
                    self._waiting[key] = state
        self._forget(key, state)
        # Workers that found nothing to do wait on the buffer: lines held now go to them.
        while self.held and not self.ready and self.idle() and self.more():
            pass

    def _forget(self, key: str, state: _Key) -> None:
        if not state.out and state.leader is None and not state.open and not state.held:
            self._keys.pop(key, None)

    def _release(self, key: str, state: _Key) -> None:
        """A turn's leader answered: its held lines go (up to `per_turn`)."""
        while state.held and state.sent < self.per_turn:
            request = state.held.popleft()
            self._unhold(request)
            state.out += 1
            state.sent += 1
            self._send(request, state)
        if not state.queued:
            self._end_turn(key, state)

    def _end_turn(self, key: str | None, state: _Key) -> None:
        assert key is not None
        state.open = False
        self._open -= 1
        if state.held and key not in self._waiting:
            self._waiting[key] = state  # the lines past its turn wait for the next one
        self._start()
        self._forget(key, state)

    def _start(self) -> None:
        """Give waiting keys a turn, oldest first, while fewer than `most_open` have one."""
        while self._waiting and self._open < self.most_open:
            self._turn()

    def more(self) -> bool:
        """A worker's, about to wait for lack of lines: one more key's turn, up to
        `most_open_idle` at a time, rather than the pool waiting for the turns' leaders (a
        round trip of seconds at real models); whether one began (its leader in `ready`, or
        handed to a waiting worker)."""
        if self._waiting and self._open < self.most_open_idle:
            self._turn()
            return True
        return self._spill()

    @property
    def patient(self) -> bool:
        """Whether a worker waits for a leader's answer rather than send a line cold."""
        return self.patience.waits(idle=self.idle, pool=self.ahead, oldest=self._oldest_lead)

    def _oldest_lead(self) -> float | None:
        oldest = next(iter(self._leading.values()), None)  # (leaders in the order they went)
        return None if oldest is None else oldest.lead_at

    def _spill(self) -> bool:
        """A worker would wait while lines are held: one goes now rather than the worker idle,
        cold at worst (as in input order, never worse), chosen to push out the fewest prefixes
        cached: of a key waiting for a turn among the `WARM` answered last (the latest first:
        its prefix the likeliest still cached), else of a key whose leader is in flight (its
        prefix is being written), else of the key waiting that was answered last. None while
        `patient`: the worker waits for a leader's answer."""
        if not self.held or self.ready or self.patient:  # (lines in `ready`: no worker need wait)
            return False
        waiting = self._waiting
        key = next((k for k in reversed(self._warm) if k in waiting), None)
        state = None if key is None else waiting[key]
        if state is None:
            state = next((state for state in self._leading.values() if state.held), None)
        if state is None and waiting:
            key = next(reversed(waiting))
            state = waiting[key]
        if state is None:  # (a turn's lines past `per_turn`, its last ones not yet taken)
            state = next((state for state in self._keys.values() if state.held), None)
            if state is None:
                return False
        if key is not None and len(state.held) == 1:
            del waiting[key]  # (a key waits while it has lines held)
        request = state.held.popleft()
        self._unhold(request)
        state.out += 1
        self._send(request, state)
        return True

    def _turn(self) -> None:
        """The oldest waiting key's turn: its first held line leads, alone, unless one of
        its lines was among the last answered (or its leaders keep failing)."""
        key, state = self._waiting.popitem(last=False)
        self._open += 1
        state.open, state.sent = True, 0
        if key in self._recent or state.failed >= FAILING:
            self._release(key, state)
        else:
            self._lead(key, state)

    def _lead(self, key: str, state: _Key) -> None:
        request = state.leader = state.held.popleft()
        state.lead_at = self.clock()
        self._leading[key] = state
        self._unhold(request)
        state.out += 1
        state.sent += 1
        self._send(request, state, lead=True)

    def _unhold(self, request: Request) -> None:
        self.held -= 1
        self.hold.left(len(request.payload))

    def _send(self, request: Request, state: _Key, *, lead: bool = False) -> None:
        """To a worker waiting, or into `ready`: a turn's leader first in line, since its key's
        other lines wait for its answer (and the pool, at the start of a turn, with them)."""
        if self.offer(request):
            return
        if lead:
            self.ready.appendleft(request)
        else:
            self.ready.append(request)
        self.hold.put(len(request.payload))
        state.queued += 1

    def full(self, size: int) -> bool:
        """Whether a line of `size` payload bytes finds the hold full."""
        return self.hold.full(size)

    async def room(self, size: int) -> None:
        """The reader's, before it adds a line: wait while the hold is full (or the run stops)."""
        await self.hold.room(size)

    async def drain(self) -> None:
        """The reader's, at the end of the input: wait until nothing is held (or the run stops)."""
        await self.hold.drain(self._empty)

    def _empty(self) -> bool:
        return not self.held

    def stop(self) -> None:
        """The run stopped dispatching: what is held stays to do."""
        self.hold.stop()
