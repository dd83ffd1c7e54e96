"""Build the sandbox image (`DOCKER_BASE_IMAGE`, default `crogia-sandbox:latest`).

Two routes give the same tools (bash, coreutils, python3 + pip + venv, git, curl, procps,
ripgrep, build-essential, ca-certificates):

* online: `docker build` of `image/Dockerfile`, FROM `debian:bookworm-slim`;
* offline, chosen automatically when that base cannot be pulled: debootstrap a Debian
  rootfs from the host's apt mirror, `docker import` it as `crogia-sandbox-base:bookworm`,
  and `docker build` a small config layer (`image/Dockerfile.local`) on top.

Run `python -m crogia.sandbox.image [--rebuild] [--offline|--online]` to build from a shell.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from crogia.errors import CrogiaError, Unavailable
from crogia.sandbox import rootfs
from crogia.sandbox._cmd import Progress, capture, stream

DEFAULT_IMAGE = "crogia-sandbox:latest"
ONLINE_BASE = "debian:bookworm-slim"
LOCAL_BASE = f"crogia-sandbox-base:{rootfs.SUITE}"
DATA_DIR = Path(__file__).with_name("image")
_PULL_TIMEOUT = 90.0


async def image_exists(image: str) -> bool:
    """True when the engine holds `image`; `Unavailable` when the engine cannot be asked."""
    code, _, err = await capture("docker", "image", "inspect", "--format", "{{.Id}}", image, limit=30)
    if code == 0:
        return True
    if "no such image" in err.lower():
        return False
    raise Unavailable(f"Docker engine did not answer: {err.strip()}", image=image)


async def build_image(
    image: str, *, offline: bool | None = None, progress: Progress, rebuild: bool = False
) -> None:
    """Build `image` unless it exists (or `rebuild`); `offline=None` picks the route by pulling the base."""
    await _require_engine()
    if not rebuild and await image_exists(image):
        progress(f"{image} exists; reusing it (rebuild to replace it)")
        return
    started = time.monotonic()
    if offline is None:
        offline = not await _can_pull(ONLINE_BASE, progress)
    if offline:
        await _build_offline(image, progress=progress, rebuild=rebuild)
    else:
        await _build_online(image, progress=progress, rebuild=rebuild)
    size = await _size_mb(image)
    route = "offline" if offline else "online"
    progress(f"==> built {image} ({route}) in {time.monotonic() - started:.0f} s, {size:.0f} MB")


async def _require_engine() -> None:
    code, _, err = await capture("docker", "version", "--format", "{{.Server.Version}}", limit=20)
    if code != 0:
        raise Unavailable(f"Docker engine is not reachable: {err.strip() or 'no answer'}")


async def _can_pull(base: str, progress: Progress) -> bool:
    if await image_exists(base):
        return True
    progress(f"==> pulling {base}")
    code, _, err = await capture("docker", "pull", "--quiet", base, limit=_PULL_TIMEOUT)
    if code != 0:
        reason = (err.strip().splitlines() or ["no answer"])[-1]
        progress(f"cannot pull {base} ({reason}); building offline")
    return code == 0


async def _build_online(image: str, *, progress: Progress, rebuild: bool) -> None:
    progress(f"==> docker build {image} FROM {ONLINE_BASE}")
    fresh = ["--no-cache", "--pull"] if rebuild else []
    argv = ["docker", "build", *fresh, "-t", image, "-f", str(DATA_DIR / "Dockerfile"), str(DATA_DIR)]
    await stream(*argv, progress=progress, what="docker build")


async def _build_offline(image: str, *, progress: Progress, rebuild: bool) -> None:
    # The debootstrapped base is the slow part; keep it unless asked to rebuild.
    if rebuild or not await image_exists(LOCAL_BASE):
        async with _workdir() as work:
            target = work / "rootfs"
            await rootfs.build_rootfs(target, mirror=rootfs.debian_mirror(), progress=progress)
            await rootfs.import_rootfs(target, LOCAL_BASE, progress=progress)
    else:
        progress(f"==> reusing base {LOCAL_BASE}")
    progress(f"==> docker build {image} FROM {LOCAL_BASE}")
    dockerfile = str(DATA_DIR / "Dockerfile.local")
    argv = [
        "docker",
        "build",
        "--build-arg",
        f"BASE={LOCAL_BASE}",
        "-t",
        image,
        "-f",
        dockerfile,
        str(DATA_DIR),
    ]
    await stream(*argv, progress=progress, what="docker build")


@contextlib.asynccontextmanager
async def _workdir() -> AsyncIterator[Path]:
    """A temp folder that is removed however the build ends (mounts inside it first)."""
    folder = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="crogia-image-"))
    try:
        yield folder
    finally:
        await rootfs.unmount_below(folder)
        await asyncio.to_thread(shutil.rmtree, folder, True)


async def _size_mb(image: str) -> float:
    code, out, _ = await capture("docker", "image", "inspect", "--format", "{{.Size}}", image, limit=30)
    return int(out.strip()) / 1e6 if code == 0 and out.strip().isdigit() else 0.0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: build the image, printing progress; exit 1 with a message on failure."""
    parser = argparse.ArgumentParser(
        prog="python -m crogia.sandbox.image", description="Build the sandbox image."
    )
    parser.add_argument("--image", help="image tag (default: DOCKER_BASE_IMAGE or crogia-sandbox:latest)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even when the image exists")
    route = parser.add_mutually_exclusive_group()
    route.add_argument("--offline", action="store_true", help="debootstrap; never pull")
    route.add_argument("--online", dest="offline", action="store_false", help="pull the Debian base")
    parser.set_defaults(offline=None)  # neither flag: choose by trying to pull the base
    args = parser.parse_args(argv)
    image = args.image or _configured_image()
    try:
        asyncio.run(build_image(image, offline=args.offline, progress=_print, rebuild=args.rebuild))
    except CrogiaError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _configured_image() -> str:
    from crogia.config import Settings  # here so that `--help` works without a valid .env

    return Settings().docker_base_image or DEFAULT_IMAGE


def _print(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
