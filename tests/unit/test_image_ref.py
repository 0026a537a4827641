"""Image references: tag and digest precedence, registry hosts, and what is refused."""

from __future__ import annotations

import pytest

from qudata_agent.domain.image_ref import ImageRef, parse_reference, resolve_image
from qudata_agent.errors import InvalidRequest

DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("image", "image_tag", "repository", "tag", "digest", "text"),
    [
        (
            "nvidia/cuda:12.6.1-base-ubuntu22.04",
            "latest",
            "nvidia/cuda",
            "12.6.1-base-ubuntu22.04",
            None,
            "nvidia/cuda:12.6.1-base-ubuntu22.04",
        ),
        ("ubuntu", "22.04", "ubuntu", "22.04", None, "ubuntu:22.04"),
        ("ubuntu", None, "ubuntu", "latest", None, "ubuntu:latest"),
        ("ubuntu", "", "ubuntu", "latest", None, "ubuntu:latest"),
        (
            "reg.example:5000/team/img",
            "v2",
            "reg.example:5000/team/img",
            "v2",
            None,
            "reg.example:5000/team/img:v2",
        ),
        (
            "reg.example:5000/team/img:v3",
            "v2",
            "reg.example:5000/team/img",
            "v3",
            None,
            "reg.example:5000/team/img:v3",
        ),
        (
            "localhost:5000/img",
            None,
            "localhost:5000/img",
            "latest",
            None,
            "localhost:5000/img:latest",
        ),
        ("busybox@" + DIGEST, "latest", "busybox", None, DIGEST, "busybox@" + DIGEST),
        ("img:tag@" + DIGEST, "latest", "img", "tag", DIGEST, "img@" + DIGEST),
        (
            "reg.example:5000/team/img@" + DIGEST,
            "v2",
            "reg.example:5000/team/img",
            None,
            DIGEST,
            "reg.example:5000/team/img@" + DIGEST,
        ),
        ("my_org/my-app__x.y:Tag_1.0-rc", None, "my_org/my-app__x.y", "Tag_1.0-rc", None, None),
        ("a---b/c", "_t", "a---b/c", "_t", None, "a---b/c:_t"),
    ],
)
def test_resolves(
    image: str,
    image_tag: str | None,
    repository: str,
    tag: str | None,
    digest: str | None,
    text: str | None,
) -> None:
    ref = resolve_image(image, image_tag)
    assert (ref.repository, ref.tag, ref.digest) == (repository, tag, digest)
    if text is not None:
        assert str(ref) == text


@pytest.mark.parametrize(
    ("repository", "registry"),
    [
        ("busybox", None),
        ("nvidia/cuda", None),
        ("library/ubuntu", None),
        ("reg.example:5000/team/img", "reg.example:5000"),
        ("ghcr.io/org/img", "ghcr.io"),
        ("localhost:5000/img", "localhost:5000"),
        ("localhost/img", "localhost"),
        ("localhost", None),  # a one-component name is a Docker Hub image
    ],
)
def test_registry(repository: str, registry: str | None) -> None:
    assert ImageRef(repository, "latest").registry == registry
    assert resolve_image(repository, None).registry == registry


def test_str_without_tag_or_digest_defaults_to_latest() -> None:
    assert str(ImageRef("busybox")) == "busybox:latest"


def test_sha512_digest_is_accepted() -> None:
    digest = "sha512:" + "ab" * 64
    assert str(resolve_image("img@" + digest, None)) == "img@" + digest


@pytest.mark.parametrize(
    "image",
    [
        "",
        " ",
        "ubuntu ",
        " ubuntu",
        "ubu ntu",
        "ubuntu\n",
        "Ubuntu",
        "nvidia/CUDA",
        "a/../b",
        "..",
        "a..b",
        "/ubuntu",
        "ubuntu/",
        "a//b",
        "-ubuntu",
        "ubuntu-",
        "ubuntu:",
        "ubuntu@",
        "ubuntu:.bad",
        "ubuntu:-bad",
        "ubuntu:bad!",
        "ubuntu:" + "t" * 129,
        "busybox@sha256:abc",
        "busybox@sha256:" + "0123456789ABCDEF" * 4,
        "busybox@md5:" + "0" * 32,
        "busybox@" + DIGEST + "@" + DIGEST,
        "a" * 256,
        "a/" * 127 + "ab",  # 256 characters
        "x" * 600,
        "user:secret@reg.example/img",
        "reg_bad.example:5000/img",
        "reg.example:port/img",
    ],
)
def test_refuses_bad_image(image: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        resolve_image(image, "latest")
    assert "'image'" in caught.value.message


def test_longest_repository_is_accepted() -> None:
    assert resolve_image("a" * 255, None).repository == "a" * 255


@pytest.mark.parametrize("image_tag", [" ", "bad tag", ".x", "-x", "x" * 129, "a/b", "a:b"])
def test_refuses_bad_image_tag(image_tag: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        resolve_image("ubuntu", image_tag)
    assert "'image_tag'" in caught.value.message


def test_bad_image_tag_is_refused_even_when_image_has_a_tag() -> None:
    with pytest.raises(InvalidRequest, match="'image_tag'"):
        resolve_image("ubuntu:22.04", "bad tag")


def test_message_does_not_echo_credentials() -> None:
    with pytest.raises(InvalidRequest) as caught:
        resolve_image("user:hunter2@reg.example/img", None)
    assert "hunter2" not in caught.value.message
    assert "user:" not in caught.value.message


ID = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("image", "image_tag"),
    [
        ("sha256:" + ID[:12], None),  # Docker finds the image by this ID prefix
        ("sha256:" + ID, None),
        ("sha256", ID[:12]),  # the same, spelt through image_tag
        ("sha512:" + "ab" * 20, None),
        (ID[:12], None),  # a short ID
        (ID, None),  # a full ID
        (ID[:40] + ":v1", None),
    ],
)
def test_refuses_an_image_id(image: str, image_tag: str | None) -> None:
    with pytest.raises(InvalidRequest, match="image ID") as caught:
        resolve_image(image, image_tag)
    assert ID[:12] not in caught.value.message


@pytest.mark.parametrize(
    "image",
    [
        "busybox@sha256:" + ID,  # a digest reference names a repository: fine
        "team/" + ID[:12],  # hex inside a path is a name, not an ID
        "abc123",  # shorter than any ID Docker shows
        "sha256sum/tool",
    ],
)
def test_names_that_only_look_like_ids_are_accepted(image: str) -> None:
    assert resolve_image(image, None).repository


@pytest.mark.parametrize(
    ("ref", "repository", "tag", "digest"),
    [
        ("busybox", "busybox", "latest", None),
        ("reg.example:5000/team/img", "reg.example:5000/team/img", "latest", None),
        ("reg.example:5000/team/img:2", "reg.example:5000/team/img", "2", None),
        ("img:tag@sha256:abc", "img", "tag", "sha256:abc"),
    ],
)
def test_a_held_reference_is_split_without_checks(
    ref: str, repository: str, tag: str, digest: str | None
) -> None:
    parsed = parse_reference(ref)
    assert (parsed.repository, parsed.tag, parsed.digest) == (repository, tag, digest)
    assert parsed.pin == (digest or tag)
    assert parse_reference("localhost/img").server == "localhost"
    assert parse_reference("team/img").server == "docker.io"
