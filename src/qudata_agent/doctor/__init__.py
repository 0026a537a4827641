"""`qudata-agent doctor`: is this host ready to rent out, and if not, what to do.

The package owns the readiness checks, their verdicts and the table they
print, in three parts:
- `probes`: what is observed (Docker's `info`, NVML's report, how many ports
  bind, file modes, `timedatectl`'s answer, the control plane's HTTP status,
  the container stack's versions); `HostProbes` is the only part that touches
  the host, tests pass fakes;
- `checks_*`: pure judgments, each from observations to a `Check`;
- `report`: `run_checks` (asks the probes, judges), the table and the JSON.

What stays true:
- every `fail` carries a fix (a command or a setting to change); so does every
  `warn` that has one;
- the host is ready (exit code 0) exactly when no check fails; warnings (no
  GPU, no disk quota, an unknown clock) never make it "not ready";
- doctor only looks: it creates, tightens and starts nothing, and never prints
  a secret; it loads no service, loop or API module (tests/unit/test_architecture.py);
- a host with no NVIDIA GPU is a CPU host, never a failure.
"""

from qudata_agent.doctor.checks_api import clock_skew_s, control_plane_check, tls_check
from qudata_agent.doctor.checks_docker import (
    disk_check,
    docker_check,
    live_restore_check,
    pulls_check,
    storage_check,
    volumes_check,
)
from qudata_agent.doctor.checks_gpu import (
    cdi_check,
    count_nvidia_devices,
    forward_compat_check,
    gpu_check,
    gpu_health_check,
    isolation_check,
    runtime_check,
    sandbox_gpu_check,
    toolkit_check,
    toolkit_version_check,
)
from qudata_agent.doctor.checks_host import (
    NET_TOOLS,
    SSH_TOOLS,
    clock_check,
    ephemeral_check,
    net_tools_check,
    ports_check,
    secret_files_check,
    ssh_check,
    state_dir_check,
    version_checks,
    wall_check,
)
from qudata_agent.doctor.model import GIB, Check, CpAnswer, Level, ProbeError, VolumeSummary
from qudata_agent.doctor.probes import DAEMON_JSON, EPHEMERAL, RESERVED, HostProbes, Probes
from qudata_agent.doctor.report import exit_code, ready, render, run_checks, to_json

__all__ = [
    "DAEMON_JSON",
    "EPHEMERAL",
    "GIB",
    "NET_TOOLS",
    "RESERVED",
    "SSH_TOOLS",
    "Check",
    "CpAnswer",
    "HostProbes",
    "Level",
    "ProbeError",
    "Probes",
    "VolumeSummary",
    "cdi_check",
    "clock_check",
    "clock_skew_s",
    "control_plane_check",
    "count_nvidia_devices",
    "disk_check",
    "docker_check",
    "ephemeral_check",
    "exit_code",
    "forward_compat_check",
    "gpu_check",
    "gpu_health_check",
    "isolation_check",
    "live_restore_check",
    "net_tools_check",
    "ports_check",
    "pulls_check",
    "ready",
    "render",
    "run_checks",
    "runtime_check",
    "sandbox_gpu_check",
    "secret_files_check",
    "ssh_check",
    "state_dir_check",
    "storage_check",
    "tls_check",
    "to_json",
    "toolkit_check",
    "toolkit_version_check",
    "version_checks",
    "volumes_check",
    "wall_check",
]
