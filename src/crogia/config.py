"""Settings: the seed's variable names plus Crogia's own, read from the environment and `.env`."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_LOCAL = ("localhost", "127.0.0.1")
"""The original web client's dev servers (3000, and Vite's 5173) run on these."""
IMAGE_REFERENCE = re.compile(
    r"[a-z0-9]+(?:[._/:-][a-z0-9]+)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)
"""Docker's reference grammar, loosely: lower-case path parts, an optional port, tag and digest."""


class Settings(BaseSettings):
    """Every setting Crogia reads. Names match the seed's `env.example` where the seed had one."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- the seed's settings (names are compat) ---
    openai_api_key: str = ""
    model_name: str = "o4-mini"
    base_directory: Path = Path("./crogia-data")
    host: str | None = None
    """Unset: 0.0.0.0 when API_TOKENS is set, else 127.0.0.1 (an open server stays on this machine)."""
    port: int = Field(8000, ge=1, le=65535)
    debug: bool = True
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [f"http://{host}:{port}" for port in (3000, 5173) for host in _LOCAL]
    )
    docker_base_image: str = "crogia-sandbox:latest"
    log_level: Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"] = "INFO"

    # --- model ---
    openai_base_url: str | None = None
    max_turns: int = Field(50, ge=1, le=1000)
    model_retries: int = Field(4, ge=0, le=20)
    model_timeout: float = Field(600.0, gt=0)
    model_api: Literal["chat", "responses"] = "chat"
    """`chat` (Chat Completions: every OpenAI-compatible server) or `responses` (OpenAI's Responses API)."""
    model_reasoning_effort: Literal["", "none", "minimal", "low", "medium", "high", "xhigh"] = ""
    """Sent to reasoning models; empty: the server's default."""
    model_reasoning: bool | None = None
    """Unset: from the model's name (o-series and gpt-5 are reasoning models)."""
    model_context_tokens: int = Field(0, ge=0)
    """The model's context window; 0: from the model's name (128k for unknown names)."""
    model_max_output_tokens: int = Field(0, ge=0)
    """Tokens reserved for (and the limit sent on) each answer; 0: from the model's name."""
    model_temperature: float | None = Field(None, ge=0, le=2)
    """Sent only to models that accept one; unset: the server's default."""
    context_compact_at: float = Field(0.8, gt=0.1, le=1.0)
    """Compact the conversation sent to the model past this share of its window."""
    context_keep_turns: int = Field(3, ge=1, le=100)
    context_max_compactions: int = Field(5, ge=1, le=100)
    task_max_tokens: int = Field(0, ge=0)
    """Total tokens one task may use (prompt + completion over all its calls); 0: no limit."""
    task_timeout: float = Field(0.0, ge=0)
    """Seconds one task may run; 0: no limit."""

    # --- storage ---
    database_url: str = ""
    """Empty: a SQLite file under BASE_DIRECTORY. `postgresql+asyncpg://...` selects PostgreSQL."""
    workspace_retention: Literal["delete", "keep"] = "delete"

    # --- sandboxes ---
    sandbox_backend: Literal["auto", "docker", "bubblewrap"] = "auto"
    sandbox_memory_mb: int = Field(2048, ge=64)
    sandbox_cpus: float = Field(1.0, gt=0)
    sandbox_pids_limit: int = Field(512, ge=16)
    sandbox_network: str = "isolated"
    """`isolated`: public internet only (no host, no private range, no other sandbox); `none`: no network.
    Old Docker modes (bridge, host, a network name) still work but are not isolated (a warning says so)."""
    sandbox_dns: str = ""
    """DNS server the sandboxes' queries go to (an IP address); empty: the host's resolver."""
    sandbox_pool_size: int = Field(2, ge=0, le=64)
    """Pre-started sandboxes new sessions claim (~10 ms instead of 40-250 ms; ~4-7 MB each idle). 0: off."""
    sandbox_disk_mb: int = Field(0, ge=0)
    """Workspace quota (a loop-mounted ext4 image per workspace; needs root). 0: no quota."""
    sandbox_tmp_mb: int = Field(1024, ge=0)
    """Size of the sandbox's tmpfs /tmp (at most half of SANDBOX_MEMORY_MB). 0: no size of our own."""
    sandbox_state_mb: int = Field(64, ge=1)
    """Size of the sandbox's tmpfs /run/crogia, its process logs (at most a quarter of SANDBOX_MEMORY_MB)."""
    sandbox_uid_range: str = "700000000-700065535"
    """Host uids a bubblewrap sandbox's root maps to, one per session (FIRST-LAST); "": host root."""
    sandbox_transport: Literal["unix", "tcp"] = "unix"
    """How the server reaches a Docker sandbox's daemon: `unix` (a socket in a server-only folder the
    container sees read-only), `tcp` (the server dials the container's own address, both ends
    proving a per-sandbox secret). bubblewrap always uses a socketpair."""
    sandbox_tcp_tls: bool = False
    """SANDBOX_TRANSPORT=tcp: speak TLS 1.3 to the daemon, which presents a self-signed certificate
    made for its sandbox at each start (the server pins it; the proofs are bound to it)."""
    docker_workspace: Literal["bind", "volume"] = "bind"
    """Docker: a workspace is a host folder bound in (`bind`) or a Docker volume (`volume`: nothing
    of it on the server's disk; needs SANDBOX_TRANSPORT=tcp and files served by the daemon)."""
    sandbox_files: Literal["host", "daemon"] = "host"
    """Who serves a session's files and search: `host` (the server, on the host folder; faster) or
    `daemon` (the executor inside the sandbox; needs no host path)."""
    session_idle_ttl: float = Field(3600.0, ge=0)
    """Seconds without activity before a session's sandbox is stopped (it starts again on use). 0: never."""

    # --- limits ---
    shell_timeout: float = Field(120.0, gt=0)
    shell_max_timeout: float = Field(3600.0, gt=0)
    shell_max_output: int = Field(1_048_576, ge=1024)
    file_read_max_bytes: int = Field(10_485_760, ge=1024)
    files_timeout: float = Field(60.0, gt=0)
    """SANDBOX_FILES=daemon: seconds a file operation may wait on the daemon without progress (a reply,
    or a stream's next bytes or credit); then 504. A slow transfer that keeps moving is never cut."""
    request_max_bytes: int = Field(104_857_600, ge=1024)
    json_max_bytes: int = Field(8_388_608, ge=1024)
    """Bodies other than streamed uploads (held in memory to be parsed); at most REQUEST_MAX_BYTES."""
    process_stop_grace: float = Field(5.0, ge=0)
    search_max_results: int = Field(1000, ge=1)
    terminals_per_session: int = Field(8, ge=1, le=64)
    """Open interactive terminals a session may have (`POST .../shells` is a 409 past it)."""
    terminal_scrollback_bytes: int = Field(262_144, ge=4096, le=16_777_216)
    """Recent output a terminal keeps for a client that (re)connects; a slow client loses the oldest."""
    sandbox_events_kept: int = Field(1000, ge=10)
    """A session's newest `egress_blocked` / `port_opened` / `port_closed` events kept in the store
    (older ones are deleted as new ones come: a replay from before them skips their `seq`)."""

    # --- previews (servers in the sandbox, see the README's Previews section) ---
    preview_timeout: float = Field(30.0, gt=0)
    """Seconds a server in the sandbox has to answer a proxied request (its head; then per read); 504."""
    preview_poll_seconds: float = Field(1.5, gt=0)
    """How often listening ports are read while someone could care (a stream client, a process)."""
    preview_domain: str = ""
    """With it, `{port}-{session_id}.PREVIEW_DOMAIN` (Host header) serves that preview at its root."""
    preview_link_ttl: float = Field(300.0, gt=0)
    """Seconds a signed preview link (`POST .../ports/{port}/link`) stays valid."""
    preview_cookie_ttl: float = Field(43_200.0, gt=0)
    """Seconds the cookie a signed link sets authorises its preview."""
    preview_link_key: str = ""
    """Key signing preview links and cookies; empty: a random one per start (links end with a restart)."""
    preview_handoff: bool = True
    """On a local unix channel the daemon hands each preview connection's socket over and the
    server speaks to the port itself (one relay fewer); false: every byte through the daemon."""
    preview_splice: bool = False
    """Long preview downloads go from the daemon's channel to the client by splice (the least server
    CPU per byte) rather than by copies (more throughput when clients share the server's cores)."""

    # --- trust ---
    api_tokens: str = ""
    """Comma-separated `tenant=token` pairs; empty disables authentication."""

    # --- the front door (see the README's Security section) ---
    max_connections: int = Field(4096, ge=16)
    """Open connections (HTTP and WebSocket) served; lowered at start-up to what RLIMIT_NOFILE leaves."""
    header_timeout: float = Field(10.0, gt=0)
    """Seconds a client has to send a request's line and headers (from its first byte, or connecting)."""
    body_timeout: float = Field(30.0, gt=0)
    """Seconds a request body may stall; after that grace it must also average BODY_MIN_RATE."""
    body_min_rate: int = Field(1024, ge=1)
    """Bytes per second a request body must average once BODY_TIMEOUT has passed."""
    keepalive_timeout: float = Field(5.0, gt=0)
    """Seconds an idle keep-alive connection stays open between requests."""
    shutdown_timeout: float = Field(10.0, gt=0)
    """On SIGTERM, seconds a request in flight (a long `/shell`, a stalled download) may still take
    once the drain is done; then it is stopped: 503 if it has not answered yet, else cut short."""
    max_header_bytes: int = Field(16_384, ge=1024, le=1_048_576)
    """Bytes of request line plus headers; past it: 431."""
    max_headers: int = Field(100, ge=8, le=1000)
    """Header fields per request; past it: 431."""
    ws_ping_interval: float = Field(20.0, gt=0)
    """Seconds between the server's WebSocket pings."""
    ws_ping_timeout: float = Field(20.0, gt=0)
    """Seconds a WebSocket peer has to answer a ping before it is closed as dead (1011)."""
    ws_compression: bool = True
    """permessage-deflate for WebSocket clients that offer it: less bandwidth, more server CPU."""
    max_sessions: int = Field(256, ge=0)
    """Sessions on this server (stopped ones count); 0: no cap."""
    max_sessions_per_tenant: int = Field(64, ge=0)
    """Sessions per tenant; 0: no cap."""
    sandbox_images: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Images a session may ask for (comma-separated); empty: DOCKER_BASE_IMAGE only."""

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("sandbox_images", mode="before")
    @classmethod
    def _split_images(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("sandbox_images")
    @classmethod
    def _check_images(cls, value: list[str]) -> list[str]:
        for image in value:
            if not IMAGE_REFERENCE.fullmatch(image):
                raise ValueError(f"SANDBOX_IMAGES entry {image!r} is not an image reference (name[:tag])")
        return value

    @property
    def allowed_images(self) -> list[str]:
        """SANDBOX_IMAGES, or DOCKER_BASE_IMAGE alone when it is empty."""
        return self.sandbox_images or [self.docker_base_image]

    @field_validator("api_tokens")
    @classmethod
    def _check_tokens(cls, value: str) -> str:
        parse_tokens(value)
        return value

    @property
    def tokens(self) -> dict[str, str]:
        """{token: tenant} from API_TOKENS; empty when authentication is off."""
        return parse_tokens(self.api_tokens)

    @field_validator("sandbox_disk_mb")
    @classmethod
    def _check_disk(cls, value: int) -> int:
        if 0 < value < 64:
            raise ValueError("SANDBOX_DISK_MB must be 0 (no quota) or at least 64")
        return value

    @model_validator(mode="after")
    def _check_volume(self) -> Settings:
        if self.docker_workspace == "volume" and self.sandbox_transport != "tcp":
            raise ValueError("DOCKER_WORKSPACE=volume needs SANDBOX_TRANSPORT=tcp (no host folder to share)")
        if self.sandbox_tcp_tls and self.sandbox_transport != "tcp":
            raise ValueError("SANDBOX_TCP_TLS=true needs SANDBOX_TRANSPORT=tcp (TLS is for the TCP channel)")
        if self.docker_workspace == "volume" and getattr(self, "sandbox_files", "daemon") != "daemon":
            # (SANDBOX_FILES comes with the files interface: a volume has no host folder to serve)
            raise ValueError("DOCKER_WORKSPACE=volume needs SANDBOX_FILES=daemon (no host folder to serve)")
        if self.docker_workspace == "volume" and self.sandbox_disk_mb:
            raise ValueError("SANDBOX_DISK_MB (a host disk image) does not apply to DOCKER_WORKSPACE=volume")
        return self

    @field_validator("sandbox_dns")
    @classmethod
    def _check_dns(cls, value: str) -> str:
        if value:
            ipaddress.ip_address(value)  # a ValueError names the bad value
        return value

    @field_validator("sandbox_network")
    @classmethod
    def _check_network(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("SANDBOX_NETWORK must be isolated, none, or a Docker network mode")
        return value.strip()

    @field_validator("sandbox_uid_range")
    @classmethod
    def _check_uid_range(cls, value: str) -> str:
        from crogia.sandbox.userns import UidRange  # stdlib only: cheap

        if value.strip():
            UidRange.parse(value)
        return value.strip()

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def bind_host(self) -> str:
        if self.host:
            return self.host
        return "0.0.0.0" if self.api_tokens.strip() else "127.0.0.1"

    @field_validator("base_directory")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Resolved once here: resolving touches the file system, and `data_dir` is read per request.
        return value.expanduser().resolve()

    @property
    def data_dir(self) -> Path:
        return self.base_directory

    @property
    def workspaces_dir(self) -> Path:
        return self.data_dir / "workspaces"

    @property
    def sandbox_state_dir(self) -> Path:
        return self.data_dir / "sandboxes"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'crogia.db'}"


def parse_tokens(raw: str) -> dict[str, str]:
    """`alice=tok-a,bob=tok-b` -> {"tok-a": "alice", "tok-b": "bob"}."""
    tokens: dict[str, str] = {}
    for pair in filter(None, (item.strip() for item in raw.split(","))):
        name, sep, token = pair.partition("=")
        if not sep or not name.strip() or not token.strip():
            raise ValueError(f"API_TOKENS entry {name.strip()!r} is not of the form name=token")
        tokens[token.strip()] = name.strip()
    return tokens
