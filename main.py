"""The seed's entry point: `uvicorn main:app --host 0.0.0.0 --port 8000 --reload`."""

from crogia.asgi import app

__all__ = ["app"]
