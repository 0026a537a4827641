"""The declarations of settings.py: unique variables, true defaults, the README held to them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qudata_agent.config import PREFIX, Settings, load_settings
from qudata_agent.settings import Var, declared, help_rows, literal, readme_default

README = Path(__file__).resolve().parents[2] / "README.md"
DECLARED = declared()


def _readme_rows() -> list[list[str]]:
    section = README.read_text(encoding="utf-8").split("## Configuration", 1)[1]
    table = section.split("| Variable | Default | Meaning |", 1)[1].split("\n\n", 1)[0]
    rows = table.strip().splitlines()[1:]  # below the |---| line
    return [[cell.strip() for cell in row.strip().strip("|").split(" | ")] for row in rows]


def test_each_variable_is_declared_once_and_reaches_the_loader() -> None:
    names = [var.env for _, var, _ in DECLARED]
    assert len(names) == len(set(names))
    # load_settings passes on only these from the environment
    assert all(name.startswith(PREFIX) or name == "DOCKER_HOST" for name in names)
    assert "QUDATA_API_KEY" in names and "QUDATA_METRICS_LISTEN" in names


@pytest.mark.parametrize(("name", "var", "default"), DECLARED, ids=[v.env for _, v, _ in DECLARED])
def test_a_default_shown_as_a_value_is_the_default(name: str, var: Var, default: object) -> None:
    assert getattr(Settings(), name) == default
    value = literal(var, default)
    if value is not None and default is not None:
        assert var.parse(var.env, value) == default
        assert getattr(load_settings(environ={var.env: value}), name) == default


def test_the_readme_table_lists_each_setting_with_its_declared_default() -> None:
    rows = _readme_rows()
    found = [(row[0], row[1]) for row in rows]
    wanted = [(f"`{var.env}`", readme_default(var, default)) for _, var, default in DECLARED]
    assert found == wanted, "README.md's Configuration table: one row per declared setting"
    assert all(len(row) == 3 and row[2] for row in rows)


def test_run_help_is_made_from_the_declarations() -> None:
    rows = dict(help_rows())
    assert rows["QUDATA_API_URL"] == "control-plane base URL (https://internal.qudata.ai/v0)"
    assert rows["QUDATA_FIREWALL"].endswith("(on)")
    assert rows["QUDATA_PORT_RANGE"].endswith("(40000-49999)")
    assert rows["QUDATA_LOG_FILE"] == "also log to this file, rotated"  # no default: none shown
    assert list(rows) == [var.env for _, var, _ in DECLARED]


def test_the_api_key_stays_out_of_the_repr() -> None:
    assert "api_key" not in repr(Settings(api_key="k3y-value"))
    assert re.search(r"api_url='https://", repr(Settings()))
