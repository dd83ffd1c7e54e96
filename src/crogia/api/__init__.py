"""HTTP and WebSocket API: the only package that imports FastAPI."""
