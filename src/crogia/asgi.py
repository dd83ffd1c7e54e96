"""ASGI entry for `uvicorn crogia.asgi:app` (and the seed's `uvicorn main:app`)."""

from __future__ import annotations

from crogia.app import create_app
from crogia.cli import configure_logging, load_settings
from crogia.frontdoor import fds

settings = load_settings()
configure_logging(settings)
fds.raise_soft_limit()  # what plain uvicorn does not do; see the README's "Front door"
app = create_app(settings)
