"""The Docker adapter against the real engine (a missing dockerd fails, never skips)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.errors import Unavailable


def _cli(*args: str) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True).stdout


def test_data_root_is_the_engines() -> None:
    engine = DockerEngine()
    try:
        assert engine.data_root() == _cli("info", "--format", "{{.DockerRootDir}}").strip()
        assert (
            engine.info()["ServerVersion"]
            == _cli("version", "--format", "{{.Server.Version}}").strip()
        )
    finally:
        engine.close()


def test_the_data_root_is_asked_of_docker_once_a_minute() -> None:
    """Every create's admission reads it: one `docker info` serves the next minute's."""
    engine = DockerEngine()
    asked: list[int] = []
    real = engine.info

    def counted() -> dict[str, Any]:
        asked.append(1)
        return real()

    engine.info = counted  # type: ignore[method-assign]
    try:
        assert engine.data_root() == engine.data_root() != ""
        assert len(asked) == 1
    finally:
        engine.close()


def test_unreachable_engine_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    engine = DockerEngine(f"unix://{tmp_path}/no-such.sock", timeout_s=2)
    with pytest.raises(Unavailable) as caught:
        engine.data_root()
    assert "no-such.sock" in caught.value.message
    assert isinstance(caught.value.__cause__, Exception)  # the SDK error is chained
    engine.close()


def test_test_images_exist() -> None:
    """The suite's own images are built by scripts/build-test-images.sh."""
    for name in ("qudata-test/busybox:1", "qudata-test/debian:12", "qudata-test/debian-ssh:12"):
        _cli("image", "inspect", name)
    out = subprocess.run(
        ["docker", "run", "--rm", "qudata-test/debian-ssh:12", "sh", "-c", "command -v sshd"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.strip().endswith("sshd")
