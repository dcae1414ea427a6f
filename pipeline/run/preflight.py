"""What must hold before a run sends its first request: room for a connection per request in
flight (open files; the mock's server makes room for its side so too), and an endpoint whose
host answers. Neither speaks HTTP: `pipeline.send.client` does, once these have passed.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import anyio

from pipeline.errors import RunStopped, SettingsError

START_PATIENCE = 30.0  # seconds an endpoint that cannot be reached as a run starts is tried for
FILES_BESIDE = 64  # open files a run needs besides its connections: outputs, ledger, logs


def raise_open_files(concurrency: int | None = None) -> None:
    """Room for a connection per request in flight: raise the soft limit on open files as
    far as needed (or, with no concurrency given, as far as the hard limit allows). Where the
    hard limit is too low, say so now, before anything is sent, not as a crash in flight."""
    try:
        import resource
    except ImportError:  # not on this system (Windows): nothing to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    needed = hard if concurrency is None else concurrency + FILES_BESIDE
    if soft == unlimited or (needed != unlimited and soft >= needed):
        return
    if hard != unlimited and needed > hard:
        assert concurrency is not None
        raise SettingsError(
            f"--concurrency {concurrency:,} needs about {needed:,} open files (a connection each), "
            f"but this system allows {hard:,} (ulimit -Hn); lower --concurrency to "
            f"{max(hard - FILES_BESIDE, 1):,} or less, or raise the limit (nofile in "
            "/etc/security/limits.conf, or LimitNOFILE for a service)"
        )
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    except (ValueError, OSError) as e:
        if concurrency is not None:
            raise SettingsError(
                f"--concurrency {concurrency:,} needs about {needed:,} open files, and raising the "
                f"limit from {soft:,} failed ({e}); lower --concurrency or run `ulimit -n {needed}` first"
            ) from None


async def check_reachable(
    base_url: str,
    *,
    connect_timeout: float = 10.0,
    patience: float = 0.0,
    say: Callable[[str], None] | None = None,
) -> None:
    """Before any job is sent: can the endpoint's host be reached? A name that does not
    resolve stops the run at once; a host that refuses or does not answer is tried again for
    `patience` seconds, since an outage as the run starts is as likely as one a second later,
    which the run waits out (a wrong port costs that long: it is said at once)."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    deadline = time.monotonic() + patience
    pause = 0.5
    while True:
        try:
            with anyio.fail_after(connect_timeout):
                stream = await anyio.connect_tcp(host, port)
                await stream.aclose()
            return
        except (TimeoutError, OSError) as e:
            reason = (
                f"no answer within {connect_timeout:.0f}s"
                if isinstance(e, TimeoutError)
                else e.strerror or str(e) or type(e).__name__
            )
            if isinstance(e, socket.gaierror) or time.monotonic() + pause > deadline:
                tried = (
                    f", tried for {patience:.0f}s"
                    if patience >= 1 and not isinstance(e, socket.gaierror)
                    else ""
                )
                raise RunStopped(
                    f"cannot reach {host}:{port} ({reason}{tried}); check --base-url and the network",
                    code="unreachable",
                ) from None
            if say is not None and pause == 0.5:
                say(
                    f"pipeline: cannot reach {host}:{port} ({reason}); trying again for up to {patience:.0f}s"
                )
        await anyio.sleep(pause)
        pause = min(pause * 2, 5.0)
