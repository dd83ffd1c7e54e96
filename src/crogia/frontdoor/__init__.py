"""The front door: how the server takes connections before any route runs.

`http.py` bounds what a client can hold (header size and count, header and body read time, open
connections, with `/api/health` served past the cap), with its limits in `limits.py`; `fds.py`
checks the file-descriptor budget at start-up and derives the connection cap from it; `logs.py`
rate-limits repeated log lines and keeps tokens out of them. `serve.py` wires them into uvicorn.
"""
