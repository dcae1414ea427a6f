"""What users write by hand: the whole file loaded, the openai SDK (its default retries), a
semaphore and one `asyncio.gather` over every line, the results written at the end."""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path
from typing import Any

import openai
import orjson


def _event(**fields: Any) -> None:
    sys.stderr.write(orjson.dumps(fields).decode() + "\n")
    sys.stderr.flush()


async def _one(client: openai.AsyncOpenAI, slots: asyncio.Semaphore, line: dict[str, Any]) -> dict[str, Any]:
    custom_id = line.pop("custom_id")
    async with slots:
        try:
            response = await client.chat.completions.create(**line)
        except Exception as e:  # what a hand-written script does: note it, move on
            return {"custom_id": custom_id, "error": f"{type(e).__name__}: {e}"}
    return {"custom_id": custom_id, "response": response.model_dump()}


async def send_all(lines: list[dict[str, Any]], base_url: str, concurrency: int) -> list[dict[str, Any]]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=openai.DEFAULT_MAX_RETRIES)
    slots = asyncio.Semaphore(concurrency)
    try:
        return await asyncio.gather(*(_one(client, slots, line) for line in lines))
    finally:
        await client.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.clients.naive")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--base-url", required=True)
    p.add_argument("--concurrency", type=int, default=256)
    args = p.parse_args()
    started = time.perf_counter()
    lines = [orjson.loads(line) for line in args.input.read_bytes().splitlines() if line.strip()]
    _event(
        event="loaded",
        lines=len(lines),
        seconds=round(time.perf_counter() - started, 3),
        maxrss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
    results = asyncio.run(send_all(lines, args.base_url, args.concurrency))
    failed = 0
    with args.output.open("wb") as out:
        for result in results:
            if "error" in result:
                failed += 1
            else:
                out.write(orjson.dumps(result) + b"\n")
    sys.stdout.write(orjson.dumps({"succeeded": len(results) - failed, "failed": failed}).decode() + "\n")


if __name__ == "__main__":
    main()
