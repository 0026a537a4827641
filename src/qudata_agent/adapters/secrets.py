"""Files that hold secrets (the agent secret, the API key) and the state dir.

What stays true: a secret file is created with mode 0600 from its first byte
(never chmod-ed after a world-readable moment), replaced atomically (a reader
sees the old value or the new one, never half), and a file found with looser
permissions is tightened and reported. The state directory is 0700.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700


def ensure_private_dir(path: Path) -> None:
    """Creates `path` (and parents) and makes it 0700."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != DIR_MODE:
        os.chmod(path, DIR_MODE)
        log.warning(
            "state directory permissions tightened",
            extra={"path": str(path), "was": oct(mode), "now": oct(DIR_MODE)},
        )


class SecretFile:
    """One secret value in one file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> str | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            os.chmod(self.path, FILE_MODE)
            log.warning(
                "secret file permissions tightened",
                extra={"path": str(self.path), "was": oct(mode), "now": oct(FILE_MODE)},
            )
        value = self.path.read_text(encoding="utf-8").strip()
        return value or None

    def write(self, value: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.write(fd, value.encode("utf-8") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
