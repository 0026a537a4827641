"""A real image registry on loopback: Debian's `docker-registry` (the CNCF distribution registry).

For the image tests (private images, moving tags, pre-pulls). It listens on
127.0.0.1 at a free port with htpasswd authentication (bcrypt, written by
`htpasswd -B`), stores its blobs in a temporary directory, and writes its
access log to a file the tests read to count manifest requests and pulls.
Docker treats 127.0.0.0/8 registries as insecure, so plain HTTP works.

Images are pushed with the docker CLI under a temporary DOCKER_CONFIG (its
own `docker login`), so the host's ~/.docker is never touched. Every image
tag a test pushes or pulls is named under `host` (127.0.0.1:PORT/...), which
no other test or user shares, and `remove_local` removes exactly those.

What stays true: everything it starts or writes is undone by `stop` (the
registry process is killed by its pid, never by name).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BASE_IMAGE = "qudata-test/busybox:1"
USER = "renter"
START_TIMEOUT_S = 20.0

_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""
_AUTH = """\
auth:
  htpasswd:
    realm: qudata-test
    path: {htpasswd}
"""
# The access log's request line: "METHOD /v2/... HTTP/1.1" STATUS
_ACCESS = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (/v2/\S*) HTTP/[0-9.]+" (\d{3})')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*argv: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@dataclass
class Request:
    method: str
    path: str
    status: int


@dataclass
class Registry:
    work: Path
    port: int
    password: str = field(repr=False)
    proc: subprocess.Popen[bytes] | None = None
    user: str = USER
    private: bool = True  # False: anyone may pull (and push) without credentials

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def allow_env(self) -> dict[str, str]:
        """What an agent needs to be let send Docker to this loopback registry."""
        return {"QUDATA_REGISTRY_ALLOW": self.host}

    @property
    def log_path(self) -> Path:
        return self.work / "registry.log"

    @property
    def docker_env(self) -> dict[str, str]:
        """The environment for docker CLI calls: a DOCKER_CONFIG of its own."""
        return {**os.environ, "DOCKER_CONFIG": str(self.work / "docker-config")}

    def credentials(self, password: str | None = None) -> dict[str, str]:
        """The create body's registry fields (`password` None: the right one)."""
        return {
            "registry": self.host,
            "login": self.user,
            "password": self.password if password is None else password,
        }

    # -- life ----------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def running(cls, private: bool = True) -> Iterator[Registry]:
        registry = cls.start(private)
        try:
            yield registry
        finally:
            registry.stop()

    @classmethod
    def start(cls, private: bool = True) -> Registry:
        work = Path(tempfile.mkdtemp(prefix="qudata-registry-"))
        registry = cls(work, _free_port(), password=f"pw-{uuid.uuid4().hex}", private=private)
        try:
            registry._launch()
            (work / "docker-config").mkdir(mode=0o700)
            if private:
                registry._login()
        except BaseException:
            registry.stop()
            raise
        return registry

    def _launch(self) -> None:
        htpasswd = self.work / "htpasswd"
        _run("htpasswd", "-B", "-b", "-c", str(htpasswd), self.user, self.password)
        config = self.work / "config.yml"
        text = _CONFIG.format(data=self.work / "data", port=self.port)
        if self.private:
            text += _AUTH.format(htpasswd=htpasswd)
        config.write_text(text)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited:\n{self.log_path.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.05)
        raise RuntimeError(f"docker-registry did not listen in {START_TIMEOUT_S:g} s")

    def _login(self) -> None:
        _run(
            "docker",
            "login",
            "--username",
            self.user,
            "--password-stdin",
            self.host,
            env=self.docker_env,
            stdin=self.password,
        )

    def pause(self) -> None:
        """Makes the registry unreachable (SIGSTOP would hang; this refuses at once)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)

    def resume(self) -> None:
        self._launch()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.remove_local()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- images ----------------------------------------------------------------------

    def push_new(self, name: str, tag: str = "1", extra_bytes: int = 0) -> tuple[str, str]:
        """Pushes a new small image (the busybox test image and one small layer of its
        own, with `extra_bytes` of random data) as `name:tag`; returns (reference,
        manifest digest). The local tag is removed, so whoever wants it must pull it."""
        ref = f"{self.host}/{name}:{tag}"
        build = self.work / f"build-{uuid.uuid4().hex}"
        build.mkdir()
        (build / "unique").write_bytes(uuid.uuid4().hex.encode() + os.urandom(extra_bytes))
        (build / "Dockerfile").write_text(f"FROM {BASE_IMAGE}\nCOPY unique /unique\n")
        env = {**self.docker_env, "DOCKER_BUILDKIT": "0"}
        _run("docker", "build", "-q", "-t", ref, str(build), env=env)
        out = _run("docker", "push", ref, env=self.docker_env)
        found = re.search(r"digest: (sha256:[0-9a-f]{64})", out)
        assert found, out
        _run("docker", "rmi", ref, env=self.docker_env)
        return ref, found.group(1)

    def remove_local(self) -> None:
        """Removes every local image named under this registry (and only those)."""
        listing = subprocess.run(
            ["docker", "images", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for line in listing.splitlines():
            ref, _, image_id = line.partition(" ")
            if ref.startswith(f"{self.host}/"):
                target = image_id if ref.endswith(":<none>") else ref
                subprocess.run(["docker", "rmi", "-f", target], capture_output=True, check=False)

    # -- what it was asked -----------------------------------------------------------------

    def requests(self) -> list[Request]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [Request(m, p, int(s)) for m, p, s in _ACCESS.findall(text)]

    def manifest_requests(self, name: str) -> int:
        """Requests (HEAD or GET) for `name`'s manifests, answered or not."""
        return sum(1 for r in self.requests() if r.path.startswith(f"/v2/{name}/manifests/"))

    def blob_gets(self, name: str) -> int:
        """Blob downloads of `name` that succeeded: a pull fetches its own layer, a
        registry check at most the config."""
        return sum(
            1
            for r in self.requests()
            if r.method == "GET" and r.path.startswith(f"/v2/{name}/blobs/") and r.status == 200
        )
