"""ctypes bindings for two Linux syscalls the stdlib lacks: renameat2 and Landlock.

Landlock lets an unprivileged thread drop filesystem rights for itself and every
process it starts afterwards. ripgrep walks folders by path, so a folder swapped
for a symlink mid-walk would lead it outside the workspace; confined by Landlock it
can only read beneath the workspace root (and execute its own binary), whatever
the sandbox does meanwhile.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from collections.abc import Iterable

# Syscall numbers added after Linux 5.1 are the same on every architecture.
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
_RENAME_NOREPLACE = 1

ACCESS_EXECUTE = 1 << 0
ACCESS_READ_FILE = 1 << 2
ACCESS_READ_DIR = 1 << 3
_ABI1_ALL = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_ABI_EXTRA = {2: 1 << 13, 3: 1 << 14, 5: 1 << 15}  # REFER, TRUNCATE, IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _syscall(number: int, *args: object) -> int:
    """libc syscall(); ints are widened to C longs, as the kernel reads every argument."""
    wide = [ctypes.c_long(arg) if isinstance(arg, int) else arg for arg in args]
    return int(_libc().syscall(ctypes.c_long(number), *wide))


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """rename that fails with EEXIST instead of replacing `dst` (atomic check-and-move)."""
    func = getattr(_libc(), "renameat2", None)
    if func is not None:
        names = os.fsencode(src), os.fsencode(dst)
        result = func(src_dir_fd, names[0], dst_dir_fd, names[1], ctypes.c_uint(_RENAME_NOREPLACE))
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, os.strerror(code))
    # Filesystem or libc without RENAME_NOREPLACE: check then rename (both stay inside the root).
    try:
        os.stat(dst, dir_fd=dst_dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))


def landlock_abi() -> int:
    """Landlock ABI version of the running kernel, 0 if unsupported or disabled."""
    try:
        version = _syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    except (AttributeError, OSError):
        return 0
    return max(version, 0)


def _handled_access(abi: int) -> int:
    handled = _ABI1_ALL
    for level, bits in _ABI_EXTRA.items():
        if abi >= level:
            handled |= bits
    return handled


def _add_rule(ruleset_fd: int, fd: int, access: int) -> None:
    rule = _PathBeneathAttr(allowed_access=access, parent_fd=fd)
    _check(_syscall(_SYS_LANDLOCK_ADD_RULE, ruleset_fd, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0))


def restrict_thread(abi: int, read_dirs: Iterable[int], exec_files: Iterable[int]) -> None:
    """Confine the calling thread (and its future children) to the given fds.

    `read_dirs` may be read (files and listings) beneath; `exec_files` may be read
    and executed. Every other filesystem access is denied. Irreversible for the
    thread: call it only on a thread that exists for this purpose.
    """
    attr = _RulesetAttr(handled_access_fs=_handled_access(abi))
    ruleset_fd = _check(_syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0))
    try:
        for fd in read_dirs:
            _add_rule(ruleset_fd, fd, ACCESS_READ_FILE | ACCESS_READ_DIR)
        for fd in exec_files:
            _add_rule(ruleset_fd, fd, ACCESS_READ_FILE | ACCESS_EXECUTE)
        zero = ctypes.c_ulong(0)
        _check(_libc().prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), zero, zero, zero))
        _check(_syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, 0))
    finally:
        os.close(ruleset_fd)
