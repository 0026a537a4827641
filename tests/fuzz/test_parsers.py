"""Property tests of the parsers that take outside input (hypothesis, no Docker).

Each parser either returns a valid value or raises its own refusal
(`InvalidRequest`, `Conflict` where the table says so, `ConfigError` for
settings): never another exception, and never a value that breaks what its
module docstring promises. Where a value can be written back out, reading it
again gives the same value (round trips). Runs derandomized: the same cases
every time.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fuzz import strategies as s
from qudata_agent.api.body import describe_validation_error
from qudata_agent.api.resources.instances import to_order
from qudata_agent.api.schemas import CreateInstance, SshKeyRequest
from qudata_agent.config import ConfigError, Settings, load_settings, read_env_file
from qudata_agent.domain.gpus import (
    CPU_KEY,
    GIB,
    GPU_KEY,
    MAX_CPU_CORES,
    MAX_GPU_COUNT,
    MAX_MEMORY_GB,
    MEMORY_KEY,
    MIN_CPU_CORES,
    MIN_MEMORY_BYTES,
    Resources,
    parse_resources,
)
from qudata_agent.domain.image_ref import ImageRef, resolve_image
from qudata_agent.domain.placement import choose_gpus
from qudata_agent.domain.ports import MAX_PORTS, PortAllocator, parse_port_requests
from qudata_agent.domain.ssh_keys import (
    PublicKey,
    add_key,
    parse_key,
    remove_key,
    render_authorized_keys,
)
from qudata_agent.domain.topology import GpuPlace, GpuTopology
from qudata_agent.errors import Conflict, InvalidRequest

FUZZ = settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
MARKER = "Zq9SECRETzq9"  # a value that must never come back in an error message

# -- image references ------------------------------------------------------------


@FUZZ
@given(image=st.one_of(s.hostile_text, s.path), image_tag=st.one_of(st.none(), s.hostile_text))
def test_image_reference_is_valid_or_refused(image: str, image_tag: str | None) -> None:
    try:
        ref = resolve_image(image, image_tag)
    except InvalidRequest as e:
        assert e.message.startswith(("field 'image'", "field 'image_tag'"))
        return
    assert ref.tag is not None or ref.digest is not None
    assert resolve_image(str(ref), None).repository == ref.repository


@st.composite
def _reference(draw: st.DrawFn) -> tuple[str, str | None, str, str | None, str | None]:
    """(image text, image_tag, repository, tag, digest) built from the grammar."""
    registry = draw(st.one_of(st.none(), s.host))
    path = draw(s.path)
    first = path.split("/")[0]
    # Docker's rule: a first component with a '.' (or `localhost`) names a registry host.
    assume(registry is not None or "/" not in path or ("." not in first and first != "localhost"))
    repository = path if registry is None else f"{registry}/{path}"
    tag = draw(st.one_of(st.none(), s.tag))
    digest = draw(st.one_of(st.none(), s.digest))
    text = repository + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    assume(len(repository) <= 255)
    return text, draw(st.one_of(st.none(), s.tag)), repository, tag, digest


@FUZZ
@given(_reference())
def test_well_formed_references_are_read_as_written(
    ref_parts: tuple[str, str | None, str, str | None, str | None],
) -> None:
    text, image_tag, repository, tag, digest = ref_parts
    ref = resolve_image(text, image_tag)
    expected_tag = tag if (tag or digest) else (image_tag or "latest")
    assert ref == ImageRef(repository, expected_tag, digest)
    first = repository.split("/")[0]
    has_host = "/" in repository and ("." in first or ":" in first or first == "localhost")
    assert ref.registry == (first if has_host else None)
    # Round trip: the text it pulls names the same image (a digest pins it; its tag goes).
    again = resolve_image(str(ref), None)
    assert again == ImageRef(repository, None if digest else ref.tag, digest)
    assert str(again) == str(ref)


@FUZZ
@given(prefix=s.hostile_text, suffix=s.hostile_text)
def test_image_errors_never_echo_the_input(prefix: str, suffix: str) -> None:
    image = f"{prefix}user:{MARKER}@{suffix}"
    try:
        resolve_image(image, None)
    except InvalidRequest as e:
        assert MARKER not in e.message


# -- ports -----------------------------------------------------------------------


@FUZZ
@given(
    ports=st.dictionaries(s.port_key, s.port_value, max_size=8),
    ssh=st.booleans(),
)
def test_port_map_is_valid_or_refused(ports: dict[str, object], ssh: bool) -> None:
    try:
        requests = parse_port_requests(ports, ssh)
    except InvalidRequest as e:
        assert e.message.startswith("field 'ports")
        return
    assert len(requests) <= MAX_PORTS
    for key, host_port in requests.items():
        number, _, protocol = key.partition("/")
        assert protocol in ("", "udp")
        assert str(int(number)) == number and 1 <= int(number) <= 65535
        assert host_port is None or 1 <= host_port <= 65535
    fixed = [p for p in requests.values() if p is not None]
    assert len(fixed) == len(set(fixed))
    if ssh:
        assert "22" in requests
    # Round trip: the normal form reads back as itself.
    written = {key: "auto" if port is None else str(port) for key, port in requests.items()}
    assert parse_port_requests(written, ssh) == requests


@FUZZ
@given(
    low=st.integers(1, 65535),
    width=st.integers(0, 40),
    requests=st.dictionaries(
        st.integers(1, 65535).map(str), st.one_of(st.none(), st.integers(0, 65536)), max_size=10
    ),
    taken=st.sets(st.integers(1, 65535), max_size=20),
    reserved=st.frozensets(st.integers(1, 65535), max_size=5),
    unbindable=st.sets(st.integers(1, 65535), max_size=20),
    start=st.one_of(st.none(), st.integers(0, 70000)),
)
def test_allocator_hands_out_all_or_nothing(
    low: int,
    width: int,
    requests: dict[str, int | None],
    taken: set[int],
    reserved: frozenset[int],
    unbindable: set[int],
    start: int | None,
) -> None:
    high = min(65535, low + width)
    allocator = PortAllocator((low, high), reserved, lambda p, _: p not in unbindable, start)
    taken |= set(range(low, high + 1, 3))  # make a crowded range likely
    try:
        chosen = allocator.allocate(requests, taken)
    except (Conflict, InvalidRequest):
        return
    assert set(chosen) == set(requests)
    assert len(set(chosen.values())) == len(chosen)
    for key, port in chosen.items():
        assert port not in taken and port not in reserved and port not in unbindable
        if requests[key] is None:
            assert low <= port <= high
        else:
            assert port == requests[key]
    assert low <= allocator.cursor <= high


# -- SSH keys --------------------------------------------------------------------


@FUZZ
@given(text=st.one_of(s.hostile_text, s.ssh_key_line().map(lambda k: k[0] + "\n" + k[0])))
def test_key_text_is_a_key_or_refused(text: str) -> None:
    try:
        key = parse_key(text)
    except InvalidRequest as e:
        assert e.message.startswith("field 'ssh_pubkey'")
        return
    assert "\n" not in key.line() and "\r" not in key.line()
    assert parse_key(key.line()) == key


@FUZZ
@given(s.ssh_key_line(), st.sampled_from(["", " ", "\n", " \t"]))
def test_well_formed_keys_read_back_as_written(
    parts: tuple[str, str, str, str], padding: str
) -> None:
    line, kind, blob, comment = parts
    key = parse_key(padding + line + padding)
    assert key == PublicKey(kind, blob, comment)
    assert parse_key(key.line()) == key


@FUZZ
@given(
    st.lists(s.ssh_key_line(), max_size=6),
    s.ssh_key_line(),
    st.text(alphabet="abc-@.", max_size=8),
)
def test_key_list_add_remove_and_render(
    existing: list[tuple[str, str, str, str]], new: tuple[str, str, str, str], other_comment: str
) -> None:
    keys: list[PublicKey] = []
    for line, *_ in existing:
        keys, _added = add_key(keys, parse_key(line))
    key = parse_key(new[0])
    with_key, added = add_key(keys, key)
    assert added == all(k.identity != key.identity for k in keys)
    # The same key with another comment is the same key.
    renamed = PublicKey(key.kind, key.blob, other_comment)
    assert add_key(with_key, renamed) == (with_key, False)
    without, removed = remove_key(with_key, renamed)
    assert removed
    assert all(k.identity != key.identity for k in without)
    text = render_authorized_keys(with_key)
    lines = text.splitlines()
    assert len(lines) == 1 + len(with_key)
    assert [parse_key(line) for line in lines[1:]] == with_key


# -- resource values -------------------------------------------------------------


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={CPU_KEY: s.number_text, MEMORY_KEY: s.number_text, GPU_KEY: s.number_text},
    ),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)
def test_resources_are_valid_or_refused(env: dict[str, str], other: dict[str, str]) -> None:
    try:
        resources = parse_resources({**other, **env})
    except InvalidRequest as e:
        assert e.message.startswith("field 'env_variables.QUDATA_")
        return
    if resources.cpu_cores is not None:
        assert math.isfinite(resources.cpu_cores)
        assert MIN_CPU_CORES <= resources.cpu_cores <= MAX_CPU_CORES
    if resources.memory_bytes is not None:
        assert MIN_MEMORY_BYTES <= resources.memory_bytes <= MAX_MEMORY_GB * GIB
    assert 0 <= resources.gpu_count <= MAX_GPU_COUNT
    written = {GPU_KEY: str(resources.gpu_count)}
    if resources.cpu_cores is not None:
        written[CPU_KEY] = repr(resources.cpu_cores)
    again = parse_resources(written)
    assert (again.cpu_cores, again.gpu_count) == (resources.cpu_cores, resources.gpu_count)


@FUZZ
@given(
    cpu=st.floats(MIN_CPU_CORES, MAX_CPU_CORES),
    memory_gb=st.floats(MIN_MEMORY_BYTES / GIB + 1e-6, MAX_MEMORY_GB),
    gpus=st.integers(0, MAX_GPU_COUNT),
)
def test_resource_values_round_trip(cpu: float, memory_gb: float, gpus: int) -> None:
    env = {CPU_KEY: repr(cpu), MEMORY_KEY: repr(memory_gb), GPU_KEY: str(gpus)}
    assert parse_resources(env) == Resources(cpu, int(memory_gb * GIB), gpus)


@FUZZ
@given(
    count=st.integers(0, 10),
    host=st.lists(st.sampled_from([f"GPU-{i}" for i in range(8)]), max_size=10, unique=True),
    allocated=st.sets(st.sampled_from([f"GPU-{i}" for i in range(10)])),
)
def test_gpu_choice_is_all_or_nothing(count: int, host: list[str], allocated: set[str]) -> None:
    topology = GpuTopology(gpus=tuple(GpuPlace(uuid) for uuid in host))
    free = [g for g in host if g not in allocated]
    try:
        chosen = choose_gpus(topology, free, count)
    except ValueError:
        assert len(free) < count
        return
    assert len(chosen) == count == len(set(chosen))
    assert all(g in host and g not in allocated for g in chosen)
    assert choose_gpus(topology, free, count) == chosen  # the same inputs, the same GPUs


# -- the create body on the wire -------------------------------------------------

_json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), s.hostile_text
)
_json = st.recursive(
    _json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(s.hostile_text, inner, max_size=3)
    ),
    max_leaves=8,
)
_body = st.fixed_dictionaries(
    {"image": st.one_of(s.path, s.hostile_text, _json)},
    optional={
        "image_tag": st.one_of(st.none(), s.tag, _json),
        "storage_gb": st.one_of(st.none(), st.floats(), st.integers(-5, 2_000_000), _json),
        "env_variables": st.one_of(
            st.dictionaries(
                st.sampled_from([CPU_KEY, MEMORY_KEY, GPU_KEY, "A", "a b", "\x00"]),
                st.one_of(s.number_text, st.integers(), st.floats(), _json),
                max_size=4,
            ),
            _json,
        ),
        "ports": st.one_of(st.dictionaries(s.port_key, s.port_value, max_size=4), _json),
        "command": st.one_of(st.none(), s.hostile_text, _json),
        "ssh_enabled": st.one_of(st.booleans(), _json),
        "registry": st.one_of(st.none(), s.hostile_text),
        "login": st.one_of(st.none(), s.hostile_text),
        "password": st.one_of(st.none(), st.just(MARKER), _json),
    },
)


@FUZZ
@given(_body)
@example({"image": "busybox", "command": "echo a\x00b"})
@example({"image": "busybox", "env_variables": {"A": "a\x00b"}})
def test_create_body_is_an_order_or_refused_naming_a_field(body: dict[str, object]) -> None:
    try:
        parsed = CreateInstance.model_validate(body)
    except ValidationError as e:
        message = describe_validation_error(e)
        assert message.startswith("field '")
        assert MARKER not in message
        return
    try:
        order = to_order(parsed)
        resolve_image(order.image, order.image_tag)
        parse_resources(order.env)
        parse_port_requests(order.ports, order.ssh_enabled)
    except InvalidRequest as e:
        assert e.message.startswith("field '")
        assert MARKER not in e.message
        return
    # What is accepted can be handed to Docker: no NUL in anything that reaches the container.
    assert "\x00" not in (order.command or "")
    assert all("\x00" not in k + v for k, v in order.env.items())
    assert MARKER not in repr(order)


@FUZZ
@given(st.one_of(st.dictionaries(s.hostile_text, _json, max_size=3), _json))
def test_key_body_is_a_request_or_refused(body: object) -> None:
    try:
        parsed = SshKeyRequest.model_validate(body)
    except ValidationError as e:
        assert describe_validation_error(e)
        return
    with contextlib.suppress(InvalidRequest):
        parse_key(parsed.ssh_pubkey)


# -- settings --------------------------------------------------------------------

_CONFIG_VARS = [
    "QUDATA_API_KEY",
    "QUDATA_API_URL",
    "QUDATA_AGENT_HOST",
    "QUDATA_AGENT_PORT",
    "QUDATA_STATE_DIR",
    "QUDATA_PORT_RANGE",
    "QUDATA_ADDRESS",
    "QUDATA_ADDRESS_LOOKUP_URLS",
    "QUDATA_LOG_LEVEL",
    "QUDATA_LOG_FORMAT",
    "QUDATA_LOG_FILE",
    "QUDATA_LOG_FILE_MAX_MB",
    "QUDATA_CP_TIMEOUT",
    "QUDATA_CP_BACKOFF_MAX",
    "QUDATA_SHUTDOWN_TIMEOUT",
    "QUDATA_PULL_INACTIVITY_TIMEOUT",
    "QUDATA_STOP_TIMEOUT",
    "QUDATA_SYNC_INTERVAL",
    "QUDATA_INVENTORY_INTERVAL",
    "QUDATA_NETWORK",
    "QUDATA_BRIDGE",
    "QUDATA_FIREWALL",
    "QUDATA_EGRESS_ALLOW",
    "QUDATA_NET_MBPS_DEFAULT",
    "QUDATA_EGRESS_BLOCK_PORTS",
    "QUDATA_EGRESS_DENY",
    "QUDATA_EGRESS_CONN_RATE",
    "QUDATA_STORAGE_POLICY",
    "QUDATA_STORAGE_CHECK_INTERVAL",
    "QUDATA_CRASH_RESTARTS",
    "QUDATA_CONTAINER_LOG_MB",
    "QUDATA_MAX_INSTANCES",
    "QUDATA_RESERVED_CPU_CORES",
    "QUDATA_RESERVED_MEMORY_GB",
    "DOCKER_HOST",
]
_config_value = st.one_of(
    s.hostile_text,
    s.number_text,
    st.integers(-1, 70000).map(str),
    st.tuples(st.integers(0, 70000), st.integers(0, 70000)).map(lambda r: f"{r[0]}-{r[1]}"),
    st.sampled_from(
        ["on", "off", "json", "TEXT", "debug", "/var/tmp/x", "http://x", "10.0.0.0/8", "none"]
    ),
)


@FUZZ
@given(st.dictionaries(st.sampled_from(_CONFIG_VARS), _config_value, max_size=6))
def test_settings_are_valid_or_refused_naming_the_variable(env: dict[str, str]) -> None:
    assume(all("\x00" not in v for v in env.values()))
    env.setdefault("QUDATA_API_KEY", f"key-{MARKER}")
    try:
        settings_ = load_settings(env)
    except ConfigError as e:
        message = str(e)
        assert any(var in message for var in env)
        assert MARKER not in message
        return
    assert isinstance(settings_, Settings)
    lo, hi = settings_.port_range
    assert 1 <= lo <= hi <= 65535
    if settings_.agent_port is not None:
        assert not lo <= settings_.agent_port <= hi
    assert settings_.state_dir.is_absolute()


@FUZZ
@given(lo=st.integers(1, 65535), hi=st.integers(1, 65535), port=st.integers(1, 65535))
def test_port_settings_round_trip(lo: int, hi: int, port: int) -> None:
    env = {"QUDATA_PORT_RANGE": f" {lo}-{hi} ", "QUDATA_AGENT_PORT": str(port)}
    if lo > hi or lo <= port <= hi:
        with pytest.raises(ConfigError):
            load_settings(env)
        return
    loaded = load_settings(env)
    assert (loaded.port_range, loaded.agent_port) == ((lo, hi), port)


@FUZZ
@given(st.lists(st.one_of(s.hostile_text, st.from_regex(r"[A-Z_]{1,8}=.{0,8}", fullmatch=True))))
def test_config_file_is_read_or_refused(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.env"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
        try:
            values = read_env_file(path)
        except ConfigError as e:
            assert str(path) in str(e)
            return
    assert all(key and key == key.strip() for key in values)
    assert all("\n" not in key + value for key, value in values.items())
