"""The image cache's removal plan and the image access decision: pure functions."""

from __future__ import annotations

import pytest

from qudata_agent.config import ConfigError, load_settings
from qudata_agent.domain.image_access import (
    LocalImage,
    Step,
    after_check,
    first_step,
    repository_digests,
)
from qudata_agent.domain.image_gc import GIB, CachedImage, Thresholds, plan
from qudata_agent.domain.image_ref import familiar_ref, normal_repository

OLD = CachedImage("id-old", ("reg/old:1",), 3 * GIB, last_used=100.0)
MID = CachedImage("id-mid", ("reg/mid:1",), 2 * GIB, last_used=200.0)
NEW = CachedImage("id-new", ("reg/new:1",), 1 * GIB, last_used=300.0)
ALL = (NEW, OLD, MID)


def _ids(removals: list) -> list[str]:  # type: ignore[type-arg]
    return [r.image.image_id for r in removals]


def test_enough_free_space_and_no_cap_removes_nothing() -> None:
    assert plan(ALL, (), (), (), 50 * GIB, Thresholds(10 * GIB)) == []


def test_low_space_removes_least_recently_used_first_until_enough() -> None:
    removals = plan(ALL, (), (), (), 8 * GIB, Thresholds(10 * GIB))
    assert _ids(removals) == ["id-old"]  # 8 + 3 >= 10: one is enough
    assert removals[0].reason == "free_space"
    assert _ids(plan(ALL, (), (), (), 6 * GIB, Thresholds(10 * GIB))) == ["id-old", "id-mid"]


def test_in_use_pulling_and_prepull_images_are_never_removed() -> None:
    removals = plan(
        ALL,
        in_use={"id-old"},
        pulling={"reg/mid:1"},
        keep={"reg/new:1"},
        free_bytes=0,
        thresholds=Thresholds(100 * GIB),
    )
    assert removals == []
    removals = plan(ALL, {"id-old"}, (), (), 0, Thresholds(100 * GIB))
    assert _ids(removals) == ["id-mid", "id-new"]


def test_the_cache_cap_removes_until_the_total_fits() -> None:
    removals = plan(ALL, (), (), (), 500 * GIB, Thresholds(10 * GIB, max_cache_bytes=4 * GIB))
    assert _ids(removals) == ["id-old"]  # 6 GiB -> 3 GiB
    assert removals[0].reason == "cache_size"
    assert plan(ALL, (), (), (), None, Thresholds(10 * GIB)) == []  # free space unknown


def test_ties_go_to_the_larger_image() -> None:
    a = CachedImage("a", ("a:1",), 1, 5.0)
    b = CachedImage("b", ("b:1",), 9, 5.0)
    assert _ids(plan((a, b), (), (), (), 0, Thresholds(1))) == ["b"]


def test_zero_thresholds_mean_off() -> None:
    assert plan(ALL, (), (), (), 0, Thresholds(0)) == []


# -- access decision ----------------------------------------------------------------

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
PULLED = LocalImage("id", ("reg:5000/team/app:1",), (f"reg:5000/team/app@{D1}",), 10)
BUILT = LocalImage("id2", ("team/app:1",), (), 10)


def test_what_is_missing_is_pulled_and_a_private_image_is_always_checked() -> None:
    assert first_step(None, "reg:5000/team/app", False, private=False) is Step.PULL
    assert first_step(PULLED, "reg:5000/team/app", True, private=True) is Step.CHECK
    assert first_step(PULLED, "reg:5000/team/app", False, private=True) is Step.CHECK


def test_a_public_digest_or_a_local_build_is_used_and_a_tag_is_checked() -> None:
    assert first_step(PULLED, "reg:5000/team/app", True, private=False) is Step.USE
    assert first_step(BUILT, "team/app", False, private=False) is Step.USE
    assert first_step(PULLED, "reg:5000/team/app", False, private=False) is Step.CHECK


def test_a_moved_tag_is_pulled_an_unchanged_one_used() -> None:
    assert after_check(PULLED, "reg:5000/team/app", D1) is Step.USE
    assert after_check(PULLED, "reg:5000/team/app", D2) is Step.PULL


def test_repository_names_are_compared_as_docker_files_them() -> None:
    hub = LocalImage("id", ("busybox:1",), (f"busybox@{D1}",))
    assert repository_digests(hub, "docker.io/library/busybox") == {D1}
    assert repository_digests(hub, "other") == frozenset()
    assert normal_repository("docker.io/nvidia/cuda") == "nvidia/cuda"
    assert normal_repository("reg:5000/library/x") == "reg:5000/library/x"


# -- settings -----------------------------------------------------------------------


def test_image_settings_are_read_and_checked() -> None:
    s = load_settings(
        {
            "QUDATA_IMAGE_GC_FREE_GB": "5",
            "QUDATA_IMAGE_CACHE_GB": "100",
            "QUDATA_PREPULL": "busybox, reg:5000/team/app:2,busybox:latest",
        }
    )
    assert s.image_gc_free_gb == 5 and s.image_cache_gb == 100
    assert s.prepull == ("busybox:latest", "reg:5000/team/app:2")
    assert load_settings({}).image_cache_gb is None
    with pytest.raises(ConfigError, match="QUDATA_PREPULL: 'Bad Name'"):
        load_settings({"QUDATA_PREPULL": "ok,Bad Name"})
    with pytest.raises(ConfigError, match="QUDATA_IMAGE_GC_FREE_GB"):
        load_settings({"QUDATA_IMAGE_GC_FREE_GB": "-1"})


@pytest.mark.parametrize(
    ("ref", "familiar"),
    [
        ("docker.io/library/busybox:1", "busybox:1"),
        ("busybox", "busybox:latest"),
        ("docker.io/nvidia/cuda:12", "nvidia/cuda:12"),
        ("reg:5000/team/app", "reg:5000/team/app:latest"),
        (f"docker.io/library/busybox@{D1}", f"busybox@{D1}"),
    ],
)
def test_references_compare_as_docker_lists_them(ref: str, familiar: str) -> None:
    assert familiar_ref(ref) == familiar
