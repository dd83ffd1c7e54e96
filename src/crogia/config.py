"""Settings: the seed's variable names plus Crogia's own, read from the environment and `.env`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


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
        default_factory=lambda: ["http://localhost:3000", "http://127.0.0.1:3000"]
    )
    docker_base_image: str = "crogia-sandbox:latest"
    log_level: Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"] = "INFO"

    # --- model ---
    openai_base_url: str | None = None
    max_turns: int = Field(50, ge=1, le=1000)
    model_retries: int = Field(4, ge=0, le=20)
    model_timeout: float = Field(600.0, gt=0)

    # --- storage ---
    database_url: str = ""
    """Empty: a SQLite file under BASE_DIRECTORY. `postgresql+asyncpg://...` selects PostgreSQL."""
    workspace_retention: Literal["delete", "keep"] = "delete"

    # --- sandboxes ---
    sandbox_backend: Literal["auto", "docker", "bubblewrap"] = "auto"
    sandbox_memory_mb: int = Field(2048, ge=64)
    sandbox_cpus: float = Field(1.0, gt=0)
    sandbox_pids_limit: int = Field(512, ge=16)
    sandbox_network: str = "bridge"
    """Docker network mode (bridge, none, host or a network name); bubblewrap: `none` unshares the network."""
    sandbox_pool_size: int = Field(0, ge=0, le=64)
    sandbox_disk_mb: int = Field(0, ge=0)
    """Workspace quota (a loop-mounted ext4 image per workspace; needs root). 0: no quota."""
    sandbox_tmp_mb: int = Field(1024, ge=0)
    """Size of the sandbox's tmpfs /tmp (at most half of SANDBOX_MEMORY_MB). 0: no size of our own."""
    sandbox_uid_range: str = "700000000-700065535"
    """Host uids a bubblewrap sandbox's root maps to, one per session (FIRST-LAST); "": host root."""
    session_idle_ttl: float = Field(3600.0, ge=0)
    """Seconds without activity before a session's sandbox is stopped (it starts again on use). 0: never."""

    # --- limits ---
    shell_timeout: float = Field(120.0, gt=0)
    shell_max_timeout: float = Field(3600.0, gt=0)
    shell_max_output: int = Field(1_048_576, ge=1024)
    file_read_max_bytes: int = Field(10_485_760, ge=1024)
    request_max_bytes: int = Field(104_857_600, ge=1024)
    process_stop_grace: float = Field(5.0, ge=0)
    search_max_results: int = Field(1000, ge=1)

    # --- trust ---
    api_tokens: str = ""
    """Comma-separated `tenant=token` pairs; empty disables authentication."""

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

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
