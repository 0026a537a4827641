"""Image references: what the control plane's `image` and `image_tag` name, checked.

Owns `ImageRef`, `resolve_image` (an order's reference, checked),
`parse_reference` (a reference the agent already holds, split without checks)
and the names Docker files images under (`normal_repository`, `familiar_ref`):
the one place that splits a reference, with (a close subset of) Docker's
reference grammar:

    reference  := repository [ ":" tag ] [ "@" digest ]
    repository := [ host [ ":" port ] "/" ] component ( "/" component )*
    component  := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
    digest     := ( sha256 ":" 64 hex | sha384 ":" 96 hex | sha512 ":" 128 hex )

What stays true:
- a tag is only ever read after the last '/', so `reg.example:5000/team/img`
  is a repository whose host has a port, never a tag;
- the first component is a registry host only when it holds a '.' or a ':'
  or is `localhost` (Docker's own rule); otherwise the image is on Docker Hub;
- a tag or digest inside `image` wins over `image_tag`; a digest wins over a
  tag, and `str()` of a reference with a digest is `repository@digest`;
- every `ImageRef` that `resolve_image` returns has a tag or a digest;
- a reference Docker would read as a local image ID is refused: a repository
  named after a digest algorithm (`sha256:<hex>` parses as repository
  `sha256`, and Docker then finds the image by ID prefix), or one bare
  component of 12-64 hex digits (a short or full ID); an ID names no
  registry, so it would reach a private image with no registry's yes. A
  digest *reference* (`repo@sha256:...`) is fine: it names a repository;
- error messages name the field and never echo the input (a malformed
  reference may carry `user:password@`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qudata_agent.errors import InvalidRequest

DEFAULT_TAG = "latest"
DEFAULT_REGISTRY = "docker.io"  # where a reference that names no registry host is pulled from
MAX_REPOSITORY_LEN = 255  # Docker's limit on a name (host and path together)
MAX_INPUT_LEN = 512  # longer input is refused before any pattern runs

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_HOST_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST_RE = re.compile(rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"(sha256|sha384|sha512):([0-9a-f]+)")
_DIGEST_HEX_LEN = {"sha256": 64, "sha384": 96, "sha512": 128}
_ID_LIKE_RE = re.compile(r"[0-9a-f]{12,64}")


@dataclass(frozen=True)
class ImageRef:
    repository: str  # "busybox", "nvidia/cuda", "reg.example:5000/team/img"
    tag: str | None = None
    digest: str | None = None  # "sha256:<64 hex>"

    def __str__(self) -> str:
        """The reference to pull and run: pinned by digest when there is one."""
        if self.digest is not None:
            return f"{self.repository}@{self.digest}"
        return f"{self.repository}:{self.tag or DEFAULT_TAG}"

    @property
    def registry(self) -> str | None:
        """The registry host (with its port), or None for Docker Hub."""
        first, slash, _ = self.repository.partition("/")
        if slash and _is_host(first):
            return first
        return None

    @property
    def server(self) -> str:
        """The registry host to authenticate against: Docker Hub's when none is named."""
        return self.registry or DEFAULT_REGISTRY

    @property
    def pin(self) -> str:
        """What Docker's pull endpoint takes beside the repository: the digest, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG


def parse_reference(ref: str) -> ImageRef:
    """`repo[:tag][@digest]` -> `ImageRef`, shape only: for references the agent already holds.

    Only a colon after the last slash starts a tag, so `reg:5000/team/img` is
    the repository `reg:5000/team/img`; no tag and no digest means `latest`.
    An order's reference goes through `resolve_image` instead.
    """
    name, at, digest = ref.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    tag: str | None = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    if not (at and digest) and tag is None:
        tag = DEFAULT_TAG
    return ImageRef(repository=name, tag=tag, digest=digest if at and digest else None)


def normal_repository(repository: str) -> str:
    """The name Docker files an image under ("docker.io/library/x" is "x")."""
    for prefix in ("docker.io/", "index.docker.io/"):
        if repository.startswith(prefix):
            repository = repository[len(prefix) :]
            break
    if repository.startswith("library/") and repository.count("/") == 1:
        repository = repository[len("library/") :]
    return repository


def familiar_ref(ref: str) -> str:
    """`ref` as Docker lists it in RepoTags/RepoDigests ("docker.io/library/x:1" is "x:1")."""
    parsed = parse_reference(ref)
    if parsed.digest is not None:
        return f"{normal_repository(parsed.repository)}@{parsed.digest}"
    return f"{normal_repository(parsed.repository)}:{parsed.tag}"


def resolve_image(image: str, image_tag: str | None) -> ImageRef:
    """The reference `image` names, with `image_tag` when `image` carries no tag or digest.

    `image_tag` None or empty means `latest`. A bad `image_tag` is refused even
    when `image` carries its own tag, so a malformed request is never half-read.
    """
    if image_tag:
        _check_tag(image_tag, "image_tag")
    repository, tag, digest = _split(image)
    _check_repository(repository)
    _check_not_an_id(repository)
    if tag is not None:
        _check_tag(tag, "image")
    if digest is not None:
        _check_digest(digest)
    if tag is None and digest is None:
        tag = image_tag or DEFAULT_TAG
    return ImageRef(repository=repository, tag=tag, digest=digest)


def _is_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


def _split(image: str) -> tuple[str, str | None, str | None]:
    """`image` -> (repository, tag or None, digest or None); only shape checks here."""
    if not image:
        raise InvalidRequest("field 'image': must not be empty")
    if len(image) > MAX_INPUT_LEN:
        raise InvalidRequest(f"field 'image': longer than {MAX_INPUT_LEN} characters")
    if any(ch.isspace() for ch in image):
        raise InvalidRequest("field 'image': must not contain whitespace")
    name, at, digest = image.partition("@")
    if at and not digest:
        raise InvalidRequest("field 'image': '@' must be followed by a digest")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag: str | None = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, (digest if at else None)


def _check_repository(repository: str) -> None:
    if not repository:
        raise InvalidRequest("field 'image': the repository name is empty")
    if len(repository) > MAX_REPOSITORY_LEN:
        raise InvalidRequest(
            f"field 'image': the repository name is longer than {MAX_REPOSITORY_LEN} characters"
        )
    first, slash, rest = repository.partition("/")
    if slash and _is_host(first):
        if not _HOST_RE.fullmatch(first):
            raise InvalidRequest("field 'image': the registry host is not a valid host[:port]")
        path = rest
    else:
        path = repository
    if not _PATH_RE.fullmatch(path):
        raise InvalidRequest(
            "field 'image': the repository must be lowercase letters and digits in"
            " '/'-separated components, joined inside by '.', '_', '__' or '-'"
        )


def _check_not_an_id(repository: str) -> None:
    """Refuses a repository Docker would resolve as a local image ID (or its prefix)."""
    if repository in _DIGEST_HEX_LEN or _ID_LIKE_RE.fullmatch(repository):
        raise InvalidRequest(
            "field 'image': an image ID (sha256:<hex> or bare hex) is not accepted;"
            " name the image by repository, tag or repository@digest"
        )


def _check_tag(tag: str, field: str) -> None:
    if not _TAG_RE.fullmatch(tag):
        raise InvalidRequest(
            f"field '{field}': a tag is 1-128 of letters, digits, '_', '.', '-'"
            " and does not start with '.' or '-'"
        )


def _check_digest(digest: str) -> None:
    match = _DIGEST_RE.fullmatch(digest)
    if match is None or len(match.group(2)) != _DIGEST_HEX_LEN[match.group(1)]:
        raise InvalidRequest(
            "field 'image': a digest is 'sha256:' and 64 lowercase hex digits"
            " (or sha384 with 96, sha512 with 128)"
        )
