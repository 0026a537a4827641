"""The Debian 13 test VM under QEMU: boot, run commands over SSH, shut down.

The image comes from `scripts/vm/build-image.sh` (built once, cached). Each
boot writes only to a fresh qcow2 overlay over the cached base image, so every
test session starts from the same clean host. QEMU's user network gives the
guest outbound access (the Debian mirror, PyPI) and forwards chosen loopback
ports in; nothing else reaches the guest. The checkout is shared read-only
over 9p at /src. With `-accel tcg` (software emulation) everything in the
guest runs several times slower than here: timeouts are sized for that.

The emulated CPU is a named x86-64-v2 model, not `-cpu max`: the trixie kernel
panicked at boot now and then under `-cpu max` (an oops in the scheduler on a
secondary CPU, on code the kernel patches at run time), and the newest
features `max` exposes are the ones TCG emulates least well. TCG keeps one
thread per vCPU: with one thread for both, a Docker call in the guest
outlasted the agent's 30 s Docker call timeout on a busy host. A boot whose
console still shows a kernel panic is tried once more, the console kept and
named.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VM_DIR = Path(os.environ.get("QUDATA_VM_DIR", "/var/cache/qudata-test-vm"))
# x86-64-v2 (what Debian's packages may assume and more than the kernel needs), no more.
CPU_MODEL = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16"
BOOT_TRIES = 2  # a boot whose console shows a kernel panic is tried once more
AGENT_DIR = "/root/agent"  # the guest's copy of the checkout
GUEST_ENV = (
    f"cd {AGENT_DIR} && export QUDATA_IN_VM=1 PYTHONPATH={AGENT_DIR}/src"
    " PATH=/opt/qudata-test-venv/bin:$PATH"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_image() -> None:
    subprocess.run(["bash", str(REPO / "scripts/vm/build-image.sh"), str(VM_DIR)], check=True)


@dataclass
class VM:
    work: Path
    ssh_port: int
    forwards: dict[int, int] = field(default_factory=dict)  # guest port -> host port
    proc: subprocess.Popen[bytes] | None = None

    @property
    def console(self) -> Path:
        return self.work / "console.log"

    def _ssh_args(self) -> list[str]:
        return [
            "ssh", "-i", str(VM_DIR / "id_ed25519"), "-p", str(self.ssh_port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", "-o", "BatchMode=yes",
            "root@127.0.0.1",
        ]  # fmt: skip

    def code(self, script: str, timeout: float = 600, stdin: str = "") -> tuple[int, str]:
        done = subprocess.run(
            [*self._ssh_args(), f"bash -c {_quote('{ ' + script + ' ; } 2>&1')}"],
            input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        return done.returncode, done.stdout + done.stderr

    def sh(self, script: str, timeout: float = 600, stdin: str = "") -> str:
        code, out = self.code(script, timeout, stdin)
        if code != 0:
            raise AssertionError(f"exit {code} in the VM: {script}\n{out[-4000:]}")
        return out

    def copy_in(self, local: Path, remote: str, timeout: float = 600) -> None:
        with local.open("rb") as f:
            done = subprocess.run(
                [*self._ssh_args(), f"cat > {_quote(remote)}"],
                stdin=f, capture_output=True, timeout=timeout, check=False,
            )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"copy of {local} into the VM failed: {done.stderr!r}")

    def wait_ssh(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"QEMU exited:\n{self.console.read_text()[-3000:]}")
            if self.code("true", timeout=20)[0] == 0:
                return
            time.sleep(2)
        raise AssertionError(f"the VM's sshd did not answer:\n{self.console.read_text()[-3000:]}")


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def qemu_command(vm: VM, overlay: Path, memory_mb: int, cpus: int) -> list[str]:
    fwd = ",".join(
        [f"hostfwd=tcp:127.0.0.1:{vm.ssh_port}-:22"]
        + [f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in vm.forwards.items()]
    )
    return [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", CPU_MODEL,
        "-m", str(memory_mb), "-smp", str(cpus), "-nographic", "-no-reboot",
        "-kernel", str(VM_DIR / "vmlinuz"), "-initrd", str(VM_DIR / "initrd.img"),
        "-append", "root=/dev/vda rw console=ttyS0 panic=-1 quiet",
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-netdev", f"user,id=n0,{fwd}", "-device", "virtio-net-pci,netdev=n0",
        "-virtfs", f"local,path={REPO},mount_tag=src,security_model=none,readonly=on",
        "-serial", f"file:{vm.console}", "-monitor", "none",
    ]  # fmt: skip


def _panicked(console: Path) -> bool:
    return console.exists() and "Kernel panic" in console.read_text(errors="replace")


def _start(work: Path, forwards: tuple[int, ...], memory_mb: int, cpus: int) -> VM:
    """QEMU started on a fresh overlay and answering SSH; raises if it did not come up."""
    overlay = work / "overlay.qcow2"
    overlay.unlink(missing_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
         "-b", str(VM_DIR / "base.img"), str(overlay)],
        check=True,
    )  # fmt: skip
    vm = VM(work=work, ssh_port=_free_port(), forwards={g: _free_port() for g in forwards})
    vm.proc = subprocess.Popen(
        qemu_command(vm, overlay, memory_mb, cpus),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        vm.wait_ssh()
    except BaseException:
        _power_off(vm)
        raise
    return vm


def _power_off(vm: VM) -> None:
    assert vm.proc is not None
    if vm.proc.poll() is None:
        vm.code("systemctl poweroff", timeout=20)
        try:
            vm.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            vm.proc.kill()
            vm.proc.wait()


@contextmanager
def booted(
    work: Path, forwards: tuple[int, ...] = (), memory_mb: int = 4096, cpus: int = 2
) -> Iterator[VM]:
    """Boots the VM on a fresh overlay; powers it off (and kills QEMU) at the end."""
    build_image()
    work.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, BOOT_TRIES + 1):
        try:
            vm = _start(work, forwards, memory_mb, cpus)
            break
        except AssertionError:
            console = work / "console.log"
            if attempt == BOOT_TRIES or not _panicked(console):
                raise
            kept = work.parent / f"{work.name}-panic-{attempt}.log"
            shutil.copy(console, kept)
            print(f"the VM's kernel panicked at boot (console: {kept}); booting again",
                  file=sys.stderr)  # fmt: skip
    try:
        yield vm
    finally:
        _power_off(vm)
        shutil.rmtree(work, ignore_errors=True)


def guest_pytest(vm: VM, *args: str, timeout: float = 1800) -> str:
    """Runs pytest inside the VM on the guest's checkout; fails with its output."""
    code, out = vm.code(
        f"{GUEST_ENV} && pytest -q -p no:cacheprovider -o addopts='-ra --import-mode=importlib'"
        f" {' '.join(args)}",
        timeout=timeout,
    )
    print(out[-6000:])
    assert code == 0, out[-12000:]
    return out
