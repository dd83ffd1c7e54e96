"""`crogia serve`, `crogia image build`, `crogia db upgrade`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from crogia.config import Settings


def load_settings() -> Settings:
    """Settings, or a clear message and exit code 2 (never a traceback) when a value is invalid."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()]
        print("crogia: invalid settings (environment or .env):\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True
    )
    from crogia.frontdoor import logs

    logs.install()  # tokens out of every line, repeated errors rate-limited


DEFAULT_LOOP = "asyncio"
"""The server's event loop; bench/bench_shell.py and bench_throughput.py measure both."""


WS_IMPL = "websockets-sansio"
"""uvicorn's WebSocket protocol: measured ~10-17% more events/s than its default (bench/bench_ws.py)."""


def serve(args: argparse.Namespace) -> None:
    from crogia.frontdoor.serve import serve as run

    settings = load_settings()
    configure_logging(settings)
    host, port = args.host or settings.bind_host, args.port or settings.port
    run(settings, host=host, port=port, loop=args.loop, reload=args.reload)


def image_build(args: argparse.Namespace) -> None:
    from crogia.sandbox.image import build_image

    settings = load_settings()
    image = args.image or settings.docker_base_image
    asyncio.run(build_image(image, offline=args.offline, rebuild=args.rebuild, progress=print))


def db_upgrade(_: argparse.Namespace) -> None:
    from crogia.store import Database

    settings = load_settings()
    configure_logging(settings)

    async def run() -> None:
        db = Database(settings.effective_database_url)
        try:
            await db.migrate()
        finally:
            await db.close()

    asyncio.run(run())


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="crogia", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the API server")
    run.add_argument("--host", help="bind address (default: HOST, or 127.0.0.1 without API_TOKENS)")
    run.add_argument("--port", type=int, help="port (default: PORT)")
    run.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    run.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default=DEFAULT_LOOP,
        help=f"event loop (default: {DEFAULT_LOOP}; see the README's Performance section)",
    )
    run.set_defaults(func=serve)
    image = commands.add_parser("image", help="sandbox image").add_subparsers(dest="action", required=True)
    build = image.add_parser("build", help="build DOCKER_BASE_IMAGE (offline route when no registry answers)")
    build.add_argument("--image", help="tag to build (default: DOCKER_BASE_IMAGE)")
    build.add_argument("--rebuild", action="store_true", help="build even if the image exists")
    build.add_argument("--offline", action="store_true", default=None, help="force the debootstrap route")
    build.set_defaults(func=image_build)
    db = commands.add_parser("db", help="database").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=db_upgrade)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
