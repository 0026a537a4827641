"""Resource requests and the GPU choice for the instance.

Owns `Resources` (the CPU, memory and GPU counts a create order asks for in
its `env_variables`), `parse_resources` (reads and checks them) and
`choose_gpus` (picks which GPUs, by UUID, the instance gets). The store keeps
which GPUs are allocated and passes them back in; nothing here asks NVML.

What stays true:
- `cpu_cores` and `memory_bytes` are None (no limit) or finite, positive
  and within range; `gpu_count` is an integer 0-64 (absent: 0);
- `choose_gpus` returns all `count` GPUs or raises Conflict: never a part;
  it picks free GPUs in the host's order (lowest index first), so the same
  inputs always give the same GPUs, and never a GPU twice;
- a host without a GPU never hands one out: asking for one is a Conflict,
  not a container that silently runs on the CPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from qudata_agent.errors import Conflict, InvalidRequest

GIB = 1024**3
CPU_KEY = "QUDATA_CPU_CORES"
MEMORY_KEY = "QUDATA_MEMORY_GB"
GPU_KEY = "QUDATA_GPU_COUNT"

MIN_CPU_CORES = 0.01  # Docker refuses a smaller --cpus
MAX_CPU_CORES = 1024.0
MIN_MEMORY_BYTES = 6 * 1024**2  # Docker refuses a memory limit under 6 MiB
MAX_MEMORY_GB = 65536.0
MAX_GPU_COUNT = 64

_DECIMAL_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER_RE = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Resources:
    cpu_cores: float | None = None  # None: no CPU limit
    memory_bytes: int | None = None  # None: no memory limit
    gpu_count: int = 0


def _shown(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _positive(env: Mapping[str, str], key: str, high: float, unit: str) -> float | None:
    """The number under `key` (None when absent), checked to be above 0 and at most `high`."""
    raw = env.get(key)
    if raw is None:
        return None
    text = str(raw).strip()
    value = float(text) if _DECIMAL_RE.fullmatch(text) else math.nan
    if not math.isfinite(value):
        raise InvalidRequest(
            f"field 'env_variables.{key}': expected a positive number of {unit}, got {_shown(raw)}"
        )
    if not 0 < value <= high:
        raise InvalidRequest(
            f"field 'env_variables.{key}': expected more than 0 and at most {high:g} {unit},"
            f" got {value:g}"
        )
    return value


def _gpu_count(env: Mapping[str, str]) -> int:
    raw = env.get(GPU_KEY)
    if raw is None:
        return 0
    text = str(raw).strip()
    if not _INTEGER_RE.fullmatch(text) or int(text) > MAX_GPU_COUNT:
        raise InvalidRequest(
            f"field 'env_variables.{GPU_KEY}': expected an integer 0-{MAX_GPU_COUNT},"
            f" got {_shown(raw)}"
        )
    return int(text)


def parse_resources(env: Mapping[str, str]) -> Resources:
    """The resource requests in a create order's `env_variables`; other keys are ignored."""
    cpu = _positive(env, CPU_KEY, MAX_CPU_CORES, "cores")
    if cpu is not None and cpu < MIN_CPU_CORES:
        raise InvalidRequest(f"field 'env_variables.{CPU_KEY}': at least {MIN_CPU_CORES} cores")
    memory_gb = _positive(env, MEMORY_KEY, MAX_MEMORY_GB, "GiB")
    memory_bytes = None if memory_gb is None else int(memory_gb * GIB)
    if memory_bytes is not None and memory_bytes < MIN_MEMORY_BYTES:
        raise InvalidRequest(
            f"field 'env_variables.{MEMORY_KEY}': at least {MIN_MEMORY_BYTES // 1024**2} MiB"
            f" ({MIN_MEMORY_BYTES / GIB:.4f} GiB), as Docker requires"
        )
    return Resources(cpu_cores=cpu, memory_bytes=memory_bytes, gpu_count=_gpu_count(env))


def choose_gpus(count: int, all_gpus: Sequence[str], allocated: Collection[str]) -> tuple[str, ...]:
    """`count` free GPU UUIDs in the host's order, or Conflict; never some of them."""
    if count < 0:
        raise InvalidRequest(f"field 'env_variables.{GPU_KEY}': must not be negative")
    if count == 0:
        return ()
    if not all_gpus:
        raise Conflict(f"this host has no GPU; {GPU_KEY} must be 0")
    taken = frozenset(allocated)
    free = [uuid for uuid in dict.fromkeys(all_gpus) if uuid not in taken]
    if len(free) < count:
        raise Conflict(
            f"{GPU_KEY} asks for {count} GPU(s) but only {len(free)} of"
            f" {len(dict.fromkeys(all_gpus))} on this host are free"
        )
    return tuple(free[:count])


def check_host_holds(resources: Resources, host_cpus: float, host_memory_bytes: int) -> None:
    """Conflict, naming what the host has, for an order larger than the whole host."""
    if resources.cpu_cores is not None and resources.cpu_cores > host_cpus:
        raise Conflict(f"needs {resources.cpu_cores:g} CPU cores, the host has {host_cpus:g}")
    if resources.memory_bytes is not None and resources.memory_bytes > host_memory_bytes:
        raise Conflict(
            f"needs {resources.memory_bytes / 1024**3:g} GB of memory,"
            f" the host has {host_memory_bytes / 1024**3:.1f} GB"
        )
