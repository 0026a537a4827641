"""A volume across a restart of the machine's main dockerd (CONTRACT.md section 7).

This restarts the main dockerd, so it runs with the other fault tests at the
end, under the exclusive dockerd lock, and starts dockerd again whatever
happens. What must hold: the instance comes back on the same volume with the
renter's file in it, and writes to it again.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from faults.test_zz_dockerd_restart import _docker_answers, _main_dockerd, _restore_dockerd, _wait
from support.agent_proc import AgentProcess
from support.volumes import shell, volume_agent

AgentFactory = Callable[..., AgentProcess]


@pytest.mark.timeout(240)
def test_a_volume_keeps_its_data_across_a_dockerd_restart(agent_factory: AgentFactory) -> None:
    assert _docker_answers(), "dockerd must be up before the test"
    with volume_agent(agent_factory) as rig:
        vol = rig.new_volume(0.05)
        state = rig.run_with({vol["volume_id"]: "/workspace"})
        assert "rc=0" in shell(state, "echo before > /workspace/f && sync")
        started_at = state["created_at"]
        try:
            pid = _main_dockerd()
            os.kill(pid, signal.SIGTERM)
            _wait(lambda: not Path(f"/proc/{pid}").exists(), 90, "dockerd exit")
        finally:
            _restore_dockerd()
        deadline = time.monotonic() + 60
        while True:
            after = rig.state(state["instance_id"])
            if after["status"] == "running" and "rc=0" in shell(after, "true"):
                break
            assert time.monotonic() < deadline, f"not running again: {after}"
            time.sleep(0.5)
        assert after["created_at"] == started_at and after["container_id"] == state["container_id"]
        assert "before" in shell(after, "cat /workspace/f")
        assert "rc=0" in shell(after, "echo again >> /workspace/f")
        assert rig.volume(vol["volume_id"])["status"] == "in_use"
