"""ripgrep command lines for `find_files` and `grep`, and the search target.

User text (patterns, globs) always travels as the value of an `--opt=VALUE`
argument, so it can never be read as an option, and never passes through a shell.
"""

from __future__ import annotations

import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from crogia.errors import InvalidInput
from crogia.workspace.fileops import open_regular
from crogia.workspace.paths import RelPath, kind_error, lstat_at, open_root, open_subdir, opened_dir

MAX_CONTEXT = 20
MAX_COLUMNS = 4000
_TYPE_NAME = "crogiasel"
_TYPE_GLOB = re.compile(r"^[^\s/:,!{}]+$")
_COMMON = ["--no-config", "--no-messages", "--color=never", "--no-require-git", "--no-ignore-global"]


def _no_nul(value: str, what: str) -> str:
    # A program's arguments are C strings: a NUL cannot be passed on, so say so instead.
    if "\x00" in value:
        raise InvalidInput(f"The {what} must not contain a NUL character.")
    return value


def type_globs(file_types: str) -> list[str]:
    """`"*"`/`""` -> no filter; `"*.py,*.md"`, `"py,md"` and `".py"` -> basename globs."""
    _no_nul(file_types, "file types")
    globs: list[str] = []
    for raw in file_types.split(","):
        item = raw.strip()
        if item in ("", "*"):
            if item == "*":
                return []
            continue
        if not _TYPE_GLOB.match(item):
            raise InvalidInput(f"File type {item!r} is not a glob like '*.py' or an extension like 'py'.")
        if item.startswith("."):
            item = "*" + item
        elif not any(ch in item for ch in "*?[{"):
            item = "*." + item
        globs.append(item)
    return globs


def _filter_args(include_ignored: bool, include_hidden: bool) -> list[str]:
    args = list(_COMMON)
    if include_hidden:
        args.append("--hidden")
    if include_ignored:
        args.append("--no-ignore")
    elif include_hidden:
        args.append("--glob=!.git/")  # git's own store is noise unless ignored files are wanted
    return args


def _type_args(file_types: str) -> list[str]:
    globs = type_globs(file_types)
    args = [f"--type-add={_TYPE_NAME}:{glob}" for glob in globs]
    return [*args, f"--type={_TYPE_NAME}"] if globs else []


def files_args(pattern: str, include_ignored: bool, include_hidden: bool) -> list[str]:
    """`rg --files` listing NUL-separated paths; `pattern` is a gitignore-style glob.

    File types are applied by the caller: rg lets a matching `--glob` override `--type`,
    and both must hold.
    """
    args = ["--files", "--null", *_filter_args(include_ignored, include_hidden)]
    pattern = _no_nul(pattern, "pattern").strip()
    if pattern not in ("", "*", "**"):
        # A leading '!' would turn the glob into an exclusion; the user meant a literal '!'.
        args.append("--glob=" + ("\\" + pattern if pattern.startswith("!") else pattern))
    return [*args, "."]


@dataclass(frozen=True, slots=True)
class GrepOptions:
    """Validated `grep` knobs."""

    pattern: str
    file_types: str
    regex: bool
    case_sensitive: bool
    context: int
    include_ignored: bool
    include_hidden: bool


def grep_args(opts: GrepOptions, *, stdin: bool) -> list[str]:
    """rg printing `path NUL line (':'|'-') text` records, one per line."""
    if not opts.pattern:
        raise InvalidInput("The search pattern must not be empty.")
    _no_nul(opts.pattern, "search pattern")
    if not 0 <= opts.context <= MAX_CONTEXT:
        raise InvalidInput(f"Context must be between 0 and {MAX_CONTEXT} lines.")
    args = [
        "--null", "--line-number", "--with-filename", "--no-heading", "--no-context-separator",
        f"--max-columns={MAX_COLUMNS}", "--max-columns-preview",
        *_filter_args(opts.include_ignored, opts.include_hidden),
        *_type_args(opts.file_types),
        "--case-sensitive" if opts.case_sensitive else "--ignore-case",
    ]  # fmt: skip
    if not opts.regex:
        args.append("--fixed-strings")
    if opts.context:
        args.append(f"--context={opts.context}")
    return [*args, f"--regexp={opts.pattern}", "-" if stdin else "."]


class SearchTarget:
    """fds for one search: the root (confinement), the folder rg runs in, or one file on stdin."""

    def __init__(self, root_fd: int, cwd_fd: int, stdin: io.FileIO | None) -> None:
        self.root_fd = root_fd
        self.cwd_fd = cwd_fd
        self.stdin = stdin

    def close(self) -> None:
        """Close every fd; idempotent."""
        if self.stdin is not None:
            self.stdin.close()
        for fd in {self.root_fd, self.cwd_fd} - {-1}:
            os.close(fd)
        self.root_fd = self.cwd_fd = -1


def open_target(root: Path, rel: RelPath, *, allow_file: bool) -> SearchTarget:
    """Open what to search: folder `rel`, or (with `allow_file`) the regular file `rel`."""
    root_fd = open_root(root)
    try:
        if not rel.parts:
            return SearchTarget(root_fd, root_fd, None)
        with opened_dir(root, rel.parent) as parent_fd:
            mode = lstat_at(parent_fd, rel).st_mode
            if stat.S_ISDIR(mode):
                return SearchTarget(root_fd, open_subdir(parent_fd, rel), None)
        if allow_file and stat.S_ISREG(mode):
            return SearchTarget(root_fd, root_fd, open_regular(root, rel))
        raise kind_error(mode, rel, want="folder")
    except BaseException:
        os.close(root_fd)
        raise
