"""A result file's lines, downloaded: streamed (never held whole), each line whole and given
once, however often the connection is cut. After a cut the file is asked for again from the
end of the last whole line: with a Range where the server honours it (206), else read past
to there; the retry policy's backoff between tries, and a download that gets no new line in
CUTS tries in a row is given up. A last line that no newline ends and that is not whole
JSON is a cut too (a body that ends where the connection closes says nothing else). A line
over the bound (the input's, max_line_bytes) is read past, never held, and comes as an
error line for its id (`batchwire.too_long_line`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

import aiohttp
import orjson

from pipeline.errors import RequestError, RequestTimeout
from pipeline.send.batchhttp import LONG, BatchHttp, dropped
from pipeline.send.batchwire import LineSplitter, too_long_line

CHUNK = 1 << 16
CUTS = 8  # downloads cut this many times in a row with no new line in between: given up


async def lines(http: BatchHttp, path: str, *, max_line: int) -> AsyncIterator[bytes]:
    """The lines of the file at `path` (see the module's text)."""
    done = 0  # bytes of the file through the last whole line given
    cuts = 0
    failed: RequestError | None = None
    while True:
        resp, skip = await http.retry(partial(_open, http, path, done), failed=failed)
        if resp is None:
            return  # (416: the cut came after the last byte)
        before = done
        split = LineSplitter(max_line)
        try:
            async for chunk in resp.content.iter_chunked(CHUNK):
                if skip:
                    chunk, skip = chunk[skip:], max(0, skip - len(chunk))
                for line, size, head in split.feed(chunk):
                    done += size
                    out = line.strip() if line is not None else too_long_line(head, size, max_line)
                    if out:
                        yield out
            for line, size, head in split.end():
                if line is not None and not _whole(line):
                    # A body that ends where the connection closed (no length said) ends
                    # mid-line when cut: the rest is asked for, as after any other cut.
                    raise aiohttp.ClientPayloadError("the download ended in the middle of a line")
                done += size
                out = line.strip() if line is not None else too_long_line(head, size, max_line)
                if out:
                    yield out
            return
        except aiohttp.ClientError as e:
            failed = dropped(e)
        except TimeoutError:
            failed = RequestTimeout(f"the download of {path} stalled")
        finally:
            resp.close()
        cuts = 0 if done > before else cuts + 1
        if cuts >= CUTS and failed is not None:
            raise failed  # (each try got nothing more: the retry policy's waits were spent)


def _whole(line: bytes) -> bool:
    """Whether the file's last line, which no newline ends, is whole."""
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return not line.strip()
    return True


async def _open(http: BatchHttp, path: str, start: int) -> tuple[aiohttp.ClientResponse | None, int]:
    """The download from byte `start`, and how many bytes of it to read past (all of
    `start` where the server sent the whole file again)."""
    # identity: a Range counts the bytes sent, and gzip would make those other bytes
    headers = {"Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        resp = await http.session.get(http.base_url + path, headers=headers, timeout=LONG)
    except aiohttp.ClientError as e:
        raise dropped(e) from None
    except TimeoutError:
        raise RequestTimeout(f"no answer to GET {path} within the timeout") from None
    if resp.status == 416 and start:
        resp.close()
        return None, 0
    if resp.status >= 300:
        try:
            raw = await resp.read()
        except aiohttp.ClientError as e:
            raise dropped(e) from None
        finally:
            resp.close()
        raise http.error(resp, raw, path)
    return resp, 0 if resp.status == 206 else start
