"""A page of the endpoint's batches (`BatchApi.page`, both shapes): `GET {base}/batches`,
newest first, `after` the last id of the page before, each batch as `get` would describe it
where the list says as much. A follower of many batches looks at them all in one call.

What a list may leave out, and `get` would say (the batch is then left out of the page, and
looked at alone):
    a batch that failed, without why             taking it in tells a batch failed for its
                                                 lines from one refused for want of room
    files shape: an ended batch without its      OpenAI's list gives whole batch objects; a
      `output_file_id` and `error_file_id`       gateway's may not
OpenRouter's list keeps `finalizing` and `cancelling` as `in_progress`: still running, as
far as following goes.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import MalformedResponse
from pipeline.send.batchapi import BatchInfo, BatchPage
from pipeline.send.batchhttp import BatchHttp
from pipeline.send.batchwire import info_of

PAGE = 100  # batches a page (OpenAI's most)


async def page(http: BatchHttp, after: str | None, *, files: bool) -> BatchPage | None:
    """One page (see the module's text); None where the endpoint lists no batches (a 404 or
    405 on the list, or an answer that is no list): each is then looked at alone."""
    params = {"limit": str(PAGE)} | ({"after": after} if after else {})
    listed = await http.listing("/batches", params)
    if listed is None:
        return None
    data: list[Any] = listed["data"]
    batches: list[BatchInfo] = []
    for obj in data:
        try:
            info = info_of(obj)
        except MalformedResponse:
            continue  # (not a batch: none of ours, as far as this page can tell)
        if _whole(obj, info, files=files):
            batches.append(info)
    last_obj = data[-1] if data and isinstance(data[-1], dict) else {}
    last = listed.get("last_id") or last_obj.get("id")
    more = bool(listed.get("has_more")) and isinstance(last, str) and bool(last) and last != after
    created = last_obj.get("created_at")
    oldest = float(created) if isinstance(created, int | float) and not isinstance(created, bool) else None
    return BatchPage(tuple(batches), last if more else None, oldest)


def _whole(obj: dict[str, Any], info: BatchInfo, *, files: bool) -> bool:
    """Whether the list says of this batch all that taking it in needs (see the module's text)."""
    if not info.ended:
        return True
    if info.status == "failed" and not info.errors:
        return False
    return not files or ("output_file_id" in obj and "error_file_id" in obj)
