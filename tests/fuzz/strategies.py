"""Hypothesis strategies for the agent's inputs: well-formed ones built from the grammars,
and hostile text that mixes near-valid pieces with control characters and Unicode."""

from __future__ import annotations

import base64
import struct

from hypothesis import strategies as st

from qudata_agent.domain.ssh_keys import KEY_TYPES

_LOWER_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_NASTY = ["\x00", "\n", "\r", "\t", " ", "\u2028", "\ufeff", "@", ":", "/", "=", "-", ".", "'"]

# Text that is mostly plausible: printable ASCII, the separators the grammars care
# about, a few control characters and some non-ASCII.
hostile_text = st.one_of(
    st.text(max_size=40),
    st.text(
        alphabet=st.sampled_from([*_LOWER_ALNUM, *_NASTY, "A", "Z", "_", "\u00e9"]), max_size=40
    ),
    st.lists(st.sampled_from([*_NASTY, "sha256", "ssh-ed25519", "auto", "22", "1e9"])).map("".join),
)

# -- image references ------------------------------------------------------------

_word = st.text(alphabet=_LOWER_ALNUM, min_size=1, max_size=6)
_separator = st.sampled_from([".", "_", "__", "-", "--"])


@st.composite
def _component(draw: st.DrawFn) -> str:
    parts = [draw(_word)]
    for _ in range(draw(st.integers(0, 2))):
        parts += [draw(_separator), draw(_word)]
    return "".join(parts)


component = _component()
path = st.lists(component, min_size=1, max_size=3).map("/".join)
_label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,6}[A-Za-z0-9])?", fullmatch=True)
host = st.one_of(
    st.just("localhost"),
    st.lists(_label, min_size=2, max_size=3).map(".".join),
).flatmap(
    lambda name: st.one_of(st.just(name), st.integers(1, 65535).map(lambda port: f"{name}:{port}"))
)
tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
digest = st.sampled_from([("sha256", 64), ("sha384", 96), ("sha512", 128)]).flatmap(
    lambda kind: st.text(alphabet="0123456789abcdef", min_size=kind[1], max_size=kind[1]).map(
        lambda hexes: f"{kind[0]}:{hexes}"
    )
)

# -- SSH keys --------------------------------------------------------------------


@st.composite
def ssh_key_line(draw: st.DrawFn) -> tuple[str, str, str, str]:
    """(line, kind, blob, comment) for a key whose blob names its own type."""
    kind = draw(st.sampled_from(sorted(KEY_TYPES)))
    body = draw(st.binary(min_size=0, max_size=80))
    blob = base64.b64encode(struct.pack(">I", len(kind)) + kind.encode() + body).decode()
    comment = draw(
        st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
    )
    spaces = draw(st.sampled_from([" ", "  ", "\t"]))
    line = f"{kind}{spaces}{blob}" + (f" {comment}" if comment else "")
    return line, kind, blob, comment


# -- ports -----------------------------------------------------------------------

port_key = st.one_of(
    st.integers(-5, 70000).map(str),
    st.tuples(st.integers(0, 70000), st.sampled_from(["tcp", "udp", "TCP", "Udp", "sctp", ""])).map(
        lambda kp: f"{kp[0]}/{kp[1]}"
    ),
    hostile_text,
)
port_value = st.one_of(
    st.just("auto"),
    st.just("AUTO"),
    st.integers(-5, 70000),
    st.integers(-5, 70000).map(str),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
    hostile_text,
)

# -- resource values -------------------------------------------------------------

number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.floats(min_value=0, max_value=2000).map(str),
    st.integers(-10, 10**6).map(str),
    st.from_regex(r"\s?[0-9]{0,4}(\.[0-9]{0,3})?([eE][+-]?[0-9]{1,3})?\s?", fullmatch=True),
    hostile_text,
)
