"""The runtime checks against the real things: Docker's runtimes, a probe under runsc, and the
GPU decision with the installed runsc (and a driver version made up for the test)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.adapters.docker.spec import create_kwargs
from qudata_agent.adapters.runtimes import probe_image, sandbox_gpus, toolkit_version
from qudata_agent.adapters.store_codec import spec_from_json, spec_to_json
from qudata_agent.domain.container_spec import ContainerSpec
from qudata_agent.domain.isolation import RuntimeInfo, SandboxGpus, sandbox_gpu_refusal
from qudata_agent.errors import AgentError

RUNSC = "/usr/bin/runsc"
FAKE_DRIVER = "550.54.15"


@pytest.fixture(scope="module")
def engine() -> DockerEngine:
    return DockerEngine()


def test_docker_has_runsc_registered_as_the_test_setup_does(engine: DockerEngine) -> None:
    runtimes = engine.runtimes()
    assert "runc" in runtimes
    assert runtimes["runsc"].path == RUNSC
    assert "--network=host" in runtimes["runsc"].args


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_a_probe_container_starts_under_each_runtime(engine: DockerEngine, runtime: str) -> None:
    made = probe_image()
    assert made is not None, "the host has no static busybox"
    tar, ref = made
    engine.import_image(tar, ref)
    engine.import_image(tar, ref)  # a second time changes nothing
    assert engine.probe_runtime(runtime, ref, ["/busybox", "echo", "probe-ok"], 30) == "probe-ok"


def test_a_probe_under_a_runtime_docker_lacks_fails_and_leaves_nothing(
    engine: DockerEngine,
) -> None:
    made = probe_image()
    assert made is not None
    tar, ref = made
    engine.import_image(tar, ref)
    with pytest.raises(AgentError, match="qudata-no-such-runtime"):
        engine.probe_runtime("qudata-no-such-runtime", ref, ["/busybox", "true"], 10)
    with pytest.raises(AgentError, match="exited 3"):
        engine.probe_runtime("runsc", ref, ["/busybox", "sh", "-c", "exit 3"], 30)
    for runtime in ("qudata-no-such-runtime", "runsc"):
        mine = f"name=qudata-probe-{runtime}-{os.getpid()}-"  # this process's probes only
        left = subprocess.run(["docker", "ps", "-aq", "--filter", mine], capture_output=True)
        assert left.returncode == 0 and left.stdout.strip() == b""


def test_the_installed_runsc_decides_gpus_in_the_sandbox_for_a_made_up_driver() -> None:
    gpus = sandbox_gpus(RUNSC)
    runtime = RuntimeInfo("runsc", RUNSC, ("--nvproxy",))
    why = sandbox_gpu_refusal(runtime, gpus, FAKE_DRIVER)
    if gpus.nvproxy:  # a gVisor release with nvproxy: the driver decides
        assert gpus.supported_drivers, "runsc listed no supported driver"
        listed = gpus.supported_drivers[-1]
        assert sandbox_gpu_refusal(runtime, gpus, listed) is None
        assert why is None if FAKE_DRIVER in gpus.supported_drivers else FAKE_DRIVER in str(why)
    else:  # Debian 12's runsc (2022) has no nvproxy: GPU orders in the sandbox are refused
        assert why is not None and "has no nvproxy" in why and RUNSC in why


def test_a_runsc_that_lists_drivers_is_read_through_the_same_call(tmp_path: Path) -> None:
    fake = tmp_path / "runsc"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$1 $2" = "nvproxy list-supported-drivers" ] || exit 128\n'
        "printf '535.104.05\\n550.54.15\\n'\n"
    )
    fake.chmod(0o755)
    gpus = sandbox_gpus(str(fake))
    assert gpus == SandboxGpus(True, ("535.104.05", "550.54.15"))
    runtime = RuntimeInfo("runsc", str(fake), ("--nvproxy=true",))
    assert sandbox_gpu_refusal(runtime, gpus, FAKE_DRIVER) is None
    other = sandbox_gpu_refusal(runtime, gpus, "570.86.15")
    assert other is not None and "570.86.15" in other
    assert sandbox_gpus(str(tmp_path / "missing")) == SandboxGpus(False)


def test_no_toolkit_reads_as_unknown_not_as_fixed() -> None:
    assert toolkit_version(("qudata-no-such-tool",)) is None


def test_cdi_gpus_become_cdi_device_requests() -> None:
    spec = ContainerSpec(
        instance_id="i1",
        agent_id="a1",
        image="img:1",
        command=("run",),
        gpu_uuids=("GPU-aaaa", "GPU-bbbb"),
        cdi_gpus=True,
    )
    (request,) = create_kwargs(spec)["device_requests"]
    assert request["Driver"] == "cdi"
    assert request["DeviceIDs"] == ["nvidia.com/gpu=GPU-aaaa", "nvidia.com/gpu=GPU-bbbb"]
    assert not request["Capabilities"]
    legacy_spec = spec_from_json(spec_to_json(spec).replace("true", "false"))
    assert legacy_spec is not None
    legacy = create_kwargs(legacy_spec)
    assert legacy["device_requests"][0]["DeviceIDs"] == ["GPU-aaaa", "GPU-bbbb"]
