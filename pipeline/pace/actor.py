"""The account's shared pace in a Ray actor: the store of `pipeline ray` without --shared-limit.

One actor per account, named as the Redis key is (a hash of the endpoint and the key, never
the key), in the namespace "pipeline", so that every shard of every job on the cluster that
uses the account finds the same one. It is made on the driver's node (`home`), the one
node a run cannot lose without stopping (in a RayJob, the head), not on whichever worker a
shard first asked from: workers are the nodes that come and go. It is detached (it outlives
the driver that made it: a driver killed and started again finds the pace where it was) and
restarted by Ray when it dies (`max_restarts=-1`), or made again on another node when its
own is gone, its state new either way: the shards go on alone at their share of the last
pace while it is away (`LeasedBudget`'s rule for a store that went away), then rejoin.
It asks for no CPU: it answers one short call at a time, and those calls being
serial is what makes each one atomic. Importing this module does not import Ray.
"""

from __future__ import annotations

from typing import Any

import anyio

from pipeline.errors import SettingsError
from pipeline.pace.account import AccountPace
from pipeline.pace.store import BOOT_RATE, RUN, WATCH, Ask, Logged, Reply, StoreAway

NAMESPACE = "pipeline"
CALL_TIMEOUT = 2.0  # seconds, as Redis's socket timeout: a call that takes longer is the store away
CHECK_TIMEOUT = 60.0  # seconds the first call waits for the actor to be placed, started or restarted


class PaceActor:
    """The actor's body: an `AccountPace`."""

    def __init__(self) -> None:
        self.pace = AccountPace(boot_rate=BOOT_RATE, watch=WATCH, run=RUN)

    def ping(self) -> bool:
        return True

    def call(self, ask: Ask) -> Reply:
        return self.pace.call(ask)

    def read(self, since: float, until: float) -> Logged:
        return self.pace.read(since, until)


def pace_actor(account: str, home: str | None = None) -> Any:
    """The account's actor: found by name, or made (detached, restarted when it dies), on
    node `home` if given. Pinned hard: Ray's soft affinity placed it on a worker node at
    times, the driver's node alive and able. Should `home` die, the actor cannot be placed
    again there, and is made again anywhere (`ActorStore`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote: Any = ray.remote(PaceActor)
    place = NodeAffinitySchedulingStrategy(home, soft=False) if home else "DEFAULT"
    return remote.options(
        name=account,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
        scheduling_strategy=place,
    ).remote()


class ActorStore:
    """An `AccountStore` that is the account's Ray actor (see the module's text)."""

    def __init__(self, account: str, home: str | None = None) -> None:
        self.account = account
        self.home = home  # the node to make it on: the driver's
        self._actor: Any = None

    async def _handle(self) -> Any:
        if self._actor is None:
            self._actor = await anyio.to_thread.run_sync(pace_actor, self.account, self.home)
        return self._actor

    async def _ask(self, method: str, *args: Any, within: float = CALL_TIMEOUT) -> Any:
        import ray.exceptions

        try:
            with anyio.fail_after(within):
                actor = await self._handle()
                return await getattr(actor, method).remote(*args)
        except TimeoutError:
            raise StoreAway("no answer") from None
        except ray.exceptions.RayError as e:
            if isinstance(e, ray.exceptions.ActorDiedError | ray.exceptions.ActorUnschedulableError):
                # Gone for good (killed, or its node died): made again at the next call,
                # wherever Ray can.
                self._actor, self.home = None, None
            raise StoreAway(type(e).__name__) from None

    async def check(self) -> None:
        """The actor must answer before the run starts; one restarting (its node died, and
        this shard is being run again) is waited for, up to CHECK_TIMEOUT."""
        deadline = anyio.current_time() + CHECK_TIMEOUT
        while True:
            try:
                await self._ask("ping")
                return
            except StoreAway as e:
                if anyio.current_time() > deadline:
                    raise SettingsError(
                        f"the shared pace's Ray actor {self.account} did not answer within "
                        f"{CHECK_TIMEOUT:g}s ({e.reason}); `ray status` shows whether the cluster "
                        "is short of memory"
                    ) from None
                await anyio.sleep(0.5)

    async def call(self, ask: Ask) -> Reply:
        reply: Reply = await self._ask("call", ask)
        return reply

    async def read(self, since: float, until: float) -> Logged:
        logged: Logged = await self._ask("read", since, until)
        return logged

    async def close(self) -> None:
        self._actor = None
