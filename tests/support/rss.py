"""The resident memory of a process, sampled in a thread while a test acts on it."""

from __future__ import annotations

import signal
import threading
import time

import psutil

MB = 1024 * 1024


class RssWatch:
    """Samples `pid`'s RSS every `interval_s`; the peak is `peak`.

    Past `ceiling` bytes the process is killed (SIGKILL) at once: a test that
    finds a leak must not take a shared machine's memory down with it.
    """

    def __init__(self, pid: int, ceiling: int, interval_s: float = 0.02) -> None:
        self._process = psutil.Process(pid)
        self._ceiling = ceiling
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak = self.now()
        self.killed = False
        self._thread = threading.Thread(target=self._run, name=f"rss {pid}", daemon=True)

    def now(self) -> int:
        return int(self._process.memory_info().rss)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.now()
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, rss)
            if rss > self._ceiling and not self.killed:
                self.killed = True
                self._process.send_signal(signal.SIGKILL)
                return
            time.sleep(self._interval_s)
