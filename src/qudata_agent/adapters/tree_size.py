"""The disk space a directory tree takes: for the anonymous volumes of an image's VOLUME paths.

Owns `tree_bytes`, the bounded walk the storage watch makes over a host
directory whose contents a tenant controls.

What stays true:
- symbolic links are never followed and the walk never leaves the
  filesystem it started on, so a tenant's link to `/` or a mount inside the
  volume counts as nothing;
- the walk stops after `max_entries` entries or `budget_s` seconds, whichever
  comes first, and then says it is partial: the figure is a lower bound, never
  a stall of the watch (a tenant's million empty files cost it a bounded time);
- space is counted in allocated blocks (what the disk really lost), each
  inode once (hard links).
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

DEFAULT_MAX_ENTRIES = 1_000_000
DEFAULT_BUDGET_S = 10.0


@dataclass(frozen=True)
class TreeSize:
    bytes: int
    complete: bool  # False: the walk hit its bound, `bytes` is a lower bound


def tree_bytes(
    root: str, budget_s: float = DEFAULT_BUDGET_S, max_entries: int = DEFAULT_MAX_ENTRIES
) -> TreeSize:
    """Blocks allocated under `root` (0 when it is missing), within the walk's bounds."""
    deadline = time.monotonic() + budget_s
    try:
        top = os.lstat(root)
    except OSError:
        return TreeSize(0, True)
    if not stat.S_ISDIR(top.st_mode):
        return TreeSize(0, True)
    total, entries, seen = 0, 0, set()
    pending = [root]
    while pending:
        path = pending.pop()
        try:
            with os.scandir(path) as listing:
                for entry in listing:
                    entries += 1
                    if entries > max_entries or time.monotonic() > deadline:
                        return TreeSize(total, False)
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed meanwhile
                    if info.st_dev != top.st_dev or (info.st_ino in seen):
                        continue
                    seen.add(info.st_ino)
                    total += info.st_blocks * 512
                    if stat.S_ISDIR(info.st_mode):
                        pending.append(entry.path)
        except OSError:
            continue  # a directory removed or unreadable meanwhile
    return TreeSize(total, True)
