"""Resource requests: what a create order asks for in its `env_variables`.

Owns `Resources` (the CPU, memory and GPU counts) and `parse_resources`
(reads and checks them). Which GPUs and CPUs an instance gets is decided by
`domain.placement`.

What stays true: `cpu_cores` and `memory_bytes` are None (not named) or
finite, positive and within range; `gpu_count` is an integer 0-64 (absent: 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from qudata_agent.errors import InvalidRequest

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
