"""Logging setup: structured lines on stderr, where journald picks them up.

Owns the root handlers (stderr, and optionally a file rotated by size), the
JSON line format, the request-id context variable, and the redaction of
secrets. What stays true: once a secret is registered with `redact()`, its
value is replaced by `***` in every line this process writes, on every
handler, whatever logger or library produced it; the log file never grows past
its cap (times the backups kept).
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Record attributes that are not structured fields (uvicorn's color_message is
# its ANSI-coloured duplicate of msg).
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class _Redactor(logging.Filter):
    """Replaces registered secret values in the formatted message and fields."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, value: str) -> None:
        if len(value) >= 4:  # a shorter "secret" would mangle ordinary text
            with self._lock:
                self._secrets = self._secrets | {value}

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = self.scrub(record.getMessage())
            record.msg, record.args = message, None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            line["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return _REDACTOR.scrub(json.dumps(line, default=str, ensure_ascii=False))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return _REDACTOR.scrub(super().format(record))


_REDACTOR = _Redactor()

# syslog priorities (sd-daemon.h): journald reads a "<N>" line prefix as the level.
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    for level in (logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITIES[level]
    return 7


class _JournalPrefix(logging.Formatter):
    """Wraps a formatter: each line starts with its syslog priority, for journald."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self._inner.format(record).splitlines())


def stderr_is_journal(journal_stream: str | None) -> bool:
    """True when stderr is the journald stream systemd named in JOURNAL_STREAM (dev:inode)."""
    if not journal_stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return journal_stream == f"{st.st_dev}:{st.st_ino}"


def redact(secret: str | None) -> None:
    """Registers a secret value so that it never appears in a log line."""
    if secret:
        _REDACTOR.add(secret)


LOG_FILE_BACKUPS = 3  # rotated files kept next to the log file (.1 .. .3)
_file_handler: logging.Handler | None = None


def setup(
    level: str = "INFO",
    fmt: str = "json",
    *,
    file: Path | None = None,
    file_max_bytes: int = 50 * 1024 * 1024,
    journal: bool = False,
) -> None:
    """Routes every log line to stderr and, when `file` is given, to that file too.

    With `journal` (stderr is journald's stream), each stderr line carries its
    syslog priority, so a warning is stored as a warning.

    The file is rotated when it would pass `file_max_bytes`; `LOG_FILE_BACKUPS`
    old ones are kept. Raises OSError when the file cannot be opened.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        handlers.append(
            logging.handlers.RotatingFileHandler(
                file, maxBytes=file_max_bytes, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
            )
        )
    for handler in handlers:
        handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
        handler.addFilter(_REDACTOR)
    if journal:
        handlers[0].setFormatter(
            _JournalPrefix(JsonFormatter() if fmt == "json" else TextFormatter())
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    global _file_handler
    if _file_handler is not None:  # ours from an earlier setup: its file is closed
        _file_handler.close()
    _file_handler = handlers[1] if file is not None else None
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request at INFO; keep that for debugging only.
    logging.getLogger("httpx").setLevel(max(logging.getLevelName(level), logging.WARNING))
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("docker").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
