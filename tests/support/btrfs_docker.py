"""A second Docker daemon on a loop-mounted btrfs file: a host whose driver caps container sizes.

For the storage quota tests. Everything it makes lives in one work directory
under /var/tmp (`qudata-btrfs-*`), and what it made outside that directory (the
loop device, the bridge, the daemon's pid) is written to `state.json` there
as soon as it exists, so `cleanup` can undo exactly that: after the tests,
after a failed start, or later for a run that was killed (`sweep_leftovers`,
called by every start, cleans directories whose owner process is gone).

What stays true: the main daemon is never touched (only `docker save` of a test
image is asked of it). The second daemon has its own socket, data root (on
the btrfs mount), exec root (so its own containerd), pidfile, an empty config
file (so /etc/docker/daemon.json is not read), containerd namespaces, and its
own bridge with an address in 10.213.0.0/16; networks it makes come from a
pool inside 10.213.0.0/16 too, so none can overlap docker0 or the agent's
network (an agent run against it names its network's bridge
`network_bridge`, which cleanup removes as well). It runs with
`--iptables=false --ip-masq=false --ip-forward=false`: it never edits the
host's firewall or forwarding. Never `--bridge none`: that deletes the main
daemon's docker0.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORK_PARENT = Path("/var/tmp")
PREFIX = "qudata-btrfs-"
DISK_BYTES = 6 * 1024**3  # sparse: only what is written takes space
BRIDGE_PREFIX = "qdbr"
IMAGE = "qudata-test/busybox:1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


def _run(*argv: str, check: bool = True, timeout: float = 60) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _ok(argv: list[str]) -> bool:
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def _alive(pid: int | None, marker: str) -> bool:
    """Whether `pid` runs and its command line holds `marker` (a reused pid does not count)."""
    if not pid:
        return False
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _mounts_under(path: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == str(path) or point.startswith(f"{path}/"):
            points.append(point)
    return sorted(points, key=len, reverse=True)  # deepest first


@dataclass
class BtrfsDocker:
    work: Path

    @property
    def host(self) -> str:
        """The daemon's address, for DockerEngine(base_url=...) or DOCKER_HOST."""
        return f"unix://{self.work / 'docker.sock'}"

    @property
    def network_bridge(self) -> str:
        """A bridge name for a network an agent makes on this daemon (removed by cleanup)."""
        return str(self.state["network_bridge"])

    @property
    def data_root(self) -> Path:
        return self.work / "mnt" / "data"

    @property
    def state(self) -> dict[str, Any]:
        return _load_state(self.work)

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return _run("docker", "-H", self.host, *args, check=check, timeout=timeout)

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[BtrfsDocker]:
        daemon = cls.start()
        try:
            yield daemon
        finally:
            problems = cleanup(daemon.work)
            if problems:
                warnings.warn(f"btrfs dockerd cleanup: {'; '.join(problems)}", stacklevel=1)

    @classmethod
    def start(cls) -> BtrfsDocker:
        sweep_leftovers()
        work = Path(tempfile.mkdtemp(prefix=PREFIX, dir=WORK_PARENT))
        _save_state(work, owner=os.getpid())
        try:
            daemon = cls(work)
            daemon._make_disk()
            daemon._make_bridge()
            daemon._start_daemon()
            daemon._load_image()
        except BaseException:
            cleanup(work)
            raise
        return daemon

    def _make_disk(self) -> None:
        disk = self.work / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(DISK_BYTES)
        _run("mkfs.btrfs", "-q", "-f", str(disk))
        loop = _run("losetup", "--find", "--show", str(disk)).strip()
        _save_state(self.work, loop=loop)
        (self.work / "mnt").mkdir()
        _run("mount", loop, str(self.work / "mnt"))

    def _make_bridge(self) -> None:
        for n in range(100):
            name = f"{BRIDGE_PREFIX}{n}"
            made = subprocess.run(
                ["ip", "link", "add", "name", name, "type", "bridge"],
                capture_output=True,
                check=False,
            )
            if made.returncode == 0:
                _save_state(self.work, bridge=name, subnet_index=n, network_bridge=f"qdsb{n}")
                _run("ip", "addr", "add", f"10.213.{n}.1/24", "dev", name)
                return
        raise RuntimeError("no free bridge name qdbr0-qdbr99")

    def _start_daemon(self) -> None:
        n = self.state["subnet_index"]
        (self.work / "daemon.json").write_text("{}")
        argv = [
            "dockerd",
            "-H",
            self.host,
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.work / "exec"),
            "--pidfile",
            str(self.work / "docker.pid"),
            "--config-file",
            str(self.work / "daemon.json"),
            "--storage-driver",
            "btrfs",
            "--bridge",
            self.state["bridge"],
            "--default-address-pool",
            f"base=10.213.{128 + n}.0/24,size=28",
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--containerd-namespace",
            f"qudata-btrfs-{n}",
            "--containerd-plugins-namespace",
            f"qudata-btrfs-{n}-plugins",
        ]
        with open(self.work / "dockerd.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _save_state(self.work, daemon_pid=proc.pid)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {proc.returncode}:\n{self._log_tail()}")
            if self.docker("version", "--format", "{{.Server.Version}}", check=False).strip():
                return
            time.sleep(0.1)
        raise RuntimeError(f"dockerd did not answer in {START_TIMEOUT_S:g} s:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        text = (self.work / "dockerd.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-20:])

    def _load_image(self) -> None:
        save = subprocess.Popen(["docker", "save", IMAGE], stdout=subprocess.PIPE)
        try:
            load = subprocess.run(
                ["docker", "-H", self.host, "load"],
                stdin=save.stdout,
                capture_output=True,
                timeout=60,
                check=False,
            )
        finally:
            if save.stdout is not None:
                save.stdout.close()
            save.wait(60)
        if save.returncode != 0 or load.returncode != 0:
            raise RuntimeError(f"loading {IMAGE} failed: {load.stderr.decode(errors='replace')}")


def _state_file(work: Path) -> Path:
    return work / "state.json"


def _load_state(work: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(_state_file(work).read_text())
    except (OSError, ValueError):
        return {}
    return state


def _save_state(work: Path, **changes: Any) -> None:
    state = {**_load_state(work), **changes}
    path = _state_file(work)
    path.with_suffix(".tmp").write_text(json.dumps(state))
    path.with_suffix(".tmp").replace(path)


def _stop_daemon(work: Path, state: dict[str, Any]) -> None:
    pid = state.get("daemon_pid")
    if not _alive(pid, str(work)):
        return
    host = f"unix://{work / 'docker.sock'}"
    ids = _run("docker", "-H", host, "ps", "-aq", check=False, timeout=20).split()
    if ids:
        _run("docker", "-H", host, "rm", "-f", "-v", *ids, check=False, timeout=60)
    # A user network's bridge outlives the daemon: remove the networks while it runs.
    _run("docker", "-H", host, "network", "prune", "-f", check=False, timeout=20)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid, str(work)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for leftover in (pid, _containerd_pid(work)):
        if _alive(leftover, str(work)):
            os.kill(leftover, signal.SIGKILL)


def _containerd_pid(work: Path) -> int | None:
    try:
        return int((work / "exec" / "containerd" / "containerd.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _loop_backs(loop: str, work: Path) -> bool:
    """Whether loop device `loop` is (still) backed by a file in `work`."""
    listing = _run("losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE", check=False)
    for line in listing.splitlines():
        name, _, back = line.strip().partition(" ")
        if name == loop and back.strip().startswith(f"{work}/"):
            return True
    return False


def cleanup(work: Path) -> list[str]:
    """Undoes everything a start made in and for `work`; the problems it could not fix."""
    state = _load_state(work)
    problems: list[str] = []
    try:
        _stop_daemon(work, state)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        problems.append(f"stopping dockerd: {e}")
    for point in _mounts_under(work):
        if not _ok(["umount", point]):
            _ok(["umount", "-l", point])  # busy: detached now, freed by the kernel later
    loop = state.get("loop")
    detach = ["losetup", "-d", str(loop)]
    detached = not (loop and _loop_backs(loop, work)) or _ok(detach)
    if not detached:
        problems.append(f"could not detach {loop}")
    for key in ("bridge", "network_bridge"):
        bridge = state.get(key)
        if bridge and Path(f"/sys/class/net/{bridge}").exists():
            _run("ip", "link", "del", bridge, check=False)
    if _mounts_under(work):
        problems.append(f"mounts remain under {work}; left in place")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return problems


def sweep_leftovers() -> None:
    """Cleans the work directories of earlier runs whose test process is gone."""
    for work in WORK_PARENT.glob(f"{PREFIX}*"):
        owner = _load_state(work).get("owner")
        if owner is None and time.time() - work.stat().st_mtime < 60:
            continue  # being set up right now by another run
        if work.is_dir() and not (owner and Path(f"/proc/{owner}").exists()):
            cleanup(work)
