"""The spec that starts the agent's init, the init's word and sshd's banner, judged (pure)."""

from __future__ import annotations

import pytest

from qudata_agent.adapters.store_codec import spec_from_json, spec_to_json
from qudata_agent.domain.container_spec import IDLE_COMMAND, ContainerSpec, Mount
from qudata_agent.domain.ssh_init import (
    BANNER_BYTES,
    BUSYBOX,
    IDLE_ARGS,
    INIT,
    ImageConfig,
    banner_of,
    failure_of,
    ssh_spec,
    unsupported,
)
from qudata_agent.domain.ssh_setup import BUNDLE_MOUNT, INSTANCE_MOUNT, RUN_DIR

CUDA_LIKE = ImageConfig(
    entrypoint=("/opt/nvidia/nvidia_entrypoint.sh",),
    cmd=("bash",),
    user="",
    env=("PATH=/usr/local/cuda/bin:/usr/bin",),
    architecture="amd64",
)


def _spec(command: tuple[str, ...] = IDLE_COMMAND, **env: str) -> ContainerSpec:
    return ContainerSpec(instance_id="i1", agent_id="a1", image="img:1", command=command, env=env)


def _final(spec: ContainerSpec, image: ImageConfig) -> ContainerSpec:
    return ssh_spec(spec, image, bundles_dir="/state/ssh/bundles", instance_dir="/state/ssh/i/i1")


def test_an_idle_instance_runs_the_images_entrypoint_with_the_idle_arguments() -> None:
    final = _final(_spec(), CUDA_LIKE)
    assert final.entrypoint == (BUSYBOX, "sh", INIT)
    assert final.command == ("idle", "", "1", "--", "/opt/nvidia/nvidia_entrypoint.sh", *IDLE_ARGS)
    assert final.user == "0:0"


def test_an_idle_instance_without_an_entrypoint_idles_in_the_init_alone() -> None:
    final = _final(_spec(), ImageConfig(cmd=("/bin/sh",), architecture="amd64"))
    assert final.command == ("idle", "", "1", "--")  # the image's CMD is not run, as before


def test_a_command_goes_to_the_images_entrypoint_as_the_images_user() -> None:
    image = ImageConfig(entrypoint=("/ep.sh",), user="renter:staff", env=("HOME=/home/x",))
    final = _final(_spec(("/bin/sh", "-c", "python train.py")), image)
    assert final.command == (
        "run", "renter:staff", "0", "--", "/ep.sh", "/bin/sh", "-c", "python train.py",
    )  # fmt: skip


def test_home_is_left_alone_when_the_order_sets_it() -> None:
    final = _final(_spec(("/bin/sh", "-c", "x"), HOME="/data"), ImageConfig(user="1000"))
    assert final.command[:3] == ("run", "1000", "0")


def test_only_the_bundle_and_the_instances_own_directory_are_mounted_read_only() -> None:
    final = _final(_spec(), CUDA_LIKE)
    assert final.mounts == (
        Mount("/state/ssh/bundles", BUNDLE_MOUNT, read_only=True),
        Mount("/state/ssh/i/i1", INSTANCE_MOUNT, read_only=True),
    )
    assert final.tmpfs == ((RUN_DIR, "mode=755,size=1m"),)
    assert "AUDIT_WRITE" in final.cap_add and final.cap_add.count("AUDIT_WRITE") == 1
    assert spec_from_json(spec_to_json(final)) == final


def test_the_rest_of_the_spec_is_kept() -> None:
    spec = _spec(QUDATA_CPU_CORES="2")
    final = _final(spec, CUDA_LIKE)
    assert (final.env, final.image, final.name, final.labels, final.init) == (
        spec.env, spec.image, spec.name, spec.labels, True,
    )  # fmt: skip
    assert final.security_opt == spec.security_opt


@pytest.mark.parametrize(
    ("image", "words"),
    [
        (ImageConfig(architecture="arm64"), "built for arm64"),
        (ImageConfig(architecture="amd64", os="windows"), "Linux images only"),
    ],
)
def test_an_image_the_bundle_cannot_serve_says_why(image: ImageConfig, words: str) -> None:
    reason = unsupported(image, "amd64")
    assert reason is not None and words in reason


def test_an_image_the_bundle_serves() -> None:
    assert unsupported(CUDA_LIKE, "amd64") is None
    assert unsupported(ImageConfig(), "amd64") is None  # an image that names no platform


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        (b"ready\n", None),
        (None, None),
        (b"", None),
        (b"\0" * 600, None),
        (b"failed: sshd did not start: port 22 is taken\n", "sshd did not start: port 22 is taken"),
        (b"failed:", "sshd did not start"),
        (b"failed: a\tb\x1b[0m\nnext", "a b [0m"),
        (b"failed: " + b"\xff" * 2000, "\ufffd" * 300),
    ],
)
def test_the_inits_word_gives_a_failures_reason_only(
    word: bytes | None, expected: str | None
) -> None:
    assert failure_of(word) == expected


@pytest.mark.parametrize(
    ("line", "ssh"),
    [
        (b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r", True),
        (b"SSH-1.99-OpenSSH_3.9", True),
        (b"SSH-1.5-old", False),
        (b"", False),
        (b"HTTP/1.1 200 OK", False),
        (b"\0" * 1000, False),
    ],
)
def test_only_an_ssh_version_line_is_an_ssh_banner(line: bytes, ssh: bool) -> None:
    banner = banner_of(line)
    assert banner.ssh is ssh
    assert len(banner.detail) <= BANNER_BYTES and banner.detail.isprintable()
