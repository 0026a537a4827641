"""The image cache's removal plan: which of the agent's cached images go, and in what order.

`plan` is pure: it is given what is cached (the images the agent pulled, with
their size and last use), what must stay (images a container uses, references
being pulled or checked, the pre-pull list), the free space of Docker's data
root and the two thresholds, and returns the images to remove, least recently
used first, stopping as soon as both thresholds are met again.

What stays true:
- an image in use, one whose reference is being pulled, or one listed for
  pre-pull is never in the plan, whatever the thresholds say;
- with both thresholds met the plan is empty;
- the order is least recently used first (an image never used counts from
  when it was pulled); ties go to the larger image.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class CachedImage:
    image_id: str
    refs: tuple[str, ...]  # the references the agent pulled into it ("repo:tag", "repo@digest")
    size: int  # bytes, as Docker reports the image
    last_used: float  # Unix seconds: the last instance created from it, else its pull


@dataclass(frozen=True)
class Thresholds:
    min_free_bytes: int  # remove while the data root has less free than this (0: never)
    max_cache_bytes: int | None = None  # remove while the cached images total more (None: no cap)


@dataclass(frozen=True)
class Removal:
    image: CachedImage
    reason: str  # "free_space" or "cache_size"


def plan(
    images: Collection[CachedImage],
    in_use: Collection[str],
    pulling: Collection[str],
    keep: Collection[str],
    free_bytes: int | None,
    thresholds: Thresholds,
) -> list[Removal]:
    """The images to remove, in order; `in_use` holds image ids, `pulling` and `keep` refs.

    `free_bytes` None (unknown) never triggers a removal for free space.
    """
    protected_refs = set(pulling) | set(keep)
    total = sum(image.size for image in images)
    free = free_bytes
    candidates = sorted(
        (
            image
            for image in images
            if image.image_id not in in_use and not protected_refs.intersection(image.refs)
        ),
        key=lambda image: (image.last_used, -image.size, image.image_id),
    )
    removals: list[Removal] = []
    for image in candidates:
        reason = _why(total, free, thresholds)
        if reason is None:
            break
        removals.append(Removal(image, reason))
        total -= image.size
        if free is not None:
            free += image.size
    return removals


def _why(total: int, free: int | None, thresholds: Thresholds) -> str | None:
    if free is not None and free < thresholds.min_free_bytes:
        return "free_space"
    if thresholds.max_cache_bytes is not None and total > thresholds.max_cache_bytes:
        return "cache_size"
    return None
