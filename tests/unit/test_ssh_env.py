"""The container's environment as SSH sessions get it (pure text builders)."""

from __future__ import annotations

import subprocess

from qudata_agent.domain.ssh_setup import (
    MAX_ENV_BYTES,
    SSHD_CONFIG_TEXT,
    container_env,
    profile_env_text,
    session_env,
    sshd_config_text,
)


def test_session_variables_bad_names_and_unquotable_values_stay_out() -> None:
    env = session_env(
        [
            "PATH=/opt/conda/bin:/usr/bin",
            "HOME=/nonexistent",
            "TERM=dumb",
            "HOSTNAME=abc",
            "NVIDIA_VISIBLE_DEVICES=GPU-1",
            "BAD-NAME=1",
            "NOVALUE",
            'QUOTE=a"b',
            "BACKSLASH=a\\b",
            "NEWLINE=a\nb",
            "EMPTY=",
            "PATH=/later/wins",
        ]
    )
    assert env == [("PATH", "/later/wins"), ("NVIDIA_VISIBLE_DEVICES", "GPU-1"), ("EMPTY", "")]


def test_the_containers_environment_is_the_images_with_the_orders_on_top() -> None:
    merged = container_env(
        ["PATH=/opt/conda/bin:/usr/bin", "LANG=C.UTF-8"], {"PATH": "/x", "A": "1"}
    )
    assert merged == ["PATH=/x", "LANG=C.UTF-8", "A=1"]


def test_the_environment_is_capped() -> None:
    big = [f"V{i}={'x' * 1000}" for i in range(100)]
    env = session_env(big)
    assert 0 < len(env) < 100
    added = len(sshd_config_text(env)) - len(SSHD_CONFIG_TEXT) + len(profile_env_text(env))
    assert added <= MAX_ENV_BYTES + 200


def test_one_setenv_line_with_each_pair_quoted_whole() -> None:
    assert sshd_config_text([]) == SSHD_CONFIG_TEXT
    text = sshd_config_text([("A", "b c"), ("LD_LIBRARY_PATH", "/usr/local/nvidia/lib64")])
    assert text.startswith(SSHD_CONFIG_TEXT)
    assert text.count("SetEnv") == 1
    assert text.endswith('SetEnv "A=b c" "LD_LIBRARY_PATH=/usr/local/nvidia/lib64"\n')


def test_the_profile_file_gives_the_values_back_exactly_in_sh() -> None:
    env = [("A", "it's $HOME `x` b  c"), ("B", "")]
    script = profile_env_text(env) + 'printf "%s|%s" "$A" "$B"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == "it's $HOME `x` b  c|"


def test_every_nvidia_variable_of_an_image_reaches_the_hook_empty() -> None:
    from qudata_agent.domain.container_spec import neutral_hook_env

    image = ("PATH=/bin", "NVIDIA_IMEX_CHANNELS=all", "NVIDIA_VISIBLE_DEVICES=all", "nvidia_x=1")
    env = neutral_hook_env(image, {"NVIDIA_VISIBLE_DEVICES": "GPU-1", "A": "b"})
    assert env == {
        "NVIDIA_VISIBLE_DEVICES": "GPU-1",  # the agent's own value stays
        "A": "b",
        "NVIDIA_IMEX_CHANNELS": "",
        "nvidia_x": "",
    }


def test_every_nvidia_variable_of_an_order_is_dropped() -> None:
    from qudata_agent.domain.gpus import Resources
    from qudata_agent.domain.order import CreateOrder, build_spec, dropped_env

    order = CreateOrder(
        image="x", env={"NVIDIA_MIG_CONFIG_DEVICES": "all", "NVIDIA_REQUIRE_X": "y", "K": "v"}
    )
    assert dropped_env(order) == ("NVIDIA_MIG_CONFIG_DEVICES", "NVIDIA_REQUIRE_X")
    spec = build_spec(
        order,
        instance_id="i",
        agent_id="a",
        image="x:latest",
        resources=Resources(None, None, 0),
        ports={},
        gpus=(),
        storage_bytes=None,
    )
    assert spec.env == {"K": "v", "NVIDIA_VISIBLE_DEVICES": "void"}
