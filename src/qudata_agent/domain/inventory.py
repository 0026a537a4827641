"""The host inventory and its `/init/host` wire shape.

Owns: the value types that describe a host (CPU, memory, disk, network, GPUs),
the short GPU model names the control plane understands ("H100", "RTX4090"),
the CUDA version string, the `/init/host` payload and the digest used to tell
when the inventory changed.

What stays true:
- Pure logic: no I/O, no SDK imports. Adapters fill the dataclasses; this
  module only turns them into the wire shape.
- A GPU is reported only when NVML listed it: no GPUs means `gpu_amount` 0,
  `gpu_name` None and `vram` 0, never a guess.
- The CUDA version is a string built from NVML's integer, so 12.10 and 12.1 stay
  distinct.
- The payload has exactly the keys of CONTRACT.md section 2 item 2 (plus
  `isolation`, section 9); unknown figures are None, never invented.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

_GIB = 1024**3

_VENDOR_WORDS = frozenset({"nvidia", "geforce", "tesla", "quadro"})
# Tokens that describe memory or packaging, not the GPU model.
_NOISE_TOKEN = re.compile(
    r"""
    \d+gb            # memory size: 80GB, 16GB
    | hbm\d*e?       # memory kind: HBM3, HBM2e
    | pcie           # form factors
    | sxm\d*
    | nvl
    | generation
    """,
    re.IGNORECASE | re.VERBOSE,
)


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML lists it."""

    index: int
    uuid: str
    name: str  # full NVML name, e.g. "NVIDIA H100 80GB HBM3"
    memory_total_bytes: int


@dataclass(frozen=True)
class GpuCondition:
    """What `doctor` asks NVML about one GPU's health; None: NVML could not say."""

    uuid: str
    persistence_mode: bool | None = None
    remap_pending: bool | None = None  # rows waiting to be remapped: a GPU reset is needed
    remap_failed: bool | None = None  # a remap failed: the GPU needs service
    ecc_enabled: bool | None = None
    ecc_uncorrected: int | None = None  # uncorrected ECC errors since the driver loaded


@dataclass(frozen=True)
class GpuReport:
    """What NVML said about the GPUs; `error` says why NVML was not usable.

    `error` is None both when NVML worked and when it worked and found no GPU.
    """

    gpus: tuple[GpuInfo, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class GpuSample:
    """One GPU's live figures, as NVML reports them."""

    uuid: str
    util_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float | None


@dataclass(frozen=True)
class HostInventory:
    """The figures the agent reports about its host; None means unknown."""

    cpu_name: str | None
    cpu_cores: int | None  # physical cores
    vcpu: int | None  # logical CPUs
    cpu_freq_ghz: float | None
    ram_bytes: int
    disk_bytes: int | None  # size of the filesystem holding Docker's data root
    memory_speed_mts: int | None
    ethernet_gbps: float | None
    gpu: GpuReport


def short_gpu_name(full: str) -> str:
    """The GPU model without vendor, memory and form-factor words.

    "NVIDIA H100 80GB HBM3" -> "H100", "NVIDIA GeForce RTX 3090 Ti" -> "RTX3090Ti".
    A MIG suffix ("... MIG 1g.10gb") and everything after it is dropped. When
    nothing is left the stripped full name is returned, and "unknown" when that
    is empty too, so the answer is never an empty string.
    """
    kept: list[str] = []
    for token in re.split(r"[\s\-]+", full.strip()):
        if not token:
            continue
        if token.upper().startswith("MIG"):
            break
        if token.lower() in _VENDOR_WORDS or _NOISE_TOKEN.fullmatch(token):
            continue
        kept.append(token)
    return "".join(kept) or full.strip() or "unknown"


def format_cuda_version(v: int) -> str:
    """NVML's CUDA integer as "major.minor": 12040 -> "12.4", 12100 -> "12.10"."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def _gib(n_bytes: int) -> int:
    return round(n_bytes / _GIB)


def init_host_payload(
    inv: HostInventory, isolation: Sequence[str] | None = None
) -> dict[str, object]:
    """The `POST /init/host` body for `inv` (CONTRACT.md section 2 item 2).

    `isolation`: the tiers the host offers, sent as the extra field `isolation`
    (CONTRACT.md section 9) when known.
    """
    gpus = inv.gpu.gpus
    first = gpus[0] if gpus else None
    configuration: dict[str, object] = {
        "ram": {"amount": _gib(inv.ram_bytes), "unit": "gb"},
        "disk": {
            "amount": None if inv.disk_bytes is None else _gib(inv.disk_bytes),
            "unit": "gb",
        },
        "cpu_name": inv.cpu_name,
        "vcpu": inv.vcpu,
        "cpu_cores": inv.cpu_cores,
        "cpu_freq": None if inv.cpu_freq_ghz is None else round(inv.cpu_freq_ghz, 2),
        "memory_speed": inv.memory_speed_mts,
        "ethernet_in": inv.ethernet_gbps,
        "ethernet_out": inv.ethernet_gbps,
        "capacity": None,
        "max_cuda_version": inv.gpu.cuda_version,
    }
    payload: dict[str, object] = {
        "gpu_name": None if first is None else short_gpu_name(first.name),
        "gpu_amount": len(gpus),
        "vram": 0 if first is None else _gib(first.memory_total_bytes),
        "location": {"city": None, "country": None, "region": None},
        "configuration": configuration,
    }
    if isolation is not None:
        payload["isolation"] = list(isolation)
    return payload


def inventory_digest(payload: dict[str, object]) -> str:
    """sha256 hex of the canonical JSON of `payload`; changes when any field does."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
