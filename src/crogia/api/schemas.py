"""Request and response models. Field names marked compat in API.md are kept exactly."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_serializer,
    field_validator,
    model_validator,
)

from crogia.sandbox.egress import MAX_ENTRIES as EGRESS_MAX_ENTRIES
from crogia.sandbox.egress import EgressPolicy, check_entry

# What `setenv` accepts: a name of letters, digits and `_` (no leading digit), a value without NUL.
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]
NO_NUL = r"^[^\x00]*$"
"""Stored text and command lines cannot hold a NUL (PostgreSQL text, C strings): refused up front."""
EnvValue = Annotated[str, StringConstraints(pattern=NO_NUL, max_length=32_768)]
ENV_MAX_ENTRIES = 64
ENV_MAX_BYTES = 32_768
METADATA_MAX_BYTES = 16_384


def _env_within_caps(value: dict[str, str]) -> dict[str, str]:
    # Every command carries the env: a big one costs each exec, and past ~2 MB exec fails (E2BIG).
    if len(value) > ENV_MAX_ENTRIES:
        raise ValueError(f"env may hold at most {ENV_MAX_ENTRIES} entries (it has {len(value)})")
    size = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in value.items())
    if size > ENV_MAX_BYTES:
        raise ValueError(f"env may hold at most {ENV_MAX_BYTES} bytes of names and values (it has {size})")
    return value


Env = Annotated[
    dict[EnvName, EnvValue],
    AfterValidator(_env_within_caps),
    Field(description=f"Extra environment variables: at most {ENV_MAX_ENTRIES} and {ENV_MAX_BYTES} bytes."),
]


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value)
    return False


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_serializer("*", when_used="json")
    def _utc_z(self, value: Any) -> Any:
        # ISO-8601 UTC with a `Z`, as API.md asks, whatever the driver handed back.
        if isinstance(value, datetime):
            return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return value


class _Request(_Model):
    # Strict: the document says `"tty": boolean`, so `0` or `"yes"` is a 422, not a guess.
    model_config = ConfigDict(extra="ignore", strict=True)


class Message(_Model):
    message: str


class ErrorBody(_Model):
    detail: str = Field(..., description="What went wrong, in one human sentence.")


# --- sessions ---


class NetworkPolicy(_Request):
    egress: Literal["internet", "none", "allow"] = Field(
        "internet",
        description="`internet`: the public internet only (never private, host or metadata ranges); "
        "`none`: nothing; `allow`: only the names and CIDRs in `allow`.",
    )
    allow: list[str] = Field(
        default_factory=list,
        max_length=EGRESS_MAX_ENTRIES,
        description="Host names (`pypi.org`), `*.` wildcards (any name below: `*.github.com`) and "
        "public IPs or CIDRs (`203.0.113.0/24`); private, loopback and link-local ones are refused.",
    )

    @field_validator("allow")
    @classmethod
    def _entries(cls, value: list[str]) -> list[str]:
        out: list[str] = []
        for entry in value:
            normal = check_entry(entry)  # ValueError naming the entry -> 422
            if normal not in out:
                out.append(normal)
        return out

    @model_validator(mode="after")
    def _allow_only_with_allow(self) -> NetworkPolicy:
        if self.allow and self.egress != "allow":
            raise ValueError(f'"allow" entries need "egress": "allow" (it is {self.egress!r})')
        return self

    def policy(self) -> EgressPolicy:
        return EgressPolicy(self.egress, tuple(self.allow))

    @classmethod
    def of(cls, policy: EgressPolicy) -> NetworkPolicy:
        return cls.model_construct(egress=policy.egress, allow=list(policy.allow))


class SessionCreate(_Request):
    task: str = Field(
        "", max_length=100_000, pattern=NO_NUL, description="A label for the session; the task is not run."
    )
    image: str | None = Field(
        None, max_length=256, pattern=NO_NUL, description="Docker image (Docker backend only)."
    )
    env: Env = Field(default_factory=dict, description="Extra environment for every command.")
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Free JSON kept with the session: at most {METADATA_MAX_BYTES} bytes.",
    )
    network: NetworkPolicy | None = Field(None, description="Egress policy (default: `internet`).")

    @field_validator("metadata")
    @classmethod
    def _no_nul_inside(cls, value: dict[str, Any]) -> dict[str, Any]:
        if _holds_nul(value):
            raise ValueError("metadata must not contain a NUL character")
        # Stored with the row and sent with every listing: kept small.
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > METADATA_MAX_BYTES:
            raise ValueError(f"metadata may be at most {METADATA_MAX_BYTES} bytes as JSON (it is {size})")
        return value


class SessionPublic(_Model):
    session_id: str
    container_id: str
    workdir: str
    created: datetime
    last_task: str
    status: str
    container_status: str
    sandbox: str
    last_activity: datetime
    task_running: bool
    label: str
    image: str
    metadata: dict[str, Any]
    network: NetworkPolicy = Field(default_factory=NetworkPolicy, description="Its egress policy.")
    usage: dict[str, int] = Field(default_factory=dict, description="Tokens used by all its tasks.")


class SessionPatch(_Request):
    model_config = ConfigDict(extra="forbid", strict=True)
    network: NetworkPolicy = Field(..., description="The new egress policy, for new connections.")


# --- tasks ---


class TaskCreate(_Request):
    # Unknown fields are refused here: a misspelt option (`max_turn`) must not be silently dropped.
    model_config = ConfigDict(extra="forbid", strict=True)

    task: str = Field(..., min_length=1, max_length=1_000_000, pattern=NO_NUL)
    model: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9._:/@+-]+$",
        description="Overrides MODEL_NAME.",
    )
    max_turns: int | None = Field(None, ge=1, le=1000, description="Overrides MAX_TURNS.")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        None, description="Overrides MODEL_REASONING_EFFORT (reasoning models only)."
    )


class TaskAccepted(_Model):
    message: str
    task: str
    task_id: str
    status: str


class TaskPublic(_Model):
    task_id: str
    session_id: str
    task: str
    status: Literal["queued", "running", "completed", "failed", "cancelled"]
    created: datetime
    started: datetime | None
    ended: datetime | None
    error: str | None
    usage: dict[str, int]


# --- processes ---


class ProcessCreate(_Request):
    cmd: str = Field(..., min_length=1, max_length=100_000)
    cwd: str = Field("/workspace", max_length=4096)
    env: Env = Field(default_factory=dict)


class ProcessPublic(_Model):
    pid: int
    cmd: str
    status: Literal["running", "exited", "stopped"]
    log: str
    started: datetime
    exit_code: int | None
    ended: datetime | None


class ProcessLogs(_Model):
    logs: str
    pid: int


# --- files ---


class FileItem(_Model):
    name: str
    path: str
    type: Literal["file", "directory", "symlink"]
    size: int | None
    modified: datetime


class FileList(_Model):
    path: str
    items: list[FileItem]
    truncated: bool = False
    """True when the folder (or tree, with `depth`) held more than the 10,000 entries a listing returns."""


class FileContent(_Model):
    path: str
    content: str


class FileWrite(_Request):
    path: str = Field(..., max_length=4096)
    content: str


class FileMove(_Request):
    src: str = Field(..., max_length=4096)
    dst: str = Field(..., max_length=4096)
    overwrite: bool = False


class MkdirRequest(_Request):
    path: str = Field(..., max_length=4096)


# --- search ---


class FileSearch(_Request):
    pattern: str = Field(..., min_length=1, max_length=4096)
    path: str = Field(".", max_length=4096)
    file_types: str = Field("*", max_length=4096)
    include_ignored: bool = False
    include_hidden: bool = False
    max_results: int | None = Field(None, ge=1, le=100_000)


class FileSearchResult(_Model):
    pattern: str
    path: str
    matches: list[str]
    truncated: bool


class GrepSearch(_Request):
    pattern: str = Field(..., min_length=1, max_length=4096)
    path: str = Field(".", max_length=4096)
    file_types: str = Field("*", max_length=4096)
    regex: bool = True
    case_sensitive: bool = True
    context: int = Field(0, ge=0, le=20)
    include_ignored: bool = False
    include_hidden: bool = False
    max_results: int | None = Field(None, ge=1, le=100_000)


class GrepMatchPublic(_Model):
    file: str
    line: int
    content: str
    context_before: list[str] = Field(default_factory=list)
    context_after: list[str] = Field(default_factory=list)


class GrepResult(_Model):
    pattern: str
    path: str
    matches: list[GrepMatchPublic]
    truncated: bool


# --- shell ---


class ShellRequest(_Request):
    cmd: str = Field(..., min_length=1, max_length=1_000_000)
    tty: bool = Field(
        False, description="Run on a pseudo-terminal (stdout and stderr merged, TERM set). Off by default."
    )
    timeout: float | None = Field(None, gt=0, description="Seconds; bounded by SHELL_MAX_TIMEOUT.")
    max_output: int | None = Field(None, ge=1, description="Bytes; bounded by SHELL_MAX_OUTPUT.")
    cwd: str = Field("/workspace", max_length=4096)


class ShellResult(_Model):
    command: str
    output: str
    timestamp: datetime
    exit_code: int
    timed_out: bool
    truncated: bool


# --- health ---


class Health(_Model):
    status: str
    """`healthy`, or `degraded` while events cannot be stored (`store_error`)."""
    timestamp: datetime
    active_sessions: int
    docker_available: bool
    active_shells: int = Field(0, description="Open interactive terminals (`/api/sessions/{id}/shells`).")
    sandbox_backend: str
    network: str = Field(description="Sandbox network isolation: isolated, none, or shared (not isolated).")
    version: str
    store_error: str | None = None
    """Why events cannot be stored (the database has been away for a while); absent when they can."""
    userns: str = "off"
    """What sandbox root is on the host: "per-session-uid" (bubblewrap), "userns-remap" or
    "rootless" (Docker), "off" (host root: see the README's Privileges part), "unknown"."""
    seccomp: str = "off"
    """The sandboxes' seccomp filter: "default" (Docker's), "crogia" (ours), "off", "unknown"."""
    files: str = "host"
    """Who serves files and search (SANDBOX_FILES): "host" (the server) or "daemon" (the sandbox)."""
    transport: str = "unix"
    """How the server reaches the sandboxes' daemons: "unix" (a socket), "tcp" (SANDBOX_TRANSPORT) or
    "tcp+tls" (SANDBOX_TCP_TLS)."""


class PortPublic(_Model):
    port: int
    url: str
    """The preview URL of this port (`.../ports/{port}/`, or its own host with PREVIEW_DOMAIN)."""
    address: str
    """The address it listens on inside the sandbox (`0.0.0.0`, `127.0.0.1`, `::`...)."""
    pid: int | None = None
    """A process holding the socket, when the sandbox could tell."""
    process: int | None = None
    """The pid of the session's background process (`start_process`) it belongs to, if any."""


class PortList(_Model):
    ports: list[PortPublic]


class PreviewLink(_Model):
    url: str
    """Open it in a browser: it sets a cookie for this preview and redirects to the clean URL."""
    expires: datetime
