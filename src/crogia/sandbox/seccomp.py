"""The seccomp filter of bubblewrap sandboxes, built with libseccomp (through `pyseccomp`).

bubblewrap applies no filter of its own; `--seccomp FD` loads a compiled BPF program just
before it runs the sandbox's command. This one follows Docker's default profile where it
matters: the calls that reach the kernel's most exposed or host-wide parts fail with EPERM
(mounts, BPF, keyrings, io_uring, modules, kexec, reboot, swap, perf, userfaultfd, file
handles, clocks, namespaces), new user namespaces are refused (`unshare`/`clone` with
`CLONE_NEWUSER`, and every other `CLONE_NEW*` flag), and `clone3` answers ENOSYS so that
libc falls back to `clone`, whose flags a filter can see (Docker does the same).

Unlike Docker's profile it is a deny list (every other call is allowed, new ones included):
the sandbox already runs without capabilities, as an unprivileged host uid in its own user
namespace, so the kernel's own checks refuse what Docker's allow list adds on top (the calls
Docker grants only with a capability). The filter covers the x86-64, x32 and i386 ABIs on
x86-64 hosts (a 32-bit `int 0x80` cannot slip past it).

No hand-written BPF: libseccomp compiles the rules; `filter_program()` caches the result.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import tempfile

log = logging.getLogger(__name__)

DENIED = (
    "mount", "umount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "bpf", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "init_module", "finit_module",
    "delete_module", "create_module", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff",
    "perf_event_open", "userfaultfd", "open_by_handle_at", "setns", "acct", "quotactl",
    "quotactl_fd", "lookup_dcookie", "syslog", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "stime", "iopl", "ioperm", "uselib", "nfsservctl", "vhangup", "_sysctl", "ustat",
    "sysfs", "get_kernel_syms", "query_module", "fanotify_init", "kcmp", "name_to_handle_at",
)  # fmt: skip
"""Calls that always fail with EPERM."""

CLONE_NEW = {
    "CLONE_NEWTIME": 0x80, "CLONE_NEWNS": 0x20000, "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000, "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000, "CLONE_NEWNET": 0x40000000,
}  # fmt: skip
"""Namespace flags refused in `unshare` and `clone` (their first argument on x86)."""

PERSONALITY_FLAGS = (0x0040000, 0x0100000, 0x0200000, 0x0400000, 0x0800000, 0x8000000)
"""`personality` flags refused: ADDR_NO_RANDOMIZE, MMAP_PAGE_ZERO, ADDR_COMPAT_LAYOUT,
READ_IMPLIES_EXEC, ADDR_LIMIT_32BIT, ADDR_LIMIT_3GB (Docker allows only plain Linux, LINUX32
and UNAME26). The query `personality(0xffffffff)` stays allowed: its top bit tells it apart."""
_QUERY_BIT = 0x80000000


class SeccompUnavailable(RuntimeError):
    """libseccomp (or its Python binding) is missing here."""


def _rules() -> object:
    """The filter as a `pyseccomp.SyscallFilter` (blocking; milliseconds)."""
    import pyseccomp  # type: ignore[import-untyped]

    filt = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    if pyseccomp.system_arch() == pyseccomp.Arch.X86_64:
        for arch in (pyseccomp.Arch.X86, pyseccomp.Arch.X32):
            with contextlib.suppress(OSError, ValueError):
                filt.add_arch(arch)
    eperm = pyseccomp.ERRNO(errno.EPERM)
    for name in DENIED:
        _add(filt, eperm, name)
    for call in ("unshare", "clone"):
        for flag in CLONE_NEW.values():
            _add(filt, eperm, call, pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag, flag))
    _add(filt, pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    for flag in PERSONALITY_FLAGS:
        _add(filt, eperm, "personality", pyseccomp.Arg(0, pyseccomp.MASKED_EQ, flag | _QUERY_BIT, flag))
    return filt


def _add(filt: object, action: int, name: str, *args: object) -> None:
    try:
        filt.add_rule(action, name, *args)  # type: ignore[attr-defined]
    except (OSError, ValueError, RuntimeError):
        # A call this kernel's headers (or libseccomp) do not know: nothing to deny.
        log.debug("seccomp: no rule for %s on this system", name)


@functools.cache
def filter_program() -> bytes:
    """The compiled BPF program (`struct sock_filter` array) for `bwrap --seccomp`.

    Raises `SeccompUnavailable` when libseccomp or `pyseccomp` cannot be loaded.
    """
    try:
        import pyseccomp  # noqa: F401  (loads libseccomp.so through ctypes)
    except (ImportError, OSError) as exc:
        raise SeccompUnavailable(f"libseccomp is not usable: {exc}") from exc
    filt = _rules()
    with tempfile.TemporaryFile() as out:
        filt.export_bpf(out)  # type: ignore[attr-defined]
        out.seek(0)
        return out.read()


def program_fd(program: bytes) -> int:
    """A sealed-size memfd holding `program`, positioned at its start (the caller closes it)."""
    fd = os.memfd_create("crogia-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, program)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def docker_profile() -> str:
    """The same rules as a Docker seccomp profile (JSON for `SecurityOpt: seccomp=...`).

    Used only with engines whose default profile still allows io_uring (before Docker 25);
    newer engines keep their own default profile, which denies it.
    """
    eperm = {"action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}
    rules: list[dict[str, object]] = [{"names": list(DENIED), **eperm}]
    for flag in CLONE_NEW.values():
        arg = {"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}
        rules.append({"names": ["unshare", "clone"], "args": [arg], **eperm})
    for flag in PERSONALITY_FLAGS:
        arg = {"index": 0, "value": flag | _QUERY_BIT, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}
        rules.append({"names": ["personality"], "args": [arg], **eperm})
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.ENOSYS})
    arches = ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    return json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "architectures": arches, "syscalls": rules})
