"""Sequential write and read inside an instance: on a volume, on its own layer, on the host.

What it measures (one run, every arm in the same run so the ratios compare
like with like):

- volume: the real `qudata-agent run` (standalone, a temporary state
  directory) makes a 1 GiB volume (`POST /v1/volumes`; on a host whose state
  directory is not on XFS with project quotas that is a loop-mounted ext4
  image) and an instance of `qudata-test/busybox:1` with it at `/vol`;
  `docker exec` runs `dd if=/dev/zero of=/vol/f bs=1M count=N conv=fsync`
  (write), then, after the host's page cache is dropped, `dd if=/vol/f
  of=/dev/null bs=1M` (read);
- layer: the same two `dd`s in the same container on its own writable layer
  (`/layer-f`: overlay2 on this host);
- host (the baseline): the same with the host's `dd` on a file in the same
  directory as the agent's state, so on the disk that holds the volume's
  image.

Throughput is the bytes over each `dd`'s own time (busybox's `time` inside
the container, 10 ms resolution, so the `docker exec` overhead is left out;
the host's `dd` is timed around its process). It prints MB/s per arm and the ratios
volume/host and volume/layer: the overhead of the loop mechanism is
1 - volume/host. Figures are noisy on a shared machine: run it on a quiet
one. Dropping the page cache before each read needs root (`--no-drop` skips
it; the reads then come from memory and measure little).

Everything it makes is removed on the way out (the instance, the volume, the
agent, the temporary directory). Run from the repository root:

    .venv/bin/python bench/volume_io.py [--mb N] [--no-drop] [--agent-log FILE]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import _common
import httpx
from _common import AgentProc, BenchError

IMAGE = "qudata-test/busybox:1"
PORT_RANGE = (24000, 24099)
MIB = 1024**2
_REAL = re.compile(r"real\s+(\d+)m\s*([\d.]+)s")


def _rate(mb: int, seconds: float) -> float:
    return mb * MIB / 1e6 / max(seconds, 1e-3)


def _timed(output: str) -> float:
    """The seconds busybox's `time` reported ("real 0m 1.23s")."""
    found = _REAL.search(output)
    if found is None:
        raise BenchError(f"no time in: {output.strip()}")
    return int(found.group(1)) * 60 + float(found.group(2))


def _drop_caches(drop: bool) -> None:
    if drop:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _in_container(container: str, script: str) -> str:
    done = _common.docker("exec", container, "sh", "-c", f"{script} 2>&1", timeout=600)
    if done.returncode != 0:
        raise BenchError(f"docker exec {script!r}: {done.stdout} {done.stderr}")
    return done.stdout


def _on_host(argv: list[str]) -> float:
    """Runs the command; its wall seconds."""
    started = time.monotonic()
    done = _common.run_cmd(argv, timeout=600)
    took = time.monotonic() - started
    if done.returncode != 0:
        raise BenchError(f"{argv}: {done.stderr}")
    return took


def _arm_in_container(container: str, path: str, mb: int, drop: bool) -> tuple[float, float]:
    fill = f"time dd if=/dev/zero of={path} bs=1M count={mb} conv=fsync"
    write = _rate(mb, _timed(_in_container(container, fill)))
    _drop_caches(drop)
    read = _rate(mb, _timed(_in_container(container, f"time dd if={path} of=/dev/null bs=1M")))
    _in_container(container, f"rm -f {path}")
    return write, read


def _arm_on_host(path: Path, mb: int, drop: bool) -> tuple[float, float]:
    fill = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mb}", "conv=fsync"]
    write = _rate(mb, _on_host(fill))
    _drop_caches(drop)
    read = _rate(mb, _on_host(["dd", f"if={path}", "of=/dev/null", "bs=1M"]))
    path.unlink()
    return write, read


def _instance_with_volume(client: httpx.Client) -> tuple[str, str]:
    """(volume id, container id) of a running instance with a fresh 1 GiB volume at /vol."""
    made = client.post("/v1/volumes", json={"size_gb": 1})
    if made.status_code != 201:
        raise BenchError(f"POST /v1/volumes: {made.text}")
    volume_id = made.json()["data"]["volume_id"]
    body = {"image": IMAGE, "volumes": {volume_id: "/vol"}}
    created = client.post("/v1/instances", json=body)
    if created.status_code != 202:
        raise BenchError(f"POST /v1/instances: {created.text}")
    instance_id = created.json()["data"]["instance_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = client.get(f"/v1/instances/{instance_id}").json()["data"]
        if state["status"] == "running":
            return volume_id, state["container_id"]
        time.sleep(0.1)
    raise BenchError("the instance did not run within 60 s")


def _report(arms: dict[str, tuple[float, float]], mb: int) -> None:
    print(f"sequential dd of {mb} MiB, MB/s (one run; noisy on a shared machine)")
    print(f"{'arm':<8}{'write':>10}{'read':>10}")
    for name, (write, read) in arms.items():
        print(f"{name:<8}{write:>10.1f}{read:>10.1f}")
    vol, host, layer = arms["volume"], arms["host"], arms["layer"]
    print(f"volume/host   write {vol[0] / host[0]:.2f}x  read {vol[1] / host[1]:.2f}x")
    print(f"volume/layer  write {vol[0] / layer[0]:.2f}x  read {vol[1] / layer[1]:.2f}x")


def run(mb: int, drop: bool, agent_log: Path | None) -> int:
    _common.docker_version()
    _common.need_images(IMAGE)
    with tempfile.TemporaryDirectory(prefix="qudata-bench-vol-") as work:
        agent = AgentProc(Path(work), PORT_RANGE, env={"QUDATA_MAX_INSTANCES": "1"})
        client: httpx.Client | None = None
        problems: list[str] = []
        try:
            agent.start()
            agent.wait_ready()
            client = agent.client()
            volume_id, container = _instance_with_volume(client)
            arms = {
                "volume": _arm_in_container(container, "/vol/f", mb, drop),
                "layer": _arm_in_container(container, "/layer-f", mb, drop),
                "host": _arm_on_host(Path(work) / "host-f", mb, drop),
            }
            _report(arms, mb)
            client.delete("/instances", timeout=60)
            gone = client.delete(f"/v1/volumes/{volume_id}", timeout=60)
            if gone.status_code != 200:
                problems.append(f"DELETE /v1/volumes: {gone.text}")
        finally:
            _common.keep_log(agent, agent_log)
            with _common.signals_ignored():
                problems += _common.teardown(agent, client, set(), None)
                # A volume left mounted (an error before its DELETE) goes with the directory.
                _common.run_cmd(["sh", "-c", f"umount {work}/state/volumes/*/mnt 2>/dev/null"])
    return _common.exit_code(0, problems)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="MiB each dd writes (default 256)")
    parser.add_argument("--no-drop", action="store_true", help="keep the page cache for reads")
    parser.add_argument("--agent-log", type=Path, default=None, help="keep the agent's log here")
    args = parser.parse_args()
    if not 16 <= args.mb <= 900:
        parser.error("--mb must be 16-900 (the volume is 1 GiB)")
    _common.interrupt_on_signals()
    try:
        return run(args.mb, not args.no_drop, args.agent_log)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
