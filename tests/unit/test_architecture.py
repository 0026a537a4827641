"""The rules of the house, checked on the source: who may import which SDK, who reads the env.

Walks every module under src/qudata_agent with `ast` (nothing is imported or
run) and fails with the list of offending file:line entries.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import qudata_agent

PACKAGE = "qudata_agent"
ROOT = Path(qudata_agent.__file__).resolve().parent

# Each outside library and the files allowed to import it (one, except httpx: two
# outside things speak HTTP, the control plane and the "what is my IP" services
# that find the public address, and each has its own adapter; and cryptography:
# the port's TLS key and the instances' SSH host keys). An owner ending in
# "/" is a package: any module in it may import the library.
SDK_OWNERS: dict[str, tuple[str, ...]] = {
    "docker": ("adapters/docker/",),
    "requests": ("adapters/docker/",),
    "sqlite3": ("adapters/store.py",),
    "pynvml": ("adapters/nvml.py",),
    "httpx": ("adapters/control_plane.py", "adapters/public_address.py"),
    "prometheus_client": ("metrics.py",),
    "uvicorn": ("server.py",),
    "h11": ("server.py",),
    "cryptography": ("adapters/tls.py", "adapters/ssh_files.py"),  # the port's, sshd's keys
}
# Modules of the package with one user: the store's text forms of a record and a
# container spec are read and written by the store alone (no spec JSON elsewhere).
INTERNAL_OWNERS: dict[str, tuple[str, ...]] = {
    f"{PACKAGE}.adapters.store_codec": ("adapters/store.py",),
}
ENV_OWNER = "config.py"
ENV_NAMES = frozenset({"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"})
API_BANNED = (
    "docker",
    "requests",
    "sqlite3",
    "pynvml",
    "httpx",
    "prometheus_client",
    f"{PACKAGE}.adapters",
)
DOMAIN_BANNED = (
    "asyncio",
    "docker",
    "requests",
    "sqlite3",
    "pynvml",
    "httpx",
    "falcon",
    "uvicorn",
    "psutil",
    "socket",
    "subprocess",
    f"{PACKAGE}.adapters",
    f"{PACKAGE}.services",
    f"{PACKAGE}.api",
)
# Services and loops get their adapters through constructors, typed by interfaces of
# their own (Docker's ports: services/engine.py), so they never import an adapter.
USE_CASES_BANNED = (f"{PACKAGE}.adapters",)


@dataclass
class Facts:
    """What one module imports and where it touches the process environment."""

    imports: list[tuple[int, str]] = field(default_factory=list)
    env_reads: list[tuple[int, str]] = field(default_factory=list)


def _module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def _resolve(rel: str, level: int, module: str | None) -> str:
    """The absolute name of a relative `from` import in the file at `rel`."""
    package = _module_name(rel).split(".")
    if not rel.endswith("__init__.py"):
        package = package[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, module] if module else base)


def _constant_import(node: ast.Call) -> str | None:
    """`importlib.import_module("x")` or `__import__("x")` with a literal name."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def facts_of(source: str, rel: str) -> Facts:
    """Imports (absolute names) and environment accesses of the module at `rel`."""
    facts = Facts()
    for node in ast.walk(ast.parse(source, filename=rel)):
        if isinstance(node, ast.Import):
            facts.imports += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(rel, node.level, node.module) if node.level else node.module or ""
            facts.imports.append((node.lineno, base))
            # `from pkg import name` may import the submodule pkg.name
            facts.imports += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            if base in ("os", "posix"):
                facts.env_reads += [
                    (node.lineno, f"from {base} import {alias.name}")
                    for alias in node.names
                    if alias.name in ENV_NAMES
                ]
        elif isinstance(node, ast.Call) and (name := _constant_import(node)):
            facts.imports.append((node.lineno, name))
        elif isinstance(node, ast.Attribute) and node.attr in ENV_NAMES:
            facts.env_reads.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in ENV_NAMES:
            facts.env_reads.append((node.lineno, node.id))
    return facts


def _is_within(module: str, banned: str) -> bool:
    return module == banned or module.startswith(banned + ".")


def _owns(owner: str, rel: str) -> bool:
    return rel.startswith(owner) if owner.endswith("/") else rel == owner


def sdk_owner_offences(rel: str, facts: Facts) -> list[str]:
    return [
        f"{rel}:{line} imports {module} (only {' or '.join(SDK_OWNERS[top])} may)"
        for line, module in facts.imports
        if (top := module.split(".")[0]) in SDK_OWNERS
        and not any(_owns(owner, rel) for owner in SDK_OWNERS[top])
    ]


def internal_owner_offences(rel: str, facts: Facts) -> list[str]:
    return [
        f"{rel}:{line} imports {module} (only {' or '.join(owners)} may)"
        for line, module in facts.imports
        for owned, owners in INTERNAL_OWNERS.items()
        if _is_within(module, owned) and rel not in owners
    ]


def env_offences(rel: str, facts: Facts) -> list[str]:
    if rel == ENV_OWNER:
        return []
    return [f"{rel}:{line} reads the environment ({what})" for line, what in facts.env_reads]


def _banned_offences(rel: str, facts: Facts, under: str, banned: tuple[str, ...]) -> list[str]:
    if not rel.startswith(under):
        return []
    return [
        f"{rel}:{line} imports {module} (banned under {under})"
        for line, module in facts.imports
        if any(_is_within(module, b) for b in banned)
    ]


def api_offences(rel: str, facts: Facts) -> list[str]:
    return _banned_offences(rel, facts, "api/", API_BANNED)


def domain_offences(rel: str, facts: Facts) -> list[str]:
    return _banned_offences(rel, facts, "domain/", DOMAIN_BANNED)


def use_case_offences(rel: str, facts: Facts) -> list[str]:
    return [
        offence
        for under in ("services/", "loops/")
        for offence in _banned_offences(rel, facts, under, USE_CASES_BANNED)
    ]


Rule = Callable[[str, Facts], list[str]]
RULES: dict[str, Rule] = {
    "each SDK is imported by its one adapter": sdk_owner_offences,
    "the store's text forms are the store's": internal_owner_offences,
    "only config.py reads the environment": env_offences,
    "the API layer is thin": api_offences,
    "the domain is pure": domain_offences,
    "services and loops import no adapter": use_case_offences,
}


def check(source: str, rel: str) -> list[str]:
    """Every rule's offences for one module's source."""
    facts = facts_of(source, rel)
    return [offence for rule in RULES.values() for offence in rule(rel, facts)]


def _modules() -> Iterator[tuple[str, str]]:
    for path in sorted(ROOT.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


# the real tree


def test_the_walk_sees_the_package() -> None:
    names = {rel for rel, _ in _modules()}
    for expected in ("config.py", "adapters/store.py", "adapters/control_plane.py", "api/app.py"):
        assert expected in names
    assert len(names) > 20


@pytest.mark.parametrize("rule", sorted(RULES))
def test_the_source_keeps_the_rule(rule: str) -> None:
    offences = [
        offence for rel, source in _modules() for offence in RULES[rule](rel, facts_of(source, rel))
    ]
    assert offences == [], f"{rule}:\n  " + "\n  ".join(offences)


def test_the_owners_do_import_what_they_own() -> None:
    """A rule about an owner that no longer owns anything would guard nothing."""
    sources = dict(_modules())
    for sdk, owners in SDK_OWNERS.items():
        for owner in owners:
            imported = {
                module.split(".")[0]
                for rel, source in sources.items()
                if _owns(owner, rel)
                for _, module in facts_of(source, rel).imports
            }
            assert sdk in imported, f"{owner} no longer imports {sdk}"
    assert facts_of(sources[ENV_OWNER], ENV_OWNER).env_reads


# the checker itself


@pytest.mark.parametrize(
    ("rel", "source", "expected"),
    [
        ("services/x.py", "import docker\n", "services/x.py:1 imports docker"),
        ("adapters/host.py", "import docker.errors\n", "imports docker.errors"),
        ("adapters/docker_x.py", "import docker\n", "(only adapters/docker/ may)"),
        ("services/x.py", "from qudata_agent.adapters.docker import DockerEngine\n", "services/"),
        ("loops/x.py", "from ..adapters.docker.ports import DockerPorts\n", "banned under loops/"),
        ("adapters/host.py", "from requests import exceptions\n", "imports requests"),
        ("loops/x.py", "import sqlite3 as db\n", "imports sqlite3"),
        ("app.py", "\n\nfrom pynvml import nvmlInit\n", "app.py:3 imports pynvml"),
        ("services/x.py", "def f():\n    import httpx\n", "services/x.py:2 imports httpx"),
        ("adapters/host.py", "import httpx\n", "adapters/host.py:1 imports httpx"),
        ("api/x.py", "import prometheus_client\n", "imports prometheus_client"),
        ("services/x.py", "from prometheus_client import Counter\n", "(only metrics.py may)"),
        ("services/x.py", "import importlib\nimportlib.import_module('docker')\n", "docker"),
        ("services/x.py", "m = __import__('sqlite3')\n", "imports sqlite3"),
        ("services/x.py", "import os\nv = os.environ['X']\n", "services/x.py:2 reads the env"),
        ("services/x.py", "import os\nv = os.environ.get('X')\n", "reads the environment"),
        ("services/x.py", "import os\nv = os.getenv('X')\n", "reads the environment"),
        ("cli.py", "import os as o\no.putenv('X', '1')\n", "reads the environment"),
        ("services/x.py", "from os import environ\n", "from os import environ"),
        ("services/x.py", "from os import getenv as g\n", "from os import getenv"),
        ("api/x.py", "import httpx\n", "api/x.py:1 imports httpx (banned under api/)"),
        ("api/x.py", "from qudata_agent.adapters.store import Store\n", "banned under api/"),
        ("api/x.py", "from qudata_agent.adapters import store\n", "banned under api/"),
        ("api/resources/x.py", "from ...adapters.store import Store\n", "banned under api/"),
        ("api/resources/x.py", "from ... import adapters\n", "banned under api/"),
        ("domain/x.py", "import asyncio\n", "domain/x.py:1 imports asyncio"),
        ("domain/x.py", "from asyncio import Lock\n", "banned under domain/"),
        ("domain/x.py", "import psutil\n", "banned under domain/"),
        ("domain/x.py", "from qudata_agent.services import instances\n", "banned under domain/"),
        ("domain/x.py", "from ..api.schemas import Ok\n", "banned under domain/"),
        ("domain/x.py", "from ..adapters import nvml\n", "banned under domain/"),
        ("services/x.py", "from ..adapters.store_codec import spec_from_json\n", "store.py may"),
        ("services/x.py", "from qudata_agent.adapters import store_codec\n", "store.py may"),
    ],
)
def test_the_checker_finds_a_planted_violation(rel: str, source: str, expected: str) -> None:
    offences = check(source, rel)
    assert any(expected in offence for offence in offences), offences


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        ("adapters/docker/client.py", "import docker\nimport docker.errors\nimport requests\n"),
        ("adapters/docker/spec.py", "import docker.types\n"),
        ("adapters/store.py", "import sqlite3\nfrom .store_codec import spec_to_json\n"),
        ("adapters/nvml.py", "def f():\n    import pynvml\n"),
        ("adapters/control_plane.py", "import httpx\n"),
        ("adapters/public_address.py", "import httpx\n"),
        ("metrics.py", "from prometheus_client import Counter\n"),
        ("config.py", "import os\nsource = os.environ\n"),
        ("api/x.py", "from qudata_agent.domain.instance import Instance\nimport falcon\n"),
        ("api/x.py", "from .body import read_json\nfrom ..errors import NotFound\n"),
        ("domain/x.py", "import json\nfrom .inventory import GpuInfo\n"),
        ("services/x.py", "import os\npid = os.getpid()\nimport asyncio\n"),
        ("services/x.py", "environment = {'a': 1}\nx = environment_name = 2\n"),
        ("loops/x.py", "from qudata_agent.services.engine import Events\n"),
    ],
)
def test_the_checker_accepts_what_is_allowed(rel: str, source: str) -> None:
    assert check(source, rel) == []


def test_relative_imports_resolve_from_the_file_and_from_a_package_init() -> None:
    assert _resolve("api/resources/x.py", 2, "body") == "qudata_agent.api.body"
    assert _resolve("api/resources/x.py", 3, "adapters") == "qudata_agent.adapters"
    assert _resolve("api/resources/__init__.py", 1, "x") == "qudata_agent.api.resources.x"
    assert _resolve("api/resources/__init__.py", 2, None) == "qudata_agent.api"
    assert _resolve("config.py", 1, "errors") == "qudata_agent.errors"


# `Records` (services/records.py) is the only writer of instance rows: every insert,
# update, failed build and delete goes through it (DESIGN.md: status changes go
# through one path). Naming one of these store methods anywhere else (a call, or
# handing the bound method to a thread) is an offence; the store defines them.
INSTANCE_ROW_WRITERS = frozenset(
    {"insert_instance", "update_instance", "fail_instance", "delete_instance", "release_resources"}
)
INSTANCE_ROW_OWNERS = frozenset({"services/records.py", "adapters/store.py"})


def attribute_uses(rel: str, source: str, names: frozenset[str], what: str) -> list[str]:
    """`rel:line what (name)` for every attribute of `source` named in `names`."""
    return [
        f"{rel}:{node.lineno} {what} ({node.attr})"
        for node in ast.walk(ast.parse(source, filename=rel))
        if isinstance(node, ast.Attribute) and node.attr in names
    ]


def instance_row_offences(rel: str, source: str) -> list[str]:
    if rel in INSTANCE_ROW_OWNERS:
        return []
    return attribute_uses(
        rel, source, INSTANCE_ROW_WRITERS, "writes an instance row around Records"
    )


def test_only_records_writes_instance_rows() -> None:
    offences = [o for rel, source in _modules() for o in instance_row_offences(rel, source)]
    assert offences == [], "\n  ".join(offences)


@pytest.mark.parametrize(
    "source",
    [
        "self._records.store.delete_instance(i)\n",
        "await blocking.quick(self._records.store.fail_instance, failed)\n",
        "store = self._records.store\nstore.insert_instance(instance, volumes)\n",
        "self._store.update_instance(instance)\n",
    ],
)
def test_the_instance_row_checker_finds_one(source: str) -> None:
    assert instance_row_offences("services/instances.py", source)
    assert instance_row_offences("services/records.py", source) == []


def test_the_instance_row_checker_accepts_records_methods() -> None:
    source = "await self._records.delete(i)\nself._records.insert(instance, volumes)\n"
    assert instance_row_offences("services/instances.py", source) == []


# Nothing runs inside a tenant's container on the agent's initiative (CIS Docker 5.23):
# no module of the agent may so much as name Docker's exec calls.
CONTAINER_EXEC = frozenset({"exec_run", "exec_create", "exec_start", "exec_inspect"})


def exec_offences(rel: str, source: str) -> list[str]:
    return attribute_uses(rel, source, CONTAINER_EXEC, "runs something in a container")


def test_nothing_runs_inside_a_tenants_container() -> None:
    offences = [o for rel, source in _modules() for o in exec_offences(rel, source)]
    assert offences == [], "\n  ".join(offences)


def test_the_exec_checker_finds_one() -> None:
    assert exec_offences("a.py", "api.exec_create(cid, ['sh'])\n") == [
        "a.py:1 runs something in a container (exec_create)"
    ]
    assert exec_offences("a.py", "container.exec_run(['sh'])\n")
    assert exec_offences("a.py", "container.logs()\n") == []


# `status` and `doctor` only look: they load what reads the state directory and
# the host, never the agent's wiring, its services, loops or API (status once
# loaded 117 of the package's modules to read six names).
LOOKERS = ("status.py", "doctor/", "tunnel_doctor.py")
LOOKERS_BANNED = tuple(
    f"{PACKAGE}.{name}" for name in ("app", "services", "loops", "api", "server", "acceptor")
)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in it, lazily too)."""
    sources = dict(_modules())
    known = {_module_name(rel) for rel in sources}
    graph: dict[str, set[str]] = {}
    for rel, source in sources.items():
        targets: set[str] = set()
        for _, name in facts_of(source, rel).imports:
            parts = name.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()  # `from pkg.mod import Name` names pkg.mod.Name
            while parts:  # importing a module runs its packages' __init__ first
                targets.add(".".join(parts))
                parts.pop()
        graph[_module_name(rel)] = targets
    return graph


def looker_offences(graph: dict[str, set[str]], start: str) -> list[str]:
    """The banned modules `start` reaches, each with the chain of imports that gets there."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        module = todo.pop()
        for target in sorted(graph.get(module, ())):
            if target not in chains:
                chains[target] = [*chains[module], target]
                todo.append(target)
    return [
        " -> ".join(chain)
        for module, chain in sorted(chains.items())
        if any(_is_within(module, banned) for banned in LOOKERS_BANNED)
    ]


def test_status_and_doctor_load_no_service_loop_api_or_app() -> None:
    graph = _import_graph()
    starts = [
        _module_name(rel)
        for rel, _ in _modules()
        if any(rel == looker or rel.startswith(looker) for looker in LOOKERS)
    ]
    assert len(starts) > 3
    offences = [chain for start in starts for chain in looker_offences(graph, start)]
    assert offences == [], "\n  ".join(offences)


def test_the_looker_checker_follows_imports_through_modules() -> None:
    graph = {
        f"{PACKAGE}.status": {f"{PACKAGE}.adapters.store"},
        f"{PACKAGE}.adapters.store": {f"{PACKAGE}.services.records"},
    }
    assert looker_offences(graph, f"{PACKAGE}.status") == [
        f"{PACKAGE}.status -> {PACKAGE}.adapters.store -> {PACKAGE}.services.records"
    ]
    assert looker_offences({f"{PACKAGE}.status": {f"{PACKAGE}.config"}}, f"{PACKAGE}.status") == []


def test_importing_status_and_doctor_loads_none_of_it() -> None:
    """The same, measured: what `import` puts in sys.modules in a fresh interpreter."""
    code = (
        "import sys, qudata_agent.status, qudata_agent.doctor, qudata_agent.tunnel_doctor\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('qudata_agent')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = done.stdout.split()
    assert f"{PACKAGE}.status" in loaded
    assert [m for m in loaded if any(_is_within(m, b) for b in LOOKERS_BANNED)] == []
