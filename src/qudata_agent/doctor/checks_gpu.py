"""Doctor's judgments of the GPUs and their container stack, and of the isolation tiers.

Pure functions from NVML's report, the PCI bus's count, Docker's runtimes and
the NVIDIA Container Toolkit's answers to a `Check`. What stays true: a host
with no NVIDIA GPU is a CPU host, never a failure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from qudata_agent.doctor.model import Check, Level
from qudata_agent.domain.inventory import GpuCondition, GpuReport
from qudata_agent.domain.isolation import SandboxGpus, parse_runtimes, sandbox_gpu_refusal
from qudata_agent.domain.nvidia_toolkit import Version, toolkit_refusal, unconfirmed

NVIDIA_PCI_VENDOR = "0x10de"


def count_nvidia_devices(devices: Iterable[tuple[str, str]]) -> int:
    """NVIDIA display/3D controllers among (vendor, class) pairs as sysfs gives them."""
    return sum(
        1
        for vendor, klass in devices
        if vendor.strip().lower() == NVIDIA_PCI_VENDOR and klass.strip().startswith("0x03")
    )


def gpu_check(report: GpuReport, pci_gpus: int) -> Check:
    """GPUs as NVML sees them, against the NVIDIA devices on the PCI bus."""
    if report.gpus and len(report.gpus) < pci_gpus:
        return Check(
            "nvidia gpus",
            Level.FAIL,
            f"NVML sees {len(report.gpus)} of the {pci_gpus} NVIDIA GPU(s) on the PCI bus",
            "a GPU fell off the bus or the driver lost it: look for Xid 79 or 'fallen off "
            "the bus' in dmesg, then reboot (or reseat the GPU); nvidia-smi must list all",
        )
    if report.gpus:
        names = ", ".join(sorted({gpu.name for gpu in report.gpus}))
        return Check(
            "nvidia gpus",
            Level.PASS,
            f"{len(report.gpus)} GPU(s) through NVML ({names}), driver {report.driver_version}",
        )
    if pci_gpus:
        return Check(
            "nvidia gpus",
            Level.FAIL,
            f"{pci_gpus} NVIDIA device(s) on the PCI bus but NVML sees none"
            + (f" ({report.error})" if report.error else ""),
            "install the NVIDIA driver (install.sh --install-driver) and reboot; "
            "nvidia-smi must list the GPUs",
        )
    return Check("nvidia gpus", Level.WARN, "no NVIDIA GPU: the host can only rent CPU instances")


def runtime_check(info: Mapping[str, Any] | None, gpus_present: bool) -> Check:
    """Docker's `nvidia` runtime (the NVIDIA Container Toolkit), needed for GPU instances."""
    if info is None:
        return Check("nvidia runtime", Level.WARN, "not checked: Docker does not answer")
    runtimes = sorted(info.get("Runtimes") or {})
    if "nvidia" in runtimes:
        return Check("nvidia runtime", Level.PASS, "registered in Docker")
    if not gpus_present:
        return Check("nvidia runtime", Level.PASS, "not needed: no NVIDIA GPU")
    return Check(
        "nvidia runtime",
        Level.FAIL,
        f"Docker has no nvidia runtime (it has: {', '.join(runtimes) or 'none'})",
        "install the NVIDIA Container Toolkit, then: nvidia-ctk runtime configure "
        "--runtime=docker && systemctl restart docker (install.sh does both)",
    )


def gpu_health_check(conditions: Sequence[GpuCondition]) -> Check | None:
    """Persistence mode, pending row remaps and ECC of each GPU (None: no GPU to check)."""
    if not conditions:
        return None
    broken = [c.uuid for c in conditions if c.remap_failed]
    pending = [c.uuid for c in conditions if c.remap_pending]
    ecc = [c.uuid for c in conditions if c.ecc_uncorrected]
    if broken or pending or ecc:
        parts = []
        if broken:
            parts.append(f"row remapping failed on {', '.join(broken)} (needs service)")
        if pending:
            parts.append(f"row remaps pending on {', '.join(pending)}")
        if ecc:
            parts.append(f"uncorrected ECC errors on {', '.join(ecc)}")
        return Check(
            "gpu health",
            Level.FAIL,
            "; ".join(parts),
            "drain the host, then reset the GPU (nvidia-smi -r) or reboot so pending "
            "remaps take effect; a failed remap or recurring ECC errors: RMA the GPU",
        )
    off = [c.uuid for c in conditions if c.persistence_mode is False]
    no_ecc = [c.uuid for c in conditions if c.ecc_enabled is False]
    detail = f"{len(conditions)} GPU(s): no pending row remap, no uncorrected ECC error"
    if off:
        return Check(
            "gpu health",
            Level.WARN,
            f"{detail}; persistence mode off on {', '.join(off)}",
            "systemctl enable --now nvidia-persistenced (or nvidia-smi -pm 1): without it "
            "the driver unloads between jobs and each instance start is slower",
        )
    if no_ecc:
        detail += f"; ECC off on {', '.join(no_ecc)}"
    return Check("gpu health", Level.PASS, detail + "; persistence mode on")


def toolkit_check(gpus_present: bool, cli: tuple[int, str] | None) -> Check:
    """`nvidia-container-cli info`: the toolkit's view of the driver (`cli`: exit, output)."""
    if not gpus_present:
        return Check("nvidia toolkit", Level.PASS, "not needed: no NVIDIA GPU")
    if cli is None:
        return Check(
            "nvidia toolkit",
            Level.FAIL,
            "nvidia-container-cli is not installed",
            "install the NVIDIA Container Toolkit (install.sh does)",
        )
    code, output = cli
    first = next((line.strip() for line in output.splitlines() if line.strip()), "")
    if code != 0:
        return Check(
            "nvidia toolkit",
            Level.FAIL,
            f"nvidia-container-cli info fails (exit {code}): {first}",
            "the toolkit does not match the driver: reinstall nvidia-container-toolkit, "
            "and reboot if the driver was upgraded without one",
        )
    return Check("nvidia toolkit", Level.PASS, f"nvidia-container-cli info: {first}")


def cdi_check(gpus_present: bool, specs: Sequence[str]) -> Check:
    if not gpus_present:
        return Check("cdi", Level.PASS, "not needed: no NVIDIA GPU")
    if specs:
        return Check("cdi", Level.PASS, f"CDI specs: {', '.join(specs)}")
    return Check(
        "cdi",
        Level.WARN,
        "no CDI spec for the GPUs (/etc/cdi, /var/run/cdi)",
        "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml",
    )


def isolation_check(info: Mapping[str, Any] | None, sandbox_runtime: str) -> Check:
    """The sandbox tier: gVisor's runtime registered with Docker (the agent probes it at start)."""
    runtimes = parse_runtimes((info or {}).get("Runtimes"))
    if sandbox_runtime in runtimes:
        found = runtimes[sandbox_runtime]
        args = " ".join(found.args) or "no arguments"
        return Check(
            "isolation",
            Level.PASS,
            f"container and sandbox ({sandbox_runtime}: {found.path}, {args});"
            " the agent offers the sandbox once a probe container starts under it",
        )
    return Check(
        "isolation",
        Level.WARN,
        f"container only: Docker has no {sandbox_runtime!r} runtime, so orders for"
        " isolation 'sandbox' are refused (409)",
        "install.sh --sandbox (gVisor's runsc registered in daemon.json)",
    )


def sandbox_gpu_check(
    info: Mapping[str, Any] | None,
    sandbox_runtime: str,
    report: GpuReport,
    gpus: SandboxGpus | None,
) -> Check | None:
    """GPUs in the sandbox (runsc's nvproxy and the driver); None without GPUs or sandbox."""
    runtime = parse_runtimes((info or {}).get("Runtimes")).get(sandbox_runtime)
    if not report.gpus or runtime is None or gpus is None:
        return None
    why = sandbox_gpu_refusal(runtime, gpus, report.driver_version)
    if why is None:
        return Check("sandbox gpus", Level.PASS, f"nvproxy supports driver {report.driver_version}")
    return Check(
        "sandbox gpus", Level.WARN, f"GPU orders with isolation 'sandbox' are refused: {why}"
    )


def toolkit_version_check(
    gpus_present: bool, version: Version | None, raised: Version | None
) -> Check:
    """The NVIDIA Container Toolkit against its known escapes (domain.nvidia_toolkit)."""
    if not gpus_present:
        return Check("toolkit escapes", Level.PASS, "not needed: no NVIDIA GPU")
    why = toolkit_refusal(version, raised)
    unknown = ", ".join(unconfirmed())
    if why is not None:
        return Check("toolkit escapes", Level.FAIL, f"GPU orders are refused: {why}",
                     "apt-get install --only-upgrade nvidia-container-toolkit"
                     " nvidia-container-toolkit-base libnvidia-container-tools"
                     " libnvidia-container1")  # fmt: skip
    shown = ".".join(map(str, version or ()))
    return Check(
        "toolkit escapes",
        Level.PASS,
        f"NVIDIA Container Toolkit {shown}: past every confirmed fix"
        f" (not checkable: {unknown}; raise QUDATA_NVIDIA_TOOLKIT_MIN once its fix is known)",
    )


def forward_compat_check(
    gpus_present: bool, found: bool, hook_off: bool, mode: str | None
) -> Check:
    """The CUDA forward-compat hook (the path of CVE-2025-23266): off unless wanted."""
    if not gpus_present:
        return Check("cuda compat hook", Level.PASS, "not needed: no NVIDIA GPU")
    if found and hook_off and mode in ("disabled", "ldconfig", "mount"):
        return Check("cuda compat hook", Level.PASS, f"off (cuda-compat-mode {mode})")
    return Check(
        "cuda compat hook",
        Level.WARN,
        "the toolkit may run the enable-cuda-compat hook for a container"
        + ("" if found else " (no /etc/nvidia-container-toolkit/config.toml)"),
        "nvidia-ctk config --in-place --set features.disable-cuda-compat-lib-hook=true"
        " --set nvidia-container-runtime.modes.legacy.cuda-compat-mode=disabled"
        " (install.sh does)",
    )
