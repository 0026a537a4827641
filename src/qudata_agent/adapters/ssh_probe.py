"""What the agent learns of an instance's sshd from the host side, never by running anything in it.

Owns the two reads the SSH state rests on, both of bytes a tenant controls:
- sshd's banner: one TCP connection from the host (to the published SSH
  port, or to the container's address where nothing is published), at most
  `BANNER_BYTES` read, within a deadline;
- the init's word in the container's run directory (`domain.ssh_init`),
  read through `/proc/<pid>/root` of the container's init.

What stays true:
- nothing is executed in the container and nothing is buffered beyond the
  bounds: a hostile tenant can make these reads say "not ready", never make
  the agent read more than a few hundred bytes;
- the path inside the container is walked one name at a time from the
  container's root, following no symlink (`O_NOFOLLOW`, `O_PATH`), and only a
  regular file is ever opened for reading: a link to /dev/zero, a FIFO or a
  device node is refused without being opened (opening some devices has side
  effects), and no link can lead the read out of the container;
- a read that finds nothing (a runtime whose processes are not the
  container's, such as a sandbox, or a container that just stopped) is
  "no word", never an error.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat

from qudata_agent.domain.ssh_init import BANNER_BYTES, Banner, banner_of

BANNER_TIMEOUT_S = 3.0


async def read_banner(host: str, port: int, timeout_s: float) -> Banner:
    """Connects to `host:port` and reads the first line (at most BANNER_BYTES)."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, limit=BANNER_BYTES)
            try:
                line = await _first_line(reader)
            finally:
                writer.close()
    except TimeoutError:
        return Banner(False, "no answer within the deadline")
    except OSError as e:
        return Banner(False, e.strerror or type(e).__name__)
    return banner_of(line)


async def _first_line(reader: asyncio.StreamReader) -> bytes:
    got = b""
    while len(got) < BANNER_BYTES and b"\n" not in got:
        chunk = await reader.read(BANNER_BYTES - len(got))
        if not chunk:
            break
        got += chunk
    return got.split(b"\n", 1)[0]


class HostSshProbe:
    """The probe the SSH service uses."""

    def __init__(self, timeout_s: float = BANNER_TIMEOUT_S) -> None:
        self._timeout_s = timeout_s

    async def banner(self, host: str, port: int) -> Banner:
        return await read_banner(host, port, self._timeout_s)

    def read_file(self, pid: int, path: str, max_bytes: int) -> bytes | None:
        return read_in_container(pid, path, max_bytes)


def read_in_container(pid: int, path: str, max_bytes: int) -> bytes | None:
    """At most `max_bytes` of the regular file at absolute `path` in the container whose
    init has host pid `pid`; None when there is no such regular file (or no container)."""
    names = [n for n in path.split("/") if n]
    if not names or any(n in (".", "..") for n in names):
        raise ValueError(f"not a plain absolute path: {path!r}")
    try:
        where = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY)
    except OSError:
        return None  # gone, or not ours to read
    try:
        for name in names[:-1]:
            inner = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=where)
            os.close(where)
            where = inner
        return _read_regular(where, names[-1], max_bytes)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.ESRCH):
            return None
        raise
    finally:
        os.close(where)


def _read_regular(parent: int, name: str, max_bytes: int) -> bytes | None:
    handle = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=parent)  # opens no device
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            return None
        # Reopened through the handle, not by name: the very inode just checked.
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    finally:
        os.close(handle)
    try:
        return os.read(fd, max_bytes)
    finally:
        os.close(fd)
