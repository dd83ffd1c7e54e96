"""ASGI entry for `uvicorn crogia.asgi:app` (and the seed's `uvicorn main:app`)."""

from __future__ import annotations

from crogia.cli import configure_logging, load_settings
from crogia.app import create_app

settings = load_settings()
configure_logging(settings)
app = create_app(settings)
