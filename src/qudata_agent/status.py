"""`qudata-agent status`: what the agent on this host is doing, also when it is down.

Owns the reading of two sources and the text they make: the state directory
(the SQLite store: agent id, last port, the instance as last recorded, its SSH
state, whether the control plane accepted the host) and, when the agent runs,
its own API on the port the store names, with the secret from the state dir
(`/ping`, `GET /instances`, `/metrics` for the control-plane failures and the
latest stats).

What stays true: status only reads (it never creates the state directory or
the database, never starts anything); a stopped agent is reported as stopped,
with the recorded view, not as an error; no secret is ever printed.
"""

from __future__ import annotations

import http.client
import json
import math
import ssl
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qudata_agent.adapters.store import Store
from qudata_agent.adapters.tls import TlsError, served_identity
from qudata_agent.config import Settings
from qudata_agent.domain.instance import Instance
from qudata_agent.domain.tls import TlsMode
from qudata_agent.errors import AgentError
from qudata_agent.state_dir import Meta, StateDir

EXIT_RUNNING = 0
EXIT_DOWN = 3  # as `systemctl status` answers for a stopped unit
_TIMEOUT_S = 3.0
_STATS = (  # ratio metric -> label in the output (see metrics.py)
    ("qudata_cpu_utilization_ratio", "cpu"),
    ("qudata_memory_utilization_ratio", "ram"),
)

Samples = dict[str, list[tuple[dict[str, str], float]]]


class AgentDown(Exception):
    """The agent's API did not answer (or not as the agent would)."""


@dataclass(frozen=True)
class Recorded:
    """What the state directory says."""

    agent_id: str | None
    agent_port: int | None
    registered: bool  # the control plane accepted this host's inventory at least once
    instances: tuple[dict[str, Any], ...]  # in the shape of GET /instances' data


@dataclass(frozen=True)
class Live:
    """What the running agent says."""

    instance: dict[str, Any]
    metrics: Samples = field(default_factory=dict)


@dataclass(frozen=True)
class TlsState:
    """The port's TLS as the settings and the certificate files say."""

    mode: str  # on, required, off
    pin: str | None = None
    not_after: str | None = None  # ISO 8601
    mutual: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Report:
    state_dir: Path
    api_url: str
    has_api_key: bool
    address: str | None  # host:port asked, None when no port is known
    recorded: Recorded | None
    live: Live | None
    down_reason: str | None = None
    tls: TlsState | None = None

    @property
    def running(self) -> bool:
        return self.live is not None


# -- pure parts --------------------------------------------------------------------


def parse_metrics(text: str) -> Samples:
    """Prometheus text format -> {name: [(labels, value)]} (comments skipped)."""
    samples: Samples = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, brace, rest = head.partition("{")
        labels: dict[str, str] = {}
        if brace:
            for item in rest.rstrip("}").split('",'):
                key, eq, raw = item.partition("=")
                if eq:
                    labels[key.strip().strip(",")] = raw.strip().strip('"')
        try:
            number = float(value)
        except ValueError:
            continue
        samples.setdefault(name.strip(), []).append((labels, number))
    return samples


def recorded_instance(
    instance: Instance, ssh: tuple[str, str | None, str | None] | None
) -> dict[str, Any]:
    """A stored `Instance` (and its SSH state) in the shape of `GET /instances`' data."""
    ports = {key: str(port) for key, port in instance.ports.items()}
    view: dict[str, Any] = {
        "instance_id": instance.id,
        "status": instance.status.value,
        "phase": instance.phase,
        "reason": instance.reason,
        "image": instance.image,
        "allocated_ports": ports,
        "gpus": list(instance.gpus),
        "ssh_enabled": instance.ssh_enabled,
    }
    if instance.ssh_enabled:
        view["ssh"] = {
            "status": ssh[0] if ssh else "installing",
            "port": ports.get("22"),
            "reason": ssh[1] if ssh else None,
        }
    return view


def _instance_lines(view: Mapping[str, Any]) -> list[str]:
    if view.get("status") in (None, "destroyed") or not view.get("instance_id"):
        return ["instance    none"]
    status = str(view["status"])
    if view.get("phase"):
        status += f" ({view['phase']})"
    if view.get("reason"):
        status += f": {view['reason']}"
    lines = [f"instance    {view['instance_id']} {status}, image {view.get('image') or '?'}"]
    ports = view.get("allocated_ports") or {}
    shown = ", ".join(f"{c} -> {h}" for c, h in sorted(ports.items())) or "none"
    lines.append(f"ports       {shown} (container -> host)")
    gpus = view.get("gpus") or []
    lines.append(f"gpus        {', '.join(gpus) if gpus else 'none'}")
    ssh = view.get("ssh")
    if not view.get("ssh_enabled") or not isinstance(ssh, Mapping):
        lines.append("ssh         disabled")
    else:
        text = str(ssh.get("status"))
        if ssh.get("port"):
            text += f" on host port {ssh['port']}"
        if ssh.get("reason"):
            text += f": {ssh['reason']}"
        lines.append(f"ssh         {text}")
    return lines


def _control_plane_line(report: Report) -> str:
    if not report.has_api_key:
        return "control     standalone (no API key): no control plane"
    recorded = report.recorded
    text = f"control     {report.api_url}: " + (
        "host registered" if recorded and recorded.registered else "not registered yet"
    )
    if report.live is not None:
        failures = report.live.metrics.get("qudata_control_plane_failures_total", [])
        by_call = {labels.get("call", "?"): int(v) for labels, v in failures if v}
        text += "; failed calls since start: " + (
            ", ".join(f"{call} {n}" for call, n in sorted(by_call.items())) or "none"
        )
    return text


def _values(metrics: Samples, name: str) -> list[float]:
    return [value for _, value in metrics.get(name, []) if math.isfinite(value)]


def _stats_line(metrics: Samples) -> str | None:
    """cpu and ram of the subject; its GPUs' mean use, memory share and hottest one."""
    figures = []
    subject = None
    for name, label in _STATS:
        for labels, value in metrics.get(name, []):
            if math.isfinite(value):
                subject = labels.get("subject", subject)
                figures.append(f"{label} {value * 100:.0f}%")
    util = _values(metrics, "qudata_gpu_utilization_ratio")
    if util:
        figures.append(f"gpu {sum(util) / len(util) * 100:.0f}%")
    used = _values(metrics, "qudata_gpu_memory_used_bytes")
    total = sum(_values(metrics, "qudata_gpu_memory_total_bytes"))
    if used and total > 0:
        figures.append(f"gpu mem {sum(used) / total * 100:.0f}%")
    temps = _values(metrics, "qudata_gpu_temperature_celsius")
    if temps:
        figures.append(f"gpu temp {max(temps):.0f}C")
    if not figures:
        return None
    return f"stats       {', '.join(figures)}" + (f" ({subject})" if subject else "")


def _tls_line(tls: TlsState | None) -> str | None:
    if tls is None:
        return None
    if tls.mode == TlsMode.OFF.value:
        return "tls         off: plain HTTP only (the secret crosses the network in clear)"
    text = f"tls         {tls.mode}" + (" (plain HTTP too)" if tls.mode == TlsMode.ON.value else "")
    text += ", mutual" if tls.mutual else ""
    if tls.error:
        return f"{text}; certificate unreadable: {tls.error}"
    if tls.pin is None:
        return f"{text}; no certificate yet (made at the agent's first start)"
    return f"{text}; pin sha256//{tls.pin}, certificate until {tls.not_after}"


def render(report: Report) -> str:
    rec = report.recorded
    if report.running:
        lines = [f"agent       running, API on {report.address}"]
    else:
        why = f" ({report.down_reason})" if report.down_reason else ""
        lines = [f"agent       NOT running{why}"]
    if rec is None:
        lines.append(f"state       {report.state_dir}: no state yet (the agent has not run)")
    else:
        lines.append(f"state       {report.state_dir}, agent id {rec.agent_id or '?'}")
    if report.live is not None:
        lines += _instance_lines(report.live.instance)
    elif rec is not None:
        views = rec.instances or ({"status": "destroyed"},)
        for view in views:
            lines += _instance_lines(view)
        if rec.instances:
            lines.append("            (as last recorded; the agent is down)")
    lines.append(_control_plane_line(report))
    if (tls := _tls_line(report.tls)) is not None:
        lines.append(tls)
    if report.live is not None and (stats := _stats_line(report.live.metrics)):
        lines.append(stats)
    return "\n".join(lines)


def to_json(report: Report) -> str:
    rec = report.recorded
    return json.dumps(
        {
            "running": report.running,
            "down_reason": report.down_reason,
            "address": report.address,
            "state_dir": str(report.state_dir),
            "agent_id": rec.agent_id if rec else None,
            "registered": rec.registered if rec else False,
            "standalone": not report.has_api_key,
            "api_url": report.api_url,
            "instance": report.live.instance if report.live else None,
            "recorded_instances": list(rec.instances) if rec else [],
            "tls": asdict(report.tls) if report.tls else None,
        },
        indent=2,
    )


def exit_code(report: Report) -> int:
    return EXIT_RUNNING if report.running else EXIT_DOWN


# -- reading the sources -------------------------------------------------------------


def read_recorded(state_dir: Path) -> Recorded | None:
    """The store's view; None when there is no database (it is never created here)."""
    db = StateDir(state_dir).db
    if not db.is_file():
        return None
    store = Store.open_readonly(db)  # never migrated or written here
    try:
        port = store.get(Meta.AGENT_PORT)
        instances = tuple(
            recorded_instance(instance, store.ssh_state(instance.id))
            for instance in store.list_instances()
        )
        return Recorded(
            agent_id=store.get(Meta.AGENT_ID),
            agent_port=int(port) if port and port.isdigit() else None,
            registered=store.get(Meta.INVENTORY_DIGEST) is not None,
            instances=instances,
        )
    finally:
        store.close()


def _get(
    host: str, port: int, path: str, secret: str | None, tls: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    conn = (
        http.client.HTTPSConnection(host, port, timeout=_TIMEOUT_S, context=tls)
        if tls is not None
        else http.client.HTTPConnection(host, port, timeout=_TIMEOUT_S)
    )
    try:
        conn.request("GET", path, headers={"X-Agent-Secret": secret} if secret else {})
        answer = conn.getresponse()
        return answer.status, answer.read()
    except (OSError, http.client.HTTPException) as e:
        raise AgentDown(f"nothing answers on {host}:{port} ({type(e).__name__})") from e
    finally:
        conn.close()


def _loopback_tls() -> ssl.SSLContext:
    """For the agent's own port on loopback: its certificate is self-signed, not for 127.0.0.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def fetch_live(host: str, port: int, secret: str | None, https: bool = False) -> Live:
    tls = _loopback_tls() if https else None
    status, _ = _get(host, port, "/ping", None, tls)
    if status != 200:
        raise AgentDown(f"{host}:{port} answers /ping with HTTP {status}: not the agent?")
    status, body = _get(host, port, "/instances", secret, tls)
    if status == 401:
        raise AgentDown(f"the agent on {host}:{port} refuses the secret in the state dir")
    try:
        instance = json.loads(body)["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise AgentDown(f"GET /instances answered HTTP {status} without data") from e
    status, body = _get(host, port, "/metrics", secret, tls)
    metrics = parse_metrics(body.decode("utf-8", "replace")) if status == 200 else {}
    return Live(instance=instance if isinstance(instance, dict) else {}, metrics=metrics)


def _read_secret(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def tls_state(settings: Settings) -> TlsState:
    mode = settings.tls.value
    mutual = settings.tls_client_ca is not None
    if settings.tls is TlsMode.OFF:
        return TlsState(mode)
    try:
        identity = served_identity(
            settings.state_dir, settings.tls_cert_file, settings.tls_key_file
        )
    except TlsError as e:
        return TlsState(mode, mutual=mutual, error=str(e))
    if identity is None:
        return TlsState(mode, mutual=mutual)
    until = identity.not_after.isoformat(timespec="seconds")
    return TlsState(mode, identity.pin, until, mutual)


def gather(settings: Settings) -> Report:
    state = settings.state_dir
    layout = StateDir(state)
    try:
        recorded = read_recorded(state)
        error = None
    except (OSError, AgentError) as e:
        recorded, error = None, f"state unreadable: {e}"
    has_key = bool(settings.api_key or _read_secret(layout.api_key))
    port = (recorded.agent_port if recorded else None) or settings.agent_port
    host = settings.agent_host if settings.agent_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    report = Report(
        state, settings.api_url, has_key, None, recorded, None, error, tls_state(settings)
    )
    if port is None:
        return replace(report, down_reason=error or "no port recorded: the agent never listened")
    report = replace(report, address=f"{host}:{port}")
    try:
        https = settings.tls is TlsMode.REQUIRED or settings.tls_client_ca is not None
        live = fetch_live(host, port, _read_secret(layout.agent_secret), https)
    except AgentDown as e:
        reason = str(e)
        if settings.tls_client_ca is not None:
            reason += "; with mutual TLS status cannot call the API (no client certificate)"
        return replace(report, down_reason=error or reason)
    return replace(report, live=live)
