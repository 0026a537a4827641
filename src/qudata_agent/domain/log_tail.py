"""The end of a container's log, kept within a byte bound however much the tenant wrote.

Pure. A container's log is the tenant's bytes: `tail=N` lines may be N times
16 KiB (Docker splits longer lines), and an answer must never hold that.
`TailBuffer` keeps only the newest `max_bytes` of a stream of chunks, holding
at most `max_bytes` plus one chunk at any time; `text()` makes the one copy
the answer carries. What stays true: the bytes kept are always the newest
ones, and a cut at the front is said (`LogTail.cut`), never hidden.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# What one answer carries of a container's log at most (GET ...?logs=true).
LOG_ANSWER_BYTES = 1024 * 1024
# What the answer of an instance that exited on its own carries of its last lines.
LAST_LOG_BYTES = 64 * 1024
LOG_READ_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LogTail:
    text: str
    cut: bool = False  # older output was dropped to keep within the byte bound
    complete: bool = True  # False: the read stopped at its deadline


class TailBuffer:
    """The newest `max_bytes` bytes of what was added."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self._max = max_bytes
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self.dropped = 0  # bytes dropped from the front so far

    def add(self, chunk: bytes) -> None:
        if len(chunk) >= self._max:  # this chunk alone fills the bound
            self.dropped += self._size + len(chunk) - self._max
            self._chunks.clear()
            chunk = chunk[-self._max :]
            self._size = 0
        self._chunks.append(chunk)
        self._size += len(chunk)
        while self._size - len(self._chunks[0]) >= self._max:
            first = self._chunks.popleft()
            self._size -= len(first)
            self.dropped += len(first)

    def text(self) -> str:
        """The kept bytes (cut to `max_bytes`) as text; invalid UTF-8 is replaced."""
        data = b"".join(self._chunks)
        if len(data) > self._max:
            self.dropped += len(data) - self._max
            data = data[-self._max :]
            self._chunks = deque([data])
            self._size = len(data)
        return data.decode("utf-8", errors="replace")
