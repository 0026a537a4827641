"""Whether an order may use an image, and whether it must be pulled: the pure decision.

The image service asks the local engine what it has and (when needed) the
registry what a reference names now; `next_step` says what to do with that,
and `LocalImage` / `repository_digests` read Docker's own image records.

What stays true:
- a private image (one the agent pulled with credentials) is used only once
  the registry has confirmed access with the order's own credentials; a
  registry that cannot be asked means refused (fail closed);
- a public image the registry cannot be asked about runs from the cache, and
  the answer says so;
- a digest reference to a public local image is never checked again (a
  digest cannot move); a tag is checked, and pulled only when its digest moved;
- an image that never came from a registry (built or loaded on this host: no
  digest for its repository) is used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from qudata_agent.domain.image_ref import normal_repository, parse_reference
from qudata_agent.errors import AgentError


class RegistryRefused(AgentError):
    """The registry answered, and said no (wrong credentials, no access, no such image)."""


class RegistryUnreachable(AgentError):
    """The registry could not be asked, or gave no usable answer."""


@dataclass(frozen=True)
class LocalImage:
    image_id: str
    tags: tuple[str, ...] = ()  # Docker's RepoTags: "repo:tag"
    digests: tuple[str, ...] = ()  # Docker's RepoDigests: "repo@sha256:..."
    size: int = 0


class Step(Enum):
    PULL = "pull"  # not here, or the tag moved
    USE = "use"  # use the local copy as it is
    CHECK = "check"  # ask the registry first


def repository_digests(image: LocalImage, repository: str) -> frozenset[str]:
    """The manifest digests Docker recorded for `image` in `repository`."""
    name = normal_repository(repository)
    found = set()
    for entry in image.digests:
        ref = parse_reference(entry)
        if ref.digest is not None and normal_repository(ref.repository) == name:
            found.add(ref.digest)
    return frozenset(found)


def first_step(local: LocalImage | None, repository: str, digest_ref: bool, private: bool) -> Step:
    """What to do before any registry answer."""
    if local is None:
        return Step.PULL
    if private:
        return Step.CHECK
    if digest_ref or not repository_digests(local, repository):
        return Step.USE
    return Step.CHECK


def after_check(local: LocalImage, repository: str, remote_digest: str) -> Step:
    """With the registry's answer: the local copy, or a pull when the tag moved."""
    if remote_digest in repository_digests(local, repository):
        return Step.USE
    return Step.PULL
