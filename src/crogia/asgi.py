"""ASGI entry for `uvicorn crogia.asgi:app` (and the seed's `uvicorn main:app`)."""

from __future__ import annotations

from crogia.app import create_app
from crogia.cli import configure_logging, load_settings

settings = load_settings()
configure_logging(settings)
app = create_app(settings)
