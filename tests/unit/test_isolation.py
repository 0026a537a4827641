"""The isolation decisions: tiers offered, refusals, GPUs in the sandbox, the toolkit floor."""

from __future__ import annotations

import asyncio

import pytest

from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.store_codec import spec_from_json, spec_to_json
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec
from qudata_agent.domain.gpus import Resources
from qudata_agent.domain.isolation import (
    SANDBOX_NOTES,
    ProbeResult,
    RuntimeInfo,
    SandboxGpus,
    Tier,
    cdi_device,
    cdi_refusal,
    decide_offer,
    notes_of,
    nvproxy_enabled,
    parse_runtimes,
    parse_supported_drivers,
    refusal,
    runtime_of,
    sandbox_gpu_refusal,
    tier_of,
)
from qudata_agent.domain.nvidia_toolkit import (
    MIN_VERSION,
    open_escapes,
    parse_floor,
    parse_version,
    toolkit_refusal,
    unconfirmed,
)
from qudata_agent.domain.order import CreateOrder, HostDefaults, build_spec
from qudata_agent.errors import AgentError, Conflict, Unavailable
from qudata_agent.services.isolation import Isolation

RUNC = RuntimeInfo("runc", "runc")
RUNSC = RuntimeInfo("runsc", "/usr/bin/runsc", ("--platform=ptrace", "--network=host"))
RUNSC_GPU = RuntimeInfo("runsc", "/usr/bin/runsc", ("--nvproxy", "--network=host"))
BOTH = {"runc": RUNC, "runsc": RUNSC}
STARTED = {"runc": ProbeResult(True), "runsc": ProbeResult(True)}


def test_docker_info_runtimes_are_read() -> None:
    info = {
        "runc": {"path": "runc"},
        "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--platform=ptrace"]},
        "odd": "not a mapping",
    }
    found = parse_runtimes(info)
    assert found["runsc"] == RuntimeInfo("runsc", "/usr/bin/runsc", ("--platform=ptrace",))
    assert found["runc"].args == () and found["odd"].path == "odd"
    assert parse_runtimes(None) == {}


def test_a_tier_is_offered_only_when_registered_and_its_probe_started() -> None:
    offer = decide_offer(BOTH, STARTED)
    assert offer.names() == ["container", "sandbox"]
    missing = decide_offer({"runc": RUNC}, {"runc": ProbeResult(True)})
    assert missing.names() == ["container"]
    assert "no runtime named 'runsc'" in missing.missing[Tier.SANDBOX]
    failed = decide_offer(BOTH, {"runc": ProbeResult(True), "runsc": ProbeResult(False, "boom")})
    assert failed.names() == ["container"] and "boom" in failed.missing[Tier.SANDBOX]
    unprobed = decide_offer(BOTH, {"runc": ProbeResult(True)})
    assert unprobed.names() == ["container"]


def test_the_sandbox_runtime_name_comes_from_the_settings() -> None:
    offer = decide_offer(BOTH, STARTED, sandbox_runtime="gvisor")
    assert offer.names() == ["container"] and "'gvisor'" in offer.missing[Tier.SANDBOX]
    assert runtime_of(Tier.SANDBOX, "gvisor") == "gvisor"
    assert runtime_of(Tier.CONTAINER, "gvisor") == "runc"


def test_refusals_name_the_tier_and_why() -> None:
    offer = decide_offer({"runc": RUNC}, {"runc": ProbeResult(True)})
    why = refusal(offer, Tier.SANDBOX, 0)
    assert why is not None and "'sandbox'" in why and "runsc" in why
    assert refusal(offer, Tier.CONTAINER, 0) is None
    full = decide_offer(BOTH, STARTED)
    assert refusal(full, Tier.SANDBOX, 0) is None
    gpu = refusal(full, Tier.SANDBOX, 1)
    assert gpu is not None and "nvproxy" in gpu
    assert refusal(full, Tier.CONTAINER, 1) is None


def test_an_old_toolkit_refuses_gpu_orders_in_every_tier() -> None:
    offer = decide_offer(BOTH, STARTED, gpu_refusal="toolkit too old: upgrade")
    for tier in Tier:
        why = refusal(offer, tier, 2)
        assert why is not None and "toolkit too old" in why
        assert refusal(offer, tier, 0) is None


def test_supported_drivers_are_parsed_from_runsc() -> None:
    text = "535.104.05\n550.54.15\n  570.86.15  \nnot a version\n"
    assert parse_supported_drivers(text) == ("535.104.05", "550.54.15", "570.86.15")


@pytest.mark.parametrize(
    ("args", "on"),
    [
        (("--nvproxy",), True),
        (("--nvproxy=true",), True),
        (("-nvproxy",), True),
        (("--nvproxy=false",), False),
        (("--nvproxy-docker",), False),
        (("--nvproxy", "--nvproxy=false"), False),
        ((), False),
    ],
)
def test_nvproxy_is_on_only_when_the_runtime_args_say_so(args: tuple[str, ...], on: bool) -> None:
    assert nvproxy_enabled(args) is on


def test_gpus_in_the_sandbox_need_nvproxy_switched_on_and_the_driver_listed() -> None:
    listed = SandboxGpus(True, ("550.54.15",))
    assert sandbox_gpu_refusal(RUNSC_GPU, listed, "550.54.15") is None
    no_nvproxy = sandbox_gpu_refusal(RUNSC_GPU, SandboxGpus(False), "550.54.15")
    assert no_nvproxy is not None and "has no nvproxy" in no_nvproxy
    off = sandbox_gpu_refusal(RUNSC, listed, "550.54.15")
    assert off is not None and "--nvproxy" in off
    other = sandbox_gpu_refusal(RUNSC_GPU, listed, "560.35.03")
    assert other is not None and "560.35.03" in other and "550.54.15" in other
    unknown = sandbox_gpu_refusal(RUNSC_GPU, listed, None)
    assert unknown is not None and "unknown" in unknown


def test_the_order_picks_the_runtime_and_the_view_reads_the_tier_back() -> None:
    def spec(tier: Tier) -> ContainerSpec:
        return build_spec(
            CreateOrder(image="busybox:1", isolation=tier),
            instance_id="i",
            agent_id="a",
            image="busybox:1",
            resources=Resources(None, None, 0),
            ports={},
            gpus=(),
            storage_bytes=None,
            host=HostDefaults(sandbox_runtime="gvisor"),
        )

    sandbox, container = spec(Tier.SANDBOX), spec(Tier.CONTAINER)
    assert sandbox.runtime == "gvisor" and container.runtime == "runc"
    assert spec_from_json(spec_to_json(sandbox)) == sandbox and sandbox.runtime == "gvisor"
    assert tier_of(sandbox.runtime) is Tier.SANDBOX and tier_of("runc") is Tier.CONTAINER
    # The sandbox keeps every hardening default of the container.
    assert sandbox.cap_add == container.cap_add and sandbox.security_opt == container.security_opt
    assert notes_of(Tier.SANDBOX) == SANDBOX_NOTES and notes_of(Tier.CONTAINER) == ()


def test_cdi_is_preferred_only_where_docker_and_a_uuid_spec_allow_it() -> None:
    spec = "kind: nvidia.com/gpu\ndevices:\n- name: GPU-aaaa\n- name: GPU-bbbb\n- name: all\n"
    gpus = ("GPU-aaaa", "GPU-bbbb")
    assert cdi_refusal("28.0.1", ["/etc/cdi"], [spec], gpus) is None
    old = cdi_refusal("20.10.24+dfsg1", ["/etc/cdi"], [spec], gpus)
    assert old is not None and "25 or later" in old
    off = cdi_refusal("26.1.0", [], [spec], gpus)
    assert off is not None and "features.cdi" in off
    by_index = cdi_refusal("28.0.1", ["/etc/cdi"], ["devices:\n- name: '0'\n"], gpus)
    assert by_index is not None and "--device-name-strategy=uuid" in by_index
    assert cdi_refusal("28.0.1", ["/etc/cdi"], [spec], ("GPU-cccc",)) is not None
    assert cdi_device("GPU-aaaa") == "nvidia.com/gpu=GPU-aaaa"


def test_only_the_container_tier_takes_its_gpus_by_cdi() -> None:
    def spec(tier: Tier, gpus: tuple[str, ...]) -> ContainerSpec:
        return build_spec(
            CreateOrder(image="busybox:1", isolation=tier),
            instance_id="i",
            agent_id="a",
            image="busybox:1",
            resources=Resources(None, None, len(gpus)),
            ports={},
            gpus=gpus,
            storage_bytes=None,
            host=HostDefaults(cdi_gpus=True),
        )

    assert spec(Tier.CONTAINER, ("GPU-aaaa",)).cdi_gpus is True
    assert spec(Tier.SANDBOX, ("GPU-aaaa",)).cdi_gpus is False  # nvproxy takes the legacy path
    assert spec(Tier.CONTAINER, ()).cdi_gpus is False


# -- the NVIDIA Container Toolkit ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("NVIDIA Container Toolkit CLI version 1.17.8\ncommit: abc", (1, 17, 8)),
        ("NVIDIA Container Runtime Hook version 1.16.1\ncommit: x", (1, 16, 1)),
        ("cli-version: 1.18.0\nlib-version: 1.18.0", None),
        ("version: 1.18.0", None),
        ("1.17.3-1", (1, 17, 3)),
        ("", None),
    ],
)
def test_toolkit_versions_are_parsed(text: str, version: tuple[int, int, int] | None) -> None:
    assert parse_version(text) == version


def test_the_toolkit_floor_is_the_last_confirmed_fix() -> None:
    assert MIN_VERSION == (1, 17, 8)
    assert toolkit_refusal((1, 17, 8)) is None and toolkit_refusal((1, 18, 0)) is None
    old = toolkit_refusal((1, 17, 7))
    assert old is not None and "CVE-2025-23266" in old and "1.17.8" in old
    older = toolkit_refusal((1, 16, 1))
    assert older is not None and "CVE-2024-0132" in older and "CVE-2025-23266" in older
    unknown = toolkit_refusal(None)
    assert unknown is not None and "cannot be read" in unknown
    assert [e.cve for e in open_escapes((1, 17, 0))] == ["CVE-2025-23266"]
    assert unconfirmed() == ["CVE-2026-24260"]


def test_the_floor_can_be_raised_never_lowered() -> None:
    assert toolkit_refusal((1, 17, 8), raised=(1, 18, 2)) is not None
    assert toolkit_refusal((1, 18, 2), raised=(1, 18, 2)) is None
    assert toolkit_refusal((1, 17, 7), raised=(1, 0, 0)) is not None
    assert parse_floor("1.18.2") == (1, 18, 2)
    for bad in ("1.18", "latest", "1.18.2-1", ""):
        with pytest.raises(ValueError):
            parse_floor(bad)


# -- the service ------------------------------------------------------------------------


class FakeEngine:
    def __init__(self, runtimes: dict[str, RuntimeInfo], failing: set[str] = frozenset()) -> None:
        self.runtimes_now = runtimes
        self.failing = set(failing)
        self.probed: list[str] = []

    def runtimes(self) -> dict[str, RuntimeInfo]:
        return dict(self.runtimes_now)

    def import_image(self, tar: bytes, ref: str) -> None:
        assert tar and ref

    def probe_runtime(self, runtime: str, image: str, argv: list[str], timeout_s: float) -> str:
        self.probed.append(runtime)
        if runtime in self.failing:
            raise AgentError(f"{runtime} broke")
        return ""


class FakeTools:
    def __init__(self, toolkit: tuple[int, int, int] | None = (1, 17, 8)) -> None:
        self.toolkit = toolkit

    def probe_image(self) -> tuple[bytes, str] | None:
        return b"tar", "qudata-probe:x"

    def sandbox_gpus(self, runsc: str) -> SandboxGpus:
        return SandboxGpus(True, ("550.54.15",))

    def toolkit_version(self) -> tuple[int, int, int] | None:
        return self.toolkit


def _service(engine: FakeEngine, tools: FakeTools, gpus: int = 0) -> Isolation:
    async def driver() -> tuple[int, str | None]:
        return gpus, "550.54.15" if gpus else None

    blocking = Blocking()
    return Isolation(
        engine=DockerPorts(engine, blocking),  # type: ignore[arg-type]
        tools=tools,
        blocking=blocking,
        driver=driver,
        recheck_s=0.0,
    )


def test_the_service_probes_once_and_finds_a_runtime_registered_later() -> None:
    async def scenario() -> None:
        engine = FakeEngine({"runc": RUNC})
        service = _service(engine, FakeTools())
        assert (await service.offer()).names() == ["container"]
        with pytest.raises(Conflict, match="'sandbox'"):
            await service.check(Tier.SANDBOX, 0)
        engine.runtimes_now["runsc"] = RUNSC  # registered while the agent runs
        await service.check(Tier.SANDBOX, 0)  # a refusal makes a fresh pass first
        await service.refresh()
        assert engine.probed.count("runc") == 1 and engine.probed.count("runsc") == 1

    asyncio.run(scenario())


class DownEngine(FakeEngine):
    def runtimes(self) -> dict[str, RuntimeInfo]:
        raise AgentError("Docker at unix:///var/run/docker.sock is not reachable")


def test_docker_down_keeps_the_last_offer_and_names_docker_before_any() -> None:
    async def scenario() -> None:
        down = _service(DownEngine({}), FakeTools())
        with pytest.raises(Unavailable, match="Docker did not answer"):
            await down.check(Tier.CONTAINER, 0)
        engine = FakeEngine(BOTH)
        service = _service(engine, FakeTools())
        assert (await service.offer()).names() == ["container", "sandbox"]
        engine.runtimes = DownEngine({}).runtimes  # type: ignore[method-assign]
        assert (await service.refresh()).names() == ["container", "sandbox"]

    asyncio.run(scenario())


def test_a_failed_probe_is_tried_again_and_gpu_facts_follow_the_host() -> None:
    async def scenario() -> None:
        engine = FakeEngine(BOTH, failing={"runsc"})
        service = _service(engine, FakeTools(toolkit=(1, 17, 7)), gpus=2)
        offer = await service.offer()
        assert offer.names() == ["container"] and "runsc broke" in offer.missing[Tier.SANDBOX]
        with pytest.raises(Conflict, match="CVE-2025-23266"):
            await service.check(Tier.CONTAINER, 1)
        engine.failing.clear()
        offer = await service.refresh()
        assert offer.names() == ["container", "sandbox"]
        assert offer.sandbox_gpus is not None and "--nvproxy" in offer.sandbox_gpus
        # Failed probes run again at each pass (the refused GPU order made one too).
        assert engine.probed.count("runsc") == 3 and engine.probed.count("runc") == 1

    asyncio.run(scenario())
