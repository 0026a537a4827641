"""The wire format of the agent's own HTTP API (CONTRACT.md section 1).

Owns the pydantic models that requests are validated into and answers are
documented by; `openapi.py` builds /openapi.json from them, so the document
cannot drift from what the code accepts. What stays true: field names here are
the contract's names; extra answer fields are allowed, renamed ones are not.
"""

from __future__ import annotations

from typing import Annotated, Generic, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    field_validator,
)

T = TypeVar("T")


class Ok(BaseModel, Generic[T]):
    """Every successful answer: `{"ok": true, "data": ...}`."""

    ok: Literal[True] = True
    data: T


class Failure(BaseModel):
    """Every failed answer: `{"ok": false, "error": "<human message>"}`."""

    ok: Literal[False] = False
    error: str = Field(description="What went wrong, written for a person; never holds a secret")


class Empty(BaseModel):
    """A request or answer with no fields."""

    model_config = ConfigDict(extra="forbid")


# -- instances ------------------------------------------------------------------

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,255}$"


class CreateInstance(BaseModel):
    """`POST /instances`. Unknown extra fields are ignored; known ones are strict."""

    model_config = ConfigDict(extra="ignore")

    image: str = Field(min_length=1, max_length=512)
    image_tag: str | None = Field(default=None, max_length=128)
    storage_gb: StrictFloat | StrictInt | None = Field(default=None, gt=0, le=1_000_000)
    env_variables: dict[
        Annotated[str, StringConstraints(pattern=_ENV_NAME)],
        Annotated[StrictStr, StringConstraints(max_length=65536)] | StrictInt | StrictFloat,
    ] = Field(default_factory=dict, max_length=512)
    ports: dict[
        Annotated[str, StringConstraints(max_length=16)],
        Annotated[StrictStr, StringConstraints(max_length=16)] | StrictInt,
    ] = Field(default_factory=dict, max_length=64)
    command: str | None = Field(default=None, max_length=65536)
    ssh_enabled: StrictBool = False
    registry: str | None = Field(default=None, max_length=512)
    login: str | None = Field(default=None, max_length=512)
    password: SecretStr | None = Field(default=None, max_length=4096)
    volumes: dict[
        Annotated[str, StringConstraints(max_length=64)],
        Annotated[StrictStr, StringConstraints(max_length=1024)],
    ] = Field(
        default_factory=dict,
        max_length=16,
        description="volume id -> absolute mount path in the container (section 7)",
    )
    isolation: Literal["container", "sandbox"] = Field(
        default="container",
        description="container: runc with the agent's hardening; sandbox: gVisor (runsc),"
        " where the instance's system calls never reach the host kernel (CONTRACT.md section 9)",
    )

    @field_validator("env_variables")
    @classmethod
    def _no_nul(cls, env: dict[str, str | int | float]) -> dict[str, str | int | float]:
        for key, value in env.items():
            if "\x00" in str(value):
                raise ValueError(f"value of {key} holds a NUL character")
        return env

    @field_validator("command")
    @classmethod
    def _command_no_nul(cls, command: str | None) -> str | None:
        # Docker accepts it, and the container then fails to start, over and over.
        if command is not None and "\x00" in command:
            raise ValueError("holds a NUL character")
        return command


class CreatedInstance(BaseModel):
    success: bool = True
    instance_id: str
    status: str
    ports: dict[str, str] = Field(description="container port -> host port")


class PullProgressView(BaseModel):
    bytes_done: int
    bytes_total: int
    layers_done: int
    layers_total: int


class SshState(BaseModel):
    status: Literal["disabled", "installing", "ready", "failed"]
    port: str | None = Field(default=None, description="host port of the container's port 22")
    reason: str | None = None


class GpuHealthEvent(BaseModel):
    """A GPU health problem NVML reported for one of the instance's GPUs."""

    uuid: str
    event: Literal["xid", "ecc_uncorrected"]
    xid: int | None = Field(default=None, description="the XID number, for event xid")
    at: float = Field(description="when the agent received it, seconds since the epoch")


class StorageState(BaseModel):
    """What the instance's `storage_gb` got: a size limit on its writable layer, or a watch."""

    requested_gb: float = Field(description="the storage_gb asked for (GiB)")
    enforced: bool = Field(
        description="true: Docker caps the writable layer at this size; false: this host's "
        "storage driver cannot, so the layer is only measured (QUDATA_STORAGE_POLICY=monitor)"
    )
    used_gb: float | None = Field(
        default=None,
        description="the writable layer's size with the image's VOLUME paths at the last check"
        " (where no cap holds them all)",
    )
    over_limit: bool = Field(description="the writable layer and VOLUME paths exceed requested_gb")
    default: bool = Field(
        default=False,
        description="true: the create named no storage_gb, and this is the host's default share",
    )


class NetworkState(BaseModel):
    """The instance's bytes since it was created (CONTRACT.md section 8): never lower."""

    rx_bytes: int = Field(description="bytes received (IP packets, headers included)")
    tx_bytes: int = Field(description="bytes sent")
    rx_public_bytes: int = Field(
        description="of rx_bytes, those from outside the private and link-local ranges"
    )
    tx_public_bytes: int = Field(description="of tx_bytes, those to outside those ranges")


class ImageCheckState(BaseModel):
    """How the instance's image was vouched for when it was created."""

    digest: str | None = Field(
        default=None, description="the image's manifest digest (null: never came from a registry)"
    )
    checked: bool = Field(
        description="true: the registry confirmed access and the digest for this order"
    )
    note: str | None = Field(
        default=None, description="why it was not checked (registry unreachable, pinned, local)"
    )


class InstanceState(BaseModel):
    """`GET /instances`: with no instance, status `destroyed` and null ids."""

    instance_id: str | None
    container_id: str | None
    status: Literal["pending", "running", "paused", "error", "destroyed"]
    allocated_ports: dict[str, str] = Field(default_factory=dict)
    image: str | None = None
    phase: str | None = Field(
        default=None, description="while pending: queued, pulling, creating, starting"
    )
    reason: str | None = None
    exit_code: int | None = None
    gpus: list[str] = Field(default_factory=list)
    ssh_enabled: bool = False
    created_at: float | None = None
    pull: PullProgressView | None = None
    ssh: SshState | None = None
    last_logs: str | None = Field(default=None, description="after the container exited on its own")
    logs: str | None = None
    gpu_health: list[GpuHealthEvent] = Field(
        default_factory=list,
        description="XID (application-caused ones left out) and uncorrectable ECC errors "
        "of the instance's GPUs since it was created, oldest first",
    )
    storage: StorageState | None = Field(
        default=None,
        description="the disk the instance got: what storage_gb asked for, or the host's default",
    )
    image_check: ImageCheckState | None = Field(
        default=None, description="once the image is ready: its digest and how it was checked"
    )
    network: NetworkState | None = Field(
        default=None, description="its network use, once the agent has metered it"
    )
    isolation: Literal["container", "sandbox"] | None = Field(
        default=None, description="the isolation tier it runs under"
    )
    isolation_notes: list[str] = Field(
        default_factory=list, description="what works differently in this tier than in a container"
    )


class InstanceList(BaseModel):
    """`GET /v1/instances`: the view of `GET /instances`, one per instance, oldest first."""

    instances: list[InstanceState]


class InstanceAction(BaseModel):
    """`PUT /instances`: `{"action": "stop"|"start"|"restart"}` (`command` accepted too)."""

    model_config = ConfigDict(extra="ignore")

    action: Literal["stop", "start", "restart"] = Field(
        validation_alias=AliasChoices("action", "command")
    )


# -- the host (several instances, CONTRACT.md section 4) ---------------------------


class GpuCapacity(BaseModel):
    total: int
    free: list[str] = Field(description="UUIDs of the GPUs no instance holds")


class Amount(BaseModel):
    total: float | None
    free: float | None


class PortCapacity(BaseModel):
    range: str = Field(description="QUDATA_PORT_RANGE, e.g. 40000-49999")
    free: int


class VolumeTotals(BaseModel):
    count: int
    disk_gb: float = Field(description="the sizes of all volumes, GiB")
    used_gb: float = Field(description="what their backings take on the disk now, GiB")


class TunnelState(BaseModel):
    """Tunnel mode: the WireGuard tunnel to the relay (CONTRACT.md section 6)."""

    state: Literal["up", "stale", "down"] = Field(description="from the last handshake's age")
    interface: str
    endpoint: str | None = Field(description="the relay, RELAY:PORT")
    address: str | None = Field(description="this host's tunnel address (CIDR)")
    public_address: str | None = Field(description="the relay's public IPv4 renters use")
    last_handshake_at: float | None = Field(description="Unix time; null: none yet")
    handshake_age_s: float | None
    problem: str | None = Field(description="what is wrong and the fix; null when working")


class HostState(BaseModel):
    """`GET /v1/host`: what the host has for instances (after the reserves) and what is free."""

    max_instances: int
    instances: int
    gpus: GpuCapacity
    cpu_cores: Amount
    memory_gb: Amount
    disk_gb: Amount = Field(description="Docker's data root; free less what is promised")
    ports: PortCapacity
    volumes: VolumeTotals | None = None
    tunnel: TunnelState | None = Field(default=None, description="tunnel mode only")
    tls_pubkey_sha256: str | None = Field(
        default=None,
        description="base64 SHA-256 of the port's public key (curl --pinnedpubkey sha256//...);"
        " null when TLS is off",
    )
    isolation: list[str] = Field(
        default_factory=lambda: ["container"],
        description="the isolation tiers this host offers (each seen to start a container)",
    )


# -- volumes (CONTRACT.md section 7) ----------------------------------------------


class CreateVolume(BaseModel):
    """`POST /v1/volumes`: a size, and optionally a volume to copy the data of."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    size_gb: StrictFloat | StrictInt | None = Field(
        default=None, gt=0, le=1_000_000, description="GiB; default with `from`: the source's"
    )
    source: StrictStr | None = Field(
        default=None, alias="from", max_length=64, description="a volume id to copy"
    )


class VolumeState(BaseModel):
    volume_id: str
    size_gb: float
    used_gb: float | None = Field(description="written so far; null while not measurable")
    status: Literal["ready", "in_use", "error"]
    instance_id: str | None
    created_at: float
    reason: str | None = Field(default=None, description="why it is `error`")
    mechanism: str = Field(description="how its size is enforced on this host")


class VolumeList(BaseModel):
    volumes: list[VolumeState]


class VolumeDeleted(BaseModel):
    volume_id: str
    deleted: bool = True


# -- ssh ------------------------------------------------------------------------


class SshKeyRequest(BaseModel):
    """`POST /ssh`, `DELETE /ssh`: one public key (`public_key` accepted too)."""

    model_config = ConfigDict(extra="ignore")

    ssh_pubkey: StrictStr = Field(
        validation_alias=AliasChoices("ssh_pubkey", "public_key"), max_length=16384
    )


class SshKeys(BaseModel):
    keys: list[str]
    added: bool | None = Field(default=None, description="POST: false when already present")
