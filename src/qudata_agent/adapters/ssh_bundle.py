"""The agent's SSH bundle: the host's own OpenSSH server, made to run in any container.

Owns `<state>/ssh/bundles/`, mounted read-only into every SSH-enabled
container at `BUNDLE_MOUNT`. Each build is a directory named by a hash of
what went into it (the host's sshd, util-linux's setpriv, the static busybox,
the init script and the layout), so it is made once and made again only when
one of those changes (an OpenSSH update of the host, say); `current` is a
relative symlink to the newest. What stays true:
- sshd and setpriv come with every library `ldd` names and with the ELF
  loader; their interpreter and RUNPATH (and every library's RUNPATH) point
  into the build's in-container path, so they load nothing from the image,
  whatever its libc, and sshd's re-exec of itself finds the same files;
- busybox is static (it runs the init, and the idle command, in any image);
- a build appears whole or not at all (built aside, then renamed); older
  builds stay, since a running container may still use one (a container's
  next start runs the newest: the init follows `current`);
- everything in it is public (0755/0644): no key, no secret.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qudata_agent.domain.ssh_init import INIT_SCRIPT
from qudata_agent.domain.ssh_setup import BUNDLE_MOUNT
from qudata_agent.errors import AgentError

log = logging.getLogger(__name__)

LAYOUT = "1"  # bump when the bundle's layout changes: a new build follows
DONE = ".complete"
SSHD = Path("/usr/sbin/sshd")
SETPRIV = Path("/usr/bin/setpriv")
# OpenSSH 9.8 and later split sshd: it execs these (Debian 13 has them; Debian 12
# and Ubuntu 22.04/24.04 do not). Bundled when present; the init points sshd at them.
HELPERS = (Path("/usr/lib/openssh/sshd-session"), Path("/usr/lib/openssh/sshd-auth"))
BUSYBOXES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
# platform.machine() -> Docker's name for the architecture
_DOCKER_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


class BundleError(AgentError):
    """The SSH bundle cannot be made on this host; the message says what to install."""


@dataclass(frozen=True)
class Bundle:
    bundles_dir: Path  # the host directory mounted at BUNDLE_MOUNT
    key: str  # the build `current` names
    arch: str  # Docker's name of the architecture it serves


def host_arch() -> str:
    machine = platform.machine()
    return _DOCKER_ARCH.get(machine, machine)


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except OSError as e:
        raise BundleError(f"cannot run {argv[0]}: {e.strerror}") from e
    if done.returncode != 0:
        raise BundleError(f"{' '.join(argv)} failed: {done.stderr.strip()[-300:]}")
    return done.stdout


def _libraries(binary: Path) -> dict[str, Path]:
    """soname -> file, for every library `ldd` says the binary loads (the loader aside)."""
    found: dict[str, Path] = {}
    for line in _run(["ldd", str(binary)]).splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        if not arrow:
            continue  # the vdso, or the loader's own line
        target = rest.split(" (")[0].strip()
        if target == "not found" or not target.startswith("/"):
            raise BundleError(f"{binary} needs {name}, which the host does not have")
        found[name] = Path(target)
    return found


class SshBundle:
    def __init__(
        self,
        root: Path,
        sshd: Path = SSHD,
        setpriv: Path = SETPRIV,
        busybox: Path | None = None,
        patchelf: str = "patchelf",
        helpers: tuple[Path, ...] = HELPERS,
    ) -> None:
        self._dir = root
        self._binaries = {"sshd": sshd, "setpriv": setpriv}
        self._helpers = helpers
        self._busybox = busybox
        self._patchelf = patchelf

    def _sources(self) -> tuple[dict[str, Path], Path]:
        for name, path in self._binaries.items():
            if not path.is_file():
                package = "openssh-server" if name == "sshd" else "util-linux"
                raise BundleError(f"the host has no {path}: install {package}")
        busybox = self._busybox or next((p for p in BUSYBOXES if p.is_file()), None)
        if busybox is None:
            raise BundleError("the host has no static busybox: install busybox-static")
        if shutil.which(self._patchelf) is None:
            raise BundleError(f"the host has no {self._patchelf}: install patchelf")
        try:  # patchelf finds no interpreter in a static binary
            _run([self._patchelf, "--print-interpreter", str(busybox)])
        except BundleError:
            helpers = {p.name: p for p in self._helpers if p.is_file()}
            return {**self._binaries, **helpers}, busybox
        raise BundleError(f"{busybox} is not static: install busybox-static")

    def _key(self, files: list[Path]) -> str:
        digest = hashlib.sha256(f"layout {LAYOUT}\n{INIT_SCRIPT}".encode())
        for path in files:
            digest.update(path.read_bytes())
        return digest.hexdigest()[:16]

    def ensure(self) -> Bundle:
        """The current build, made first when the host's binaries changed (blocks: seconds)."""
        binaries, busybox = self._sources()
        key = self._key([*binaries.values(), busybox])
        final = self._dir / key
        if not (final / DONE).is_file():
            self._build(key, binaries, busybox)
            log.info("ssh bundle built", extra={"path": str(final)})
        link = self._dir / f".current-{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(key)
        os.replace(link, self._dir / "current")
        return Bundle(self._dir, key, host_arch())

    def _build(self, key: str, binaries: dict[str, Path], busybox: Path) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._dir.chmod(0o755)
        work = self._dir / f".build-{key}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        try:
            self._lay_out(work, key, binaries, busybox)
            shutil.rmtree(self._dir / key, ignore_errors=True)  # a build cut short
            os.replace(work, self._dir / key)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _lay_out(self, work: Path, key: str, binaries: dict[str, Path], busybox: Path) -> None:
        bin_dir, lib_dir = work / "bin", work / "lib"
        bin_dir.mkdir(parents=True)
        lib_dir.mkdir()
        inside = f"{BUNDLE_MOUNT}/{key}/lib"
        libraries: dict[str, Path] = {}
        interpreter = ""
        for name, source in binaries.items():
            shutil.copyfile(source, bin_dir / name)
            libraries.update(_libraries(source))
            interpreter = _run([self._patchelf, "--print-interpreter", str(source)]).strip()
        loader = Path(interpreter).name
        shutil.copyfile(interpreter, lib_dir / loader)
        for soname, source in libraries.items():
            shutil.copyfile(source, lib_dir / soname)
            _run([self._patchelf, "--set-rpath", inside, str(lib_dir / soname)])
        for name in binaries:
            target = str(bin_dir / name)
            _run([self._patchelf, "--set-interpreter", f"{inside}/{loader}", target])
            _run([self._patchelf, "--set-rpath", inside, target])
        shutil.copyfile(busybox, bin_dir / "busybox")
        (work / "init.sh").write_text(INIT_SCRIPT)
        for path in (work, bin_dir, lib_dir, *bin_dir.iterdir(), *lib_dir.iterdir()):
            path.chmod(0o755)
        (work / "init.sh").chmod(0o644)
        (work / DONE).write_text(f"{key}\n")
