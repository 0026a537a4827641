"""The bounded walk behind the VOLUME accounting: links not followed, bounds kept."""

from __future__ import annotations

import os
from pathlib import Path

from qudata_agent.adapters.tree_size import tree_bytes


def test_counts_allocated_blocks_once_and_never_follows_links(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    data = tmp_path / "d" / "data"
    data.write_bytes(os.urandom(300_000))
    os.link(data, tmp_path / "d" / "hardlink")  # one inode: counted once
    (tmp_path / "to-root").symlink_to("/")  # a tenant's link to the host's root
    size = tree_bytes(str(tmp_path))
    assert size.complete
    assert 300_000 <= size.bytes < 400_000


def test_a_missing_tree_is_empty(tmp_path: Path) -> None:
    assert tree_bytes(str(tmp_path / "gone")).bytes == 0


def test_the_walk_stops_at_its_bound_and_says_so(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}").write_bytes(b"x" * 5000)
    size = tree_bytes(str(tmp_path), max_entries=10)
    assert not size.complete and size.bytes > 0
    assert tree_bytes(str(tmp_path), budget_s=0).complete is False
