"""The byte-bounded end of a log (pure): the newest bytes, never more than the bound."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qudata_agent.domain.log_tail import TailBuffer


@given(st.lists(st.binary(max_size=300), max_size=50), st.integers(min_value=1, max_value=500))
def test_the_buffer_keeps_exactly_the_newest_bytes(chunks: list[bytes], bound: int) -> None:
    kept = TailBuffer(bound)
    largest = 1
    for chunk in chunks:
        kept.add(chunk)
        largest = max(largest, len(chunk))
        # Never more than the bound plus one chunk is held at any time.
        assert sum(len(c) for c in kept._chunks) < bound + largest
    whole = b"".join(chunks)
    assert kept.text() == whole[-bound:].decode("utf-8", errors="replace")
    assert kept.dropped == max(0, len(whole) - bound)


def test_a_chunk_larger_than_the_bound_keeps_its_end() -> None:
    kept = TailBuffer(4)
    kept.add(b"abc")
    kept.add(b"0123456789")
    assert kept.text() == "6789" and kept.dropped == 9


def test_the_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TailBuffer(0)
