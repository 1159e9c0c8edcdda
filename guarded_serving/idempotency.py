"""Client request ids: a retry gets the same answer, a reused id with other rows is a conflict.

A client that sends ``X-Request-ID`` names its request. The rows (and ``on_reject``) are reduced
to a ``fingerprint``, a 63-bit hash of their canonical JSON, which is stored with the request's
entry in the prediction log's index. A request whose id is known:

- with the same fingerprint is a retry: it is answered again, and neither logged nor counted a
  second time (the same body, byte for byte, when this worker still holds it);
- with another fingerprint is a ``ConflictError`` (409): the id belongs to other rows.

``RecentRequests`` is each worker's memory of the client-named requests it answered lately (the
fast path, no store call). Other workers' requests are found in the store; that lookup is
bounded and may fail open (see ``service``). Server-made ids skip all of this.

>>> recent = RecentRequests(max_bytes=1_000)
>>> fp = fingerprint([{"carat": 0.5}], "raise")
>>> recent.check("r1", fp) is None
True
>>> recent.begin("r1", fp); recent.answered("r1", fp, b'{"predictions":[1.0]}')
>>> recent.check("r1", fp).body
b'{"predictions":[1.0]}'
>>> recent.check("r1", fingerprint([{"carat": 0.6}], "raise"))  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
guarded_serving.errors.ConflictError: X-Request-ID 'r1' was already used for other rows...
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .errors import ConflictError, Problem

__all__ = ["Known", "RecentRequests", "fingerprint", "conflict"]

#: Bytes of answers a worker keeps for retries (the newest first); an entry without its answer
#: (evicted, or still being served) costs about 100 bytes.
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
_ENTRY_BYTES = 100


def fingerprint(rows: Any, on_reject: str) -> int:
    """A signed 63-bit hash of the request's rows as canonical JSON (keys sorted) and its
    ``on_reject``: equal for equal requests, whatever the key order or whitespace they came in."""
    text = json.dumps([on_reject, rows], sort_keys=True, separators=(",", ":"), allow_nan=True,
                      ensure_ascii=False, default=str)
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # non-negative: fits a signed BIGINT


def conflict(request_id: str) -> ConflictError:
    """The 409 for an id already used with other rows."""
    return ConflictError(
        f"X-Request-ID {request_id!r} was already used for other rows; a retry must send the "
        "same rows, a new request needs a new id (or none: the server makes one)",
        [Problem(problem="request id already used for other rows", column="X-Request-ID",
                 expected="a new id, or the rows first sent with it", got=request_id)])


@dataclass(frozen=True)
class Known:
    """A request this worker answered or is answering: ``body`` is None while it is in flight
    (or when its answer was evicted to stay within the byte budget)."""

    fingerprint: int
    body: bytes | None


class RecentRequests:
    """The client-named requests a worker answered lately, newest kept, within ``max_bytes``."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Known] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def check(self, request_id: str, fp: int) -> Known | None:
        """The known request of this id (None: not known here); ConflictError if it was other rows."""
        with self._lock:
            known = self._entries.get(request_id)
            if known is not None:
                self._entries.move_to_end(request_id)
        if known is not None and known.fingerprint != fp:
            raise conflict(request_id)
        return known

    def begin(self, request_id: str, fp: int) -> None:
        """Remember a request being answered (a concurrent retry then is not logged twice)."""
        self._put(request_id, Known(fp, None))

    def answered(self, request_id: str, fp: int, body: bytes) -> None:
        """Remember a request's answer, for its retries."""
        self._put(request_id, Known(fp, body))

    def forget(self, request_id: str) -> None:
        """Drop a request that was not answered (a retry may then try again)."""
        with self._lock:
            old = self._entries.pop(request_id, None)
            if old is not None:
                self._bytes -= _size(old)

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, request_id: str, known: Known) -> None:
        with self._lock:
            old = self._entries.pop(request_id, None)
            if old is not None:
                self._bytes -= _size(old)
            self._entries[request_id] = known
            self._bytes += _size(known)
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= _size(gone)


def _size(known: Known) -> int:
    return _ENTRY_BYTES + (len(known.body) if known.body is not None else 0)
