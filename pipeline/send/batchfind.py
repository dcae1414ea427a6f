"""Finding a batch again (`BatchApi.find`, both shapes): after a create whose answer was lost,
or a run killed between making a batch and noting its id. The batches made since a moment
are listed, newest first, a page at a time (`after` the last id of the page before), and one
is picked: by its tag where the provider keeps metadata, by the file made for it, else by
its model and size, never one known to be another's and never a guess between two.

The moment is ours, less a minute of skew, and less how far the provider's clock is behind
ours where its Date header says so: a machine minutes fast (back from sleep) would otherwise
pass its own batch as too old, find none, and pay for it again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from functools import partial
from typing import Any

from pipeline.errors import MalformedResponse, RunStopped
from pipeline.quote import brief
from pipeline.send.batchapi import TAG_KEY, BatchInfo
from pipeline.send.batchhttp import BatchHttp
from pipeline.send.batchwire import info_of

PAGE = 100  # batches a page of a list (OpenAI's most)
SKEW = 60.0  # seconds: a provider's clock may be this far from ours


async def find(
    http: BatchHttp,
    tag: str,
    *,
    since: float,
    model: str | None,
    lines: int | None,
    taken: Collection[str] = (),
    made_of: str | None = None,
) -> BatchInfo | None:
    """The batch made with `tag` (`pick`), among all but those known to be another's."""
    found = pick(
        [obj async for obj in listed(http, since)],
        tag,
        model=model,
        lines=lines,
        taken=http.others(tag).union(taken),
        made_of=made_of,
    )
    return found if found is None else http.noted(found, tag)


async def listed(http: BatchHttp, since: float) -> AsyncIterator[dict[str, Any]]:
    """The batches made since `since` (see the module's text), newest first."""
    after: str | None = None
    read: set[str] = set()
    while True:
        params = {"limit": str(PAGE)} | ({"after": after} if after else {})
        page, behind = await http.retry(partial(_page, http, params))
        oldest = since - behind - SKEW
        data = page.get("data") if isinstance(page, dict) else None
        if not isinstance(data, list):
            raise MalformedResponse("the list of batches is not a list", body=brief(str(page)))
        for obj in data:
            created = obj.get("created_at") if isinstance(obj, dict) else None
            if isinstance(created, int | float) and created < oldest:
                return  # newest first: the rest are older still
            if isinstance(obj, dict):
                yield obj
        last = page.get("last_id") or (data[-1].get("id") if data and isinstance(data[-1], dict) else None)
        if not page.get("has_more") or not isinstance(last, str) or last in read:
            return  # (a page that leads back to one read: the list has ended, as far as it goes)
        read.add(last)
        after = last


async def _page(http: BatchHttp, params: dict[str, str]) -> tuple[Any, float]:
    """A page of the list, and how many seconds the provider's clock is behind ours (0 where
    its Date does not say, or is ahead)."""
    before = http.clock()
    said: list[float] = []
    page = await http.once("GET", "/batches", params=params, collection=True, dated=said)
    # (a Date is whole seconds, and was written after `before`)
    return page, max(0.0, before - said[0] - 1.0) if said else 0.0


CLOSED = frozenset({"cancelling", "cancelled", "failed"})


def pick(
    listed: list[dict[str, Any]],
    tag: str,
    *,
    model: str | None,
    lines: int | None,
    taken: Collection[str] = (),
    made_of: str | None = None,
) -> BatchInfo | None:
    """The batch made with `tag`, among those listed (newest first). Where the provider keeps
    metadata, its tag says. Where it keeps none (OpenRouter's batches have no metadata field),
    a batch is ours when it has the model and the number of requests ours had, was made in
    the time listed, and is none of those `taken` (another batch's: a folder cut into batches
    of the most lines a batch takes makes them alike, one after the other); two such are never
    guessed between (`RunStopped`), and one cancelled or failed is not taken (a person
    cancelled it, or it made nothing). `made_of`: the file uploaded for it (files shape),
    which says it as surely as its tag, kept or not."""
    for obj in listed:
        metadata = obj.get("metadata")
        if isinstance(metadata, dict) and metadata.get(TAG_KEY) == tag:
            return info_of(obj)
        if made_of is not None and obj.get("input_file_id") == made_of:
            return info_of(obj)
    if made_of is not None or any("metadata" in obj for obj in listed) or not listed:
        return None  # no batch of our file, or the provider keeps metadata: no tag, no batch of ours
    if model is None and lines is None:
        raise RunStopped(
            f"cannot tell whether batch {tag} was made: the provider keeps no tag, and neither its "
            "model nor its size was given to look for it",
            code="batch_unknown",
        )
    found = [
        info
        for info in map(info_of, listed)
        if info.status not in CLOSED
        and info.id not in taken
        and (model is None or info.model == model)
        and (lines is None or info.counts.total == lines)
    ]
    if len(found) > 1:
        ids = ", ".join(info.id for info in found)
        raise RunStopped(
            f"batch {tag} may be any of {ids} (the provider keeps no tag; each has model {model} and "
            f"{lines} requests, made since the run tried): cancel those that are not this folder's "
            "with the provider, then run the same command again",
            code="batch_ambiguous",
        )
    return found[0] if found else None
