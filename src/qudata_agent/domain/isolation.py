"""Isolation tiers: which OCI runtime an instance runs under, and whether this host offers it.

Owns the tier names of the wire (`container`, `sandbox`), the Docker runtime
each one runs under, the decision of which tiers the host offers (from what
Docker has registered and whether a probe container started under it), the
decision whether a sandbox may have GPUs (gVisor's `nvproxy` and the host's
driver), the refusal an order gets when its tier cannot be had, and the
notes that tell a renter what differs in the sandbox.

What stays true:
- a tier is offered only when Docker has its runtime registered AND a probe
  container started under it: never assumed from a package or a setting;
- `container` is runc (the agent's hardening) and is the default; `sandbox`
  is gVisor's runsc, under the Docker runtime name the settings give;
- a sandbox gets GPUs only when its runsc has `nvproxy` switched on in the
  registered runtime's arguments and lists the host's driver as supported;
  anything else is a refusal that says which of these is missing;
- a tier's refusal names the tier and why, so a 409 is actionable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

CONTAINER_RUNTIME = "runc"
DEFAULT_SANDBOX_RUNTIME = "runsc"


class Tier(StrEnum):
    CONTAINER = "container"
    SANDBOX = "sandbox"


# What a renter is told about the sandbox (the view's `isolation_notes`): what
# works differently there than in a container. Measured on gVisor with the
# ptrace platform and the host network of the container's own namespace.
SANDBOX_NOTES: tuple[str, ...] = (
    "system calls are served by gVisor's kernel (dmesg shows it), not the host's",
    "a process that goes past the memory limit ends the whole sandbox, not only that"
    " process: an idle instance is started again at once, a command counts a crash",
    "network: the container's own network namespace through the host's stack, so the"
    " firewall, the egress rules and published ports are the same; raw sockets are off",
    "system-call-heavy work runs slower than in a container (file and process churn"
    " most); plain computation runs at full speed",
)


@dataclass(frozen=True)
class RuntimeInfo:
    """One runtime Docker has registered (`docker info` .Runtimes)."""

    name: str
    path: str
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProbeResult:
    """Whether a probe container started and ended cleanly under a runtime."""

    started: bool
    reason: str | None = None  # why not, in words


@dataclass(frozen=True)
class SandboxGpus:
    """What the installed runsc says about GPUs (its `nvproxy`)."""

    nvproxy: bool  # the runsc has an nvproxy subcommand at all
    supported_drivers: tuple[str, ...] = ()  # driver versions it can proxy


@dataclass(frozen=True)
class Offer:
    """The tiers this host offers, why the others are not, and GPUs in the sandbox."""

    tiers: tuple[Tier, ...] = (Tier.CONTAINER,)
    missing: Mapping[Tier, str] = field(default_factory=dict)  # tier -> why not offered
    sandbox_gpus: str | None = "the sandbox is not offered"  # None: allowed; else why not
    sandbox_runtime: str = DEFAULT_SANDBOX_RUNTIME
    gpus: str | None = None  # None: GPU orders may run (any tier); else why not (the toolkit)
    unreachable: str | None = None  # Docker did not answer before any offer was made

    def names(self) -> list[str]:
        return [t.value for t in self.tiers]


def runtime_of(tier: Tier, sandbox_runtime: str = DEFAULT_SANDBOX_RUNTIME) -> str:
    return sandbox_runtime if tier is Tier.SANDBOX else CONTAINER_RUNTIME


def tier_of(runtime: str) -> Tier:
    """The tier of a container from its spec's runtime (anything but runc is the sandbox)."""
    return Tier.CONTAINER if runtime == CONTAINER_RUNTIME else Tier.SANDBOX


def parse_runtimes(info_runtimes: object) -> dict[str, RuntimeInfo]:
    """`docker info`'s `Runtimes` ({name: {path, runtimeArgs}}) -> RuntimeInfo by name."""
    found: dict[str, RuntimeInfo] = {}
    if not isinstance(info_runtimes, Mapping):
        return found
    for name, body in info_runtimes.items():
        body = body if isinstance(body, Mapping) else {}
        args = body.get("runtimeArgs") or ()
        found[str(name)] = RuntimeInfo(
            name=str(name),
            path=str(body.get("path") or name),
            args=tuple(str(a) for a in args) if isinstance(args, Sequence) else (),
        )
    return found


_DRIVER = re.compile(r"^\s*(\d+\.\d+(?:\.\d+)?)\s*$")


def parse_supported_drivers(text: str) -> tuple[str, ...]:
    """`runsc nvproxy list-supported-drivers`: one driver version a line."""
    return tuple(m.group(1) for line in text.splitlines() if (m := _DRIVER.match(line)))


def nvproxy_enabled(args: Sequence[str]) -> bool:
    """Whether the runtime's arguments switch nvproxy on (`--nvproxy`, `--nvproxy=true`)."""
    on = False
    for arg in args:
        flag, _, value = arg.lstrip("-").partition("=")
        if flag == "nvproxy":
            on = value.lower() in ("", "true", "1")
    return on


def sandbox_gpu_refusal(
    runtime: RuntimeInfo, gpus: SandboxGpus, driver_version: str | None
) -> str | None:
    """None when a sandbox may have this host's GPUs; else why not, with the fix."""
    if not gpus.nvproxy:
        return (
            f"the installed runsc ({runtime.path}) has no nvproxy, so it cannot pass GPUs"
            " to a sandbox: install a gVisor release with nvproxy (install.sh --sandbox-gpu)"
        )
    if not nvproxy_enabled(runtime.args):
        return (
            f"Docker's {runtime.name} runtime does not switch nvproxy on: add --nvproxy to its"
            " runtimeArgs in daemon.json (install.sh --sandbox-gpu does)"
        )
    if driver_version is None:
        return "the host's NVIDIA driver version is unknown"
    if driver_version not in gpus.supported_drivers:
        return (
            f"the installed runsc does not support NVIDIA driver {driver_version}"
            f" (it supports {', '.join(gpus.supported_drivers) or 'none'}):"
            " install a gVisor release that lists it"
        )
    return None


def decide_offer(
    runtimes: Mapping[str, RuntimeInfo],
    probes: Mapping[str, ProbeResult],
    *,
    sandbox_runtime: str = DEFAULT_SANDBOX_RUNTIME,
    gpus: SandboxGpus | None = None,
    driver_version: str | None = None,
    gpu_refusal: str | None = None,
) -> Offer:
    """The tiers offered: each one's runtime registered with Docker and its probe started."""
    tiers: list[Tier] = []
    missing: dict[Tier, str] = {}
    for tier in Tier:
        name = runtime_of(tier, sandbox_runtime)
        probe = probes.get(name)
        if name not in runtimes:
            missing[tier] = f"Docker has no runtime named {name!r} registered"
        elif probe is None:
            missing[tier] = f"the {name} runtime has not been checked yet"
        elif not probe.started:
            missing[tier] = f"a container does not start under the {name} runtime: {probe.reason}"
        else:
            tiers.append(tier)
    sandbox_refusal: str | None = "the sandbox is not offered"
    if Tier.SANDBOX in tiers:
        sandbox_refusal = sandbox_gpu_refusal(
            runtimes[sandbox_runtime], gpus or SandboxGpus(False), driver_version
        )
    return Offer(
        tiers=tuple(tiers),
        missing=missing,
        sandbox_gpus=sandbox_refusal,
        sandbox_runtime=sandbox_runtime,
        gpus=gpu_refusal,
    )


def refusal(offer: Offer, tier: Tier, gpu_count: int) -> str | None:
    """Why an order for `tier` with `gpu_count` GPUs cannot run here (None: it can)."""
    if tier not in offer.tiers:
        why = offer.missing.get(tier, "not offered")
        return f"isolation {tier.value!r} is not offered by this host: {why}"
    if gpu_count > 0 and offer.gpus is not None:
        return f"GPU orders are refused on this host: {offer.gpus}"
    if tier is Tier.SANDBOX and gpu_count > 0 and offer.sandbox_gpus is not None:
        return f"isolation 'sandbox' with GPUs is not possible here: {offer.sandbox_gpus}"
    return None


CDI_KIND = "nvidia.com/gpu"
CDI_MIN_DOCKER = 25  # Docker's first release that takes CDI device names


def cdi_device(gpu_uuid: str) -> str:
    """The CDI name of one GPU (`nvidia-ctk cdi generate --device-name-strategy=uuid`)."""
    return f"{CDI_KIND}={gpu_uuid}"


def cdi_refusal(
    docker_version: str, spec_dirs: Sequence[str], spec_texts: Sequence[str], gpus: Sequence[str]
) -> str | None:
    """None when the container tier can inject these GPUs by CDI name; else why not.

    CDI is preferred where it can be had: the devices come from a spec the
    provider generated, not from the legacy prestart hook's own discovery.
    """
    major = re.match(r"(\d+)\.", docker_version)
    if major is None or int(major.group(1)) < CDI_MIN_DOCKER:
        return f"Docker {docker_version or '(unknown)'} takes no CDI devices (25 or later does)"
    if not spec_dirs:
        return "Docker's CDI support is off (daemon.json features.cdi, on by default from 28)"
    named = [u for u in gpus if any(f"name: {u}" in t or f'"name": "{u}"' in t for t in spec_texts)]
    if not gpus or len(named) != len(gpus):
        return (
            "no CDI spec names every GPU by UUID: nvidia-ctk cdi generate"
            " --device-name-strategy=uuid --output=/etc/cdi/nvidia.yaml"
        )
    return None


def notes_of(tier: Tier) -> tuple[str, ...]:
    return SANDBOX_NOTES if tier is Tier.SANDBOX else ()
