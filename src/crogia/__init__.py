"""Crogia: sessions, sandboxes and an LLM coding agent behind a REST + WebSocket API."""

__version__ = "0.1.0"
