"""Running a host tool (iptables, nft, tc, ip, wg) for the adapters that drive one.

One place for what every such call must do: an argument list (never a
shell), a time limit, the output captured as text, and a failure raised as
the calling adapter's own error type with what the tool said, never a
traceback. The adapters keep their own error types so that their callers
can tell a firewall failure from a shaping or tunnel failure.
"""

from __future__ import annotations

import subprocess

from qudata_agent.errors import AgentError

TIMEOUT_S = 20.0
_SAID_MAX = 500  # characters of a tool's complaint kept in the error


def run(
    argv: list[str],
    error: type[AgentError],
    *,
    check: bool = True,
    timeout: float = TIMEOUT_S,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Runs `argv`; raises `error` when it cannot run, or (with `check`) exits non-zero."""
    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise error(f"{argv[0]} could not run: {e}") from e
    if check and done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip())[:_SAID_MAX]
        raise error(f"{' '.join(argv)}: {said}")
    return done
