"""The agent on the Debian 13 VM host against the same on this host, in one run.

Runs two of the agent's own benchmarks twice, here and inside the test VM
(Debian 13, its own kernel on cgroup v2, Docker 26; tests/support/vm.py,
booted once under QEMU):

- `bench/instance_create.py`: POST -> running against `docker run -d` on a
  network like the agent's; its ratio on each host, and the ratio of the two
  ratios (VM / here). Emulation slows the agent and Docker alike, so the
  ratio of ratios, not either absolute figure, says whether the agent's own
  part costs more on the newer host (1.0: the same share).
- `bench/stats_tick.py`: the CPU of one telemetry tick over 8 instances
  (cgroup v1 files here, cgroup v2 there), and VM / here. Emulation slows
  everything by a factor the instance_create floors show, so that slowdown
  is printed beside it.

    .venv/bin/python bench/vm_host.py [--runs N]

Needs root, QEMU and the cached VM image (built on first use by
scripts/vm/build-image.sh), and the local image qudata-test/busybox:1.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.vm import AGENT_DIR, GUEST_ENV, VM, booted  # type: ignore[import-not-found]  # noqa: E402

RATIO = re.compile(r"ratio median\(a\)/median\(b\) = ([0-9.]+)x")
TICK = re.compile(r"^\s+8 \|\s+([0-9.]+) ms", re.MULTILINE)
CREATE = "bench/instance_create.py --runs {runs} --warmup 1"
STATS = "bench/stats_tick.py --ticks 10 --sizes 1,8 --instances 1,8"


def _here(command: str) -> str:
    done = subprocess.run(
        [sys.executable, *command.split()], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return done.stdout + done.stderr


def _there(vm: VM, command: str) -> str:
    return str(vm.code(f"{GUEST_ENV} && python3 {command}", timeout=3600)[1])


def _first(pattern: re.Pattern[str], text: str, what: str) -> float:
    found = pattern.search(text)
    if found is None:
        raise SystemExit(f"no {what} in the output:\n{text[-3000:]}")
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    create = CREATE.format(runs=max(10, args.runs))
    with tempfile.TemporaryDirectory() as tmp, booted(Path(tmp) / "vm") as vm:
        vm.sh("systemctl is-system-running --wait || true; systemctl start docker")
        image = Path(tmp) / "busybox.tar"
        subprocess.run(["docker", "save", "-o", str(image), "qudata-test/busybox:1"], check=True)
        vm.copy_in(image, "/root/busybox.tar")
        vm.sh("docker load -q -i /root/busybox.tar")
        vm.sh(
            f"mkdir -p {AGENT_DIR} && tar -C /src --exclude=./.venv --exclude=./.git -cf - . |"
            f" tar -C {AGENT_DIR} -xf -"
        )
        here_create, vm_create = _here(create), _there(vm, create)
        here_stats, vm_stats = _here(STATS), _there(vm, STATS)
    here_ratio = _first(RATIO, here_create, "create ratio here")
    vm_ratio = _first(RATIO, vm_create, "create ratio in the VM")
    here_tick, vm_tick = _first(TICK, here_stats, "tick"), _first(TICK, vm_stats, "VM tick")
    print("create (POST -> running) against docker run -d on a network like the agent's:")
    print(f"  here (Docker 20.10, cgroup v1): {here_ratio:.3f}x")
    print(f"  VM   (Docker 26, cgroup v2):    {vm_ratio:.3f}x")
    print(f"  ratio of ratios (VM / here):    {vm_ratio / here_ratio:.3f}")
    print("telemetry tick, 8 instances, agent CPU per tick:")
    print(f"  here {here_tick:.2f} ms, VM {vm_tick:.2f} ms: x{vm_tick / here_tick:.1f} (emulation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
