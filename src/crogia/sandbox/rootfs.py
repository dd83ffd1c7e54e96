"""Offline route of the sandbox image: a debootstrapped Debian rootfs, imported into Docker.

No registry is needed, only a Debian archive mirror; the host's own apt configuration is
the best guess for one that is reachable (air-gapped sites run a local mirror or proxy).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from crogia.errors import Unavailable
from crogia.sandbox._cmd import Progress, capture, pipe, stream

SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "CROGIA_DEBIAN_MIRROR"
"""Overrides the mirror taken from the host's apt sources."""
PACKAGES_FILE = Path(__file__).with_name("image") / "packages.txt"

# Release names a Debian archive serves; anything else (an Ubuntu codename, `bookworm-security`)
# means the entry is not a main Debian archive that holds `bookworm`.
_DEBIAN_SUITES = frozenset(
    {"buster", "bullseye", "bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable", "oldstable"}
)
_SLIM_DPKG_CONFIG = """\
# Keep later `apt-get install`s as lean as the image itself.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
"""


def packages() -> list[str]:
    """The Debian packages every sandbox image holds (shared with the online Dockerfile)."""
    lines = PACKAGES_FILE.read_text().splitlines()
    return [name.strip() for name in lines if name.strip() and not name.startswith("#")]


def debian_mirror(
    sources_dir: Path = Path("/etc/apt/sources.list.d"), sources_list: Path = Path("/etc/apt/sources.list")
) -> str:
    """The first main Debian archive in the host's apt sources; deb.debian.org when there is none."""
    if override := os.environ.get(MIRROR_ENV):
        return override
    entries = [*_deb822_entries(sources_dir), *_one_line_entries(sources_list)]
    for uri, suites in entries:
        if uri.split(":", 1)[0] in {"http", "https", "file"} and _DEBIAN_SUITES.intersection(suites):
            return uri
    return FALLBACK_MIRROR


def _deb822_entries(folder: Path) -> Iterator[tuple[str, list[str]]]:
    paths = sorted(folder.glob("*.sources")) if folder.is_dir() else []
    for path in paths:
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields = _deb822_fields(stanza)
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                yield uri, fields.get("suites", "").split()


def _deb822_fields(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line.startswith("#"):
            continue
        if line[:1].isspace() and key:  # a folded continuation of the previous field
            fields[key] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            fields[key] = value.strip()
    return fields


def _one_line_entries(path: Path) -> Iterator[tuple[str, list[str]]]:
    text = path.read_text(errors="replace") if path.is_file() else ""
    for line in text.splitlines():
        line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0])  # drop `[signed-by=... arch=...]`
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb":
            yield parts[1], [parts[2]]


async def build_rootfs(target: Path, *, mirror: str, progress: Progress) -> None:
    """Debootstrap a minbase Debian with every sandbox package into `target` (needs root)."""
    if shutil.which("debootstrap") is None:
        raise Unavailable(
            "debootstrap is not installed (apt-get install debootstrap); the offline build needs it"
        )
    if os.geteuid() != 0:
        raise Unavailable("building the sandbox image offline runs debootstrap, which needs root")
    progress(f"==> debootstrap {SUITE} (minbase) from {mirror}")
    include = "--include=" + ",".join(packages())
    argv = ["debootstrap", "--variant=minbase", include, SUITE, str(target), mirror]
    await stream(*argv, progress=progress, what="debootstrap")
    await asyncio.to_thread(_slim, target)


def _slim(rootfs: Path) -> None:
    """Drop caches and docs (about a third of the rootfs) and keep them out of later installs."""
    for pattern in (
        "var/cache/apt/archives/*.deb",
        "var/lib/apt/lists/*",
        "usr/share/man/*",
        "usr/share/info/*",
        "usr/share/locale/*",
        "var/log/*.log",
        "var/log/apt/*",
    ):
        for path in rootfs.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    for path in (rootfs / "usr/share/doc").glob("*/*"):
        if path.name != "copyright":
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    (rootfs / "etc/dpkg/dpkg.cfg.d/crogia-slim").write_text(_SLIM_DPKG_CONFIG)


async def import_rootfs(rootfs: Path, tag: str, *, progress: Progress) -> None:
    """`tar | docker import` the rootfs as image `tag`."""
    progress(f"==> docker import -> {tag}")
    tar = ("tar", "--numeric-owner", "-C", str(rootfs), "-cf", "-", ".")
    docker = ("docker", "import", "--message", "crogia sandbox base (debootstrap)", "-", tag)
    await pipe(tar, docker, progress=progress, what="docker import")


async def unmount_below(folder: Path) -> None:
    """Lazily unmount anything a killed debootstrap left mounted (proc, sys) inside `folder`."""
    for point in await asyncio.to_thread(_mounts_below, folder):
        await capture("umount", "-l", point, limit=30)


def _mounts_below(folder: Path) -> list[str]:
    """Mount points inside `folder`, deepest first (so parents unmount last)."""
    prefix = str(folder.resolve()) + "/"
    lines = Path("/proc/self/mounts").read_text().splitlines()
    points = [fields[1] for fields in map(str.split, lines) if len(fields) > 1]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)
