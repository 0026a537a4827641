"""A tiny Docker registry (HTTP API v2, read only) on loopback whose blob downloads can stall.

It serves one local image, exported with `docker save` and re-packed as a
schema-2 manifest with one gzip layer per saved layer. While `gate` is closed,
every layer download sends its first bytes and then waits: Docker sits in the
middle of the pull (the agent's instance in phase `pulling`) until the test
opens the gate. Docker treats 127.0.0.0/8 registries as insecure, so plain
HTTP is accepted.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import subprocess
import tarfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
STALL_AFTER = 64 * 1024  # bytes of a layer sent before the gate


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    manifest: bytes
    blobs: dict[str, bytes]
    layers: set[str]
    id: str  # the image id Docker gives it: its config's digest

    @classmethod
    def export(cls, local: str) -> Image:
        """Packs the local image `local` (e.g. qudata-test/busybox:1) as a new image."""
        saved = subprocess.run(["docker", "save", local], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(saved)) as tar:

            def read(name: str) -> bytes:
                member = tar.extractfile(name)
                assert member is not None, name
                return member.read()

            (entry,) = json.loads(read("manifest.json"))
            # A config of its own makes a new image id: Docker must download it.
            config = json.loads(read(entry["Config"]))
            config["comment"] = f"served by the fault tests' stalling registry {uuid.uuid4()}"
            config = json.dumps(config).encode()
            layers = [gzip.compress(read(name), compresslevel=1) for name in entry["Layers"]]
        blobs = {_digest(config): config} | {_digest(layer): layer for layer in layers}
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "size": len(config), "digest": _digest(config)},
            "layers": [
                {"mediaType": LAYER_TYPE, "size": len(layer), "digest": _digest(layer)}
                for layer in layers
            ],
        }
        layer_ids = {_digest(layer) for layer in layers}
        return cls(json.dumps(manifest).encode(), blobs, layer_ids, _digest(config))


@dataclass
class StallingRegistry:
    image: Image
    gate: threading.Event = field(default_factory=threading.Event)
    stalled: threading.Event = field(default_factory=threading.Event)  # a download is waiting
    requests: list[str] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> StallingRegistry:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                registry.requests.append(f"{self.command} {self.path}")
                path = self.path.split("?")[0]
                if path == "/v2/":
                    return self._send(200, b"{}", "application/json", body)
                if re.fullmatch(r"/v2/.+/manifests/[^/]+", path):
                    return self._send(200, registry.image.manifest, MANIFEST_TYPE, body)
                blob = re.fullmatch(r"/v2/.+/blobs/(sha256:[0-9a-f]{64})", path)
                if blob and blob.group(1) in registry.image.blobs:
                    data = registry.image.blobs[blob.group(1)]
                    stall = body and blob.group(1) in registry.image.layers
                    return self._send(200, data, "application/octet-stream", body, stall)
                return self._send(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}', "application/json")

            def _send(
                self,
                code: int,
                data: bytes,
                kind: str,
                body: bool = True,
                stall: bool = False,
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Docker-Distribution-API-Version", "registry/2.0")
                if code == 200:
                    self.send_header("Docker-Content-Digest", _digest(data))
                self.end_headers()
                if not body:
                    return
                try:
                    if stall and not registry.gate.is_set():
                        self.wfile.write(data[:STALL_AFTER])
                        self.wfile.flush()
                        registry.stalled.set()
                        registry.gate.wait(120)
                        self.wfile.write(data[STALL_AFTER:])
                    else:
                        self.wfile.write(data)
                except OSError:  # Docker gave up on this download
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.daemon_threads = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def wait_stalled(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.stalled.wait(0.1):
            assert time.monotonic() < deadline, f"no layer download began: {self.requests}"

    def stop(self) -> None:
        self.gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
