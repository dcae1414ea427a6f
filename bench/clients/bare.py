"""The ceiling: one aiohttp session, a semaphore, the file read line by line, each request sent
once and its body read and parsed. No retries, no output file, nothing else."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import orjson


async def _send(
    session: aiohttp.ClientSession, url: str, line: bytes, slots: asyncio.Semaphore, tally: Counter[str]
) -> None:
    try:
        body = orjson.loads(line)
        body.pop("custom_id", None)
        async with session.post(
            url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
        ) as response:
            answer = await response.read()
        if response.status != 200:
            tally[str(response.status)] += 1
        elif "choices" in orjson.loads(answer):
            tally["ok"] += 1
        else:
            tally["bad_200"] += 1
    except (aiohttp.ClientError, orjson.JSONDecodeError, TimeoutError) as e:
        tally[type(e).__name__] += 1
    finally:
        slots.release()


async def send_all(path: Path, base_url: str, concurrency: int) -> Counter[str]:
    url = base_url.rstrip("/") + "/chat/completions"
    tally: Counter[str] = Counter()
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
        with path.open("rb") as lines:
            for line in lines:
                if not line.strip():
                    continue
                await slots.acquire()
                tg.create_task(_send(session, url, line, slots, tally))
    return tally


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.clients.bare")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--base-url", required=True)
    p.add_argument("--concurrency", type=int, default=256)
    args = p.parse_args()
    try:
        import uvloop  # pipeline runs on uvloop when it is installed; so does its ceiling

        tally = uvloop.run(send_all(args.input, args.base_url, args.concurrency))
    except ImportError:
        tally = asyncio.run(send_all(args.input, args.base_url, args.concurrency))
    ok = tally.pop("ok", 0)
    sys.stdout.write(orjson.dumps({"succeeded": ok, "failed": dict(tally)}).decode() + "\n")


if __name__ == "__main__":
    main()
