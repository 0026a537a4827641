"""Image pulls through the Docker adapter against the real engine.

No outside registry is reachable here, so the registries are local: a port
that refuses, a TCP server that accepts and never answers, and a small fake
registry (HTTP, Docker's v2 protocol) serving a one-layer image built in the
test, which can require basic auth or stall in the middle of the layer.
Docker treats 127.0.0.0/8 registries as insecure, so plain HTTP works.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import docker
import docker.errors
import pytest

from qudata_agent.adapters.docker import DockerEngine, DockerError, PullProgress
from qudata_agent.adapters.docker.progress import (
    PullTally,
    auth_config,
)
from qudata_agent.domain.image_ref import parse_reference
from qudata_agent.domain.registry_credentials import RegistryCredentials

pytestmark = pytest.mark.docker

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


# -- pure parts ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("busybox", ("busybox", "latest")),
        ("busybox:1.36", ("busybox", "1.36")),
        ("library/busybox:1", ("library/busybox", "1")),
        ("reg.example:5000/team/img", ("reg.example:5000/team/img", "latest")),
        ("reg.example:5000/team/img:2", ("reg.example:5000/team/img", "2")),
        ("localhost:5000/img@sha256:abc", ("localhost:5000/img", "sha256:abc")),
        ("img:tag@sha256:abc", ("img", "sha256:abc")),
        ("127.0.0.1:1/nothing:1", ("127.0.0.1:1/nothing", "1")),
    ],
)
def test_split_reference(ref: str, expected: tuple[str, str]) -> None:
    parsed = parse_reference(ref)
    assert (parsed.repository, parsed.pin) == expected


def test_registry_of_and_auth_config() -> None:
    assert parse_reference("busybox").server == "docker.io"
    assert parse_reference("team/img").server == "docker.io"
    assert parse_reference("reg.example:5000/team/img").server == "reg.example:5000"
    assert parse_reference("localhost/img").server == "localhost"
    auth = RegistryCredentials("u", "hunter2-secret", None)
    assert auth_config(auth, parse_reference("reg.example/img"))["serveraddress"] == "reg.example"
    assert "hunter2-secret" not in repr(auth)


def test_tally_sums_layers_and_never_goes_back() -> None:
    messages: list[dict[str, Any]] = [
        {"status": "Pulling from team/img", "id": "1"},
        {"status": "Pulling fs layer", "progressDetail": {}, "id": "a"},
        {"status": "Already exists", "progressDetail": {}, "id": "b"},
        {"status": "Downloading", "progressDetail": {"current": 50, "total": 100}, "id": "a"},
        {"status": "Download complete", "progressDetail": {}, "id": "a"},
        {"status": "Extracting", "progressDetail": {"current": 10, "total": 100}, "id": "a"},
        {"status": "Pull complete", "progressDetail": {}, "id": "a"},
        {"status": "Digest: sha256:abc"},
    ]
    tally = PullTally()
    reports = [p for p in map(tally.feed, messages) if p is not None]
    assert reports[0] == PullProgress(0, 0, 0, 1)
    assert reports[-1] == PullProgress(100, 100, 2, 2)
    done = [p.bytes_done for p in reports]
    assert done == sorted(done)
    assert PullProgress(50, 100, 1, 2) in reports


# -- local registries --------------------------------------------------------------


@dataclass
class Image:
    """A one-layer image, as a registry stores it."""

    manifest: bytes
    blobs: dict[str, bytes]
    layer_size: int

    @classmethod
    def build(cls, payload_bytes: int) -> Image:
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w") as tar:
            info = tarfile.TarInfo("payload.bin")
            info.size = payload_bytes
            tar.addfile(info, io.BytesIO(os.urandom(payload_bytes)))
        layer_tar = data.getvalue()
        layer = gzip.compress(layer_tar, compresslevel=1)
        config = json.dumps(
            {
                "architecture": "amd64",
                "os": "linux",
                "config": {},
                "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
                "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "test"}],
            }
        ).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "size": len(config),
                    "digest": _digest(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "size": len(layer),
                        "digest": _digest(layer),
                    }
                ],
            }
        ).encode()
        blobs = {_digest(config): config, _digest(layer): layer}
        return cls(manifest, blobs, len(layer))


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeRegistry:
    image: Image
    credentials: tuple[str, str] | None = None  # required basic auth
    stall_after: int | None = None  # bytes of the layer sent before going silent
    seen_auth: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    def authorized(self, header: str | None) -> bool:
        if header:
            self.seen_auth.append(header)
        if self.credentials is None:
            return True
        user, password = self.credentials
        return header == "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _handler(registry: FakeRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(code)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            if not registry.authorized(self.headers.get("Authorization")):
                challenge = {"WWW-Authenticate": 'Basic realm="fake"'}
                self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', challenge)
            elif self.path == "/v2/":
                self._send(200, b"{}", {"Content-Type": "application/json"})
            elif "/manifests/" in self.path:
                headers = {
                    "Content-Type": MANIFEST_TYPE,
                    "Docker-Content-Digest": _digest(registry.image.manifest),
                }
                self._send(200, registry.image.manifest, headers)
            elif "/blobs/" in self.path:
                self._blob(self.path.rsplit("/", 1)[-1])
            else:
                self._send(404, b"{}", {})

        do_HEAD = do_GET

        def _blob(self, digest: str) -> None:
            blob = registry.image.blobs.get(digest)
            if blob is None:
                self._send(404, b"{}", {})
                return
            is_layer = len(blob) == registry.image.layer_size
            if registry.stall_after is None or not is_layer or self.command == "HEAD":
                self._send(200, blob, {"Content-Type": "application/octet-stream"})
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob[: registry.stall_after])
            self.wfile.flush()
            registry.release.wait(60)  # silent until the test ends

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeRegistry]]:
    servers: list[tuple[ThreadingHTTPServer, FakeRegistry]] = []

    def start(registry: FakeRegistry) -> FakeRegistry:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(registry))
        server.daemon_threads = True
        registry.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((server, registry))
        return registry

    yield start
    for server, registry in servers:
        registry.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def engine() -> Iterator[DockerEngine]:
    engine = DockerEngine()
    yield engine
    engine.close()


@pytest.fixture
def pulled() -> Iterator[list[str]]:
    """Image refs to remove after the test."""
    refs: list[str] = []
    yield refs
    sdk = docker.DockerClient(base_url="unix:///var/run/docker.sock", version="auto")
    for ref in refs:
        with contextlib.suppress(docker.errors.NotFound):
            sdk.images.remove(ref, force=True)
    sdk.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    server.close()
    for conn in held:
        conn.close()


def _image_name() -> str:
    return f"qudata-pulltest-{uuid.uuid4().hex[:8]}"


# -- pulls -------------------------------------------------------------------------


def test_an_image_already_here_is_present(engine: DockerEngine) -> None:
    assert engine.image_present("qudata-test/busybox:1")
    assert not engine.image_present(f"qudata-test/{_image_name()}:1")


def test_an_unreachable_registry_fails_fast_naming_the_image(engine: DockerEngine) -> None:
    started = time.monotonic()
    with pytest.raises(DockerError) as caught:
        engine.pull("127.0.0.1:1/nothing:1", None, lambda p: None, inactivity_s=30)
    assert time.monotonic() - started < 10
    assert "127.0.0.1:1/nothing:1" in caught.value.message
    assert isinstance(caught.value.__cause__, docker.errors.APIError)


def test_a_registry_that_never_answers_hits_the_inactivity_deadline(
    engine: DockerEngine, silent_server: int
) -> None:
    ref = f"127.0.0.1:{silent_server}/img:1"
    started = time.monotonic()
    with pytest.raises(DockerError) as caught:
        engine.pull(ref, None, lambda p: None, inactivity_s=3)
    elapsed = time.monotonic() - started
    assert elapsed < 15
    assert "no progress for 3 s" in caught.value.message and ref in caught.value.message
    assert elapsed > 2.5  # the deadline, not some other failure


def test_credentials_never_appear_in_the_error(engine: DockerEngine) -> None:
    auth = RegistryCredentials(username="renter", password="hunter2-secret", registry="127.0.0.1:1")
    with pytest.raises(DockerError) as caught:
        engine.pull("127.0.0.1:1/private/img:1", auth, lambda p: None, inactivity_s=10)
    assert "hunter2-secret" not in str(caught.value)
    assert "hunter2-secret" not in repr(caught.value)
    assert "hunter2-secret" not in repr(auth)


def test_a_pull_reports_progress_and_leaves_the_image(
    engine: DockerEngine, serve: Callable[..., FakeRegistry], pulled: list[str]
) -> None:
    registry = serve(FakeRegistry(Image.build(3 * 1024**2)))
    ref = f"127.0.0.1:{registry.port}/{_image_name()}:1"
    pulled.append(ref)
    reports: list[PullProgress] = []
    engine.pull(ref, None, reports.append, inactivity_s=10)
    assert engine.image_present(ref)
    assert reports and reports[-1].layers_done == reports[-1].layers_total == 1
    size = registry.image.layer_size
    assert reports[-1].bytes_done == reports[-1].bytes_total == size


def test_registry_credentials_reach_the_registry_and_wrong_ones_fail_safely(
    engine: DockerEngine, serve: Callable[..., FakeRegistry], pulled: list[str]
) -> None:
    registry = serve(FakeRegistry(Image.build(64 * 1024), credentials=("renter", "right-pw")))
    ref = f"127.0.0.1:{registry.port}/{_image_name()}:1"
    pulled.append(ref)

    wrong = RegistryCredentials("renter", "hunter2-secret", f"127.0.0.1:{registry.port}")
    with pytest.raises(DockerError) as caught:
        engine.pull(ref, wrong, lambda p: None, inactivity_s=10)
    assert "hunter2-secret" not in str(caught.value) and ref in caught.value.message

    right = RegistryCredentials("renter", "right-pw", None)
    engine.pull(ref, right, lambda p: None, inactivity_s=10)
    assert engine.image_present(ref)
    expected = "Basic " + base64.b64encode(b"renter:right-pw").decode()
    assert expected in registry.seen_auth


def test_a_download_that_stalls_midway_hits_the_inactivity_deadline(
    engine: DockerEngine, serve: Callable[..., FakeRegistry], pulled: list[str]
) -> None:
    registry = serve(FakeRegistry(Image.build(2 * 1024**2), stall_after=512 * 1024))
    ref = f"127.0.0.1:{registry.port}/{_image_name()}:1"
    pulled.append(ref)
    reports: list[PullProgress] = []
    started = time.monotonic()
    with pytest.raises(DockerError) as caught:
        engine.pull(ref, None, reports.append, inactivity_s=3)
    assert "no progress for 3 s" in caught.value.message
    assert time.monotonic() - started < 15
    assert reports and reports[-1].layers_total == 1 and reports[-1].layers_done == 0
    assert not engine.image_present(ref)


def test_close_aborts_a_pull_in_flight(
    serve: Callable[..., FakeRegistry], pulled: list[str]
) -> None:
    engine = DockerEngine()
    registry = serve(FakeRegistry(Image.build(2 * 1024**2), stall_after=512 * 1024))
    ref = f"127.0.0.1:{registry.port}/{_image_name()}:1"
    pulled.append(ref)
    began = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            engine.pull(ref, None, lambda p: began.set(), inactivity_s=60)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert began.wait(15)
    engine.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert isinstance(outcome[0], DockerError) and "aborted" in outcome[0].message
