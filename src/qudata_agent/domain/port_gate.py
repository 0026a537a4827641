"""The SSH port gate: a published SSH port answers "refused" until sshd can answer.

Pure: the iptables rules, as data; `adapters.port_gate` applies them.

Why: Docker publishes a port when the container starts, before the container's
network is wired and long before its sshd listens. A client that connects in
that window is accepted (by Docker's userland proxy, on the host's loopback
and own addresses) and then gets nothing: the proxy's dial into the not yet
wired container is lost and resent by TCP a second later, so a blind client
(`ssh` in a loop, VS Code's remote, Ansible) loses its connect timeout. A
client that came straight through DNAT waits out a SYN retransmit alike.

While an instance's sshd does not answer yet, a rule of the agent's answers a
new connection to its published SSH port with a TCP reset at once, so a
client that retries does so at its own cadence and meets sshd as soon as it
listens. The agent learns readiness on the container's own address (never
through the gated port) and removes the rule then, or when it gives up on
sshd, or when the instance goes. What stays true:
- a gate only ever refuses new connections to one host port the agent
  allocated to one of its instances (exclusive on the host); it never
  accepts, drops or touches anything else;
- every rule is named by the agent's id (a comment), so an agent removes its
  own (at start: whatever a crash left) and, on the ports of its own range,
  another id's too (an agent killed and never started again, then
  installed anew with a new id: those ports are this agent's to hand out
  now); a rule of another agent on a port outside that range is left alone;
- one chain, `CHAIN`, reached by one jump from INPUT (the userland proxy's
  listeners), OUTPUT (a client on the host itself, DNAT in OUTPUT) and
  DOCKER-USER (a client from outside, forwarded through DNAT: matched by the
  connection's original destination port).
"""

from __future__ import annotations

CHAIN = "QUDATA-SSH-WAIT"
# Where traffic to a published port passes, whichever way it came.
JUMPS: tuple[str, ...] = ("INPUT", "OUTPUT", "DOCKER-USER")
_COMMENT_PREFIX = "qudata-ssh-wait "


def comment(agent_id: str) -> str:
    return f"{_COMMENT_PREFIX}{agent_id}"


def jump_args() -> tuple[str, ...]:
    return ("-j", CHAIN)


def gate_rule(port: int, agent_id: str) -> tuple[str, ...]:
    """The rule (iptables arguments after the chain) that refuses new connections to `port`."""
    if not 1 <= port <= 65535:
        raise ValueError(f"not a port: {port}")
    return (
        "-p", "tcp",
        "-m", "conntrack", "--ctstate", "NEW", "--ctorigdstport", str(port),
        "-m", "comment", "--comment", comment(agent_id),
        "-j", "REJECT", "--reject-with", "tcp-reset",
    )  # fmt: skip


def own_ports(listing: list[str], agent_id: str) -> list[int]:
    """The ports this agent's rules gate, from `iptables -S CHAIN` output."""
    return [port for port, owner in rules(listing) if owner == agent_id]


def rules(listing: list[str]) -> list[tuple[int, str]]:
    """Every gate rule of `iptables -S CHAIN` output: (port, the agent id that made it)."""
    found = []
    for line in listing:
        words = line.split()
        if "--ctorigdstport" not in words or f'"{_COMMENT_PREFIX}' not in line:
            continue
        value = words[words.index("--ctorigdstport") + 1]
        owner = line.split(f'"{_COMMENT_PREFIX}', 1)[1].split('"', 1)[0]
        if value.isdigit() and owner:
            found.append((int(value), owner))
    return found


def left_behind(
    listing: list[str], agent_id: str, port_range: tuple[int, int] | None
) -> list[tuple[int, str]]:
    """The rules an agent starting removes: its own, and any on a port of its range."""
    lo, hi = port_range if port_range is not None else (1, 0)
    return [
        (port, owner) for port, owner in rules(listing) if owner == agent_id or lo <= port <= hi
    ]
