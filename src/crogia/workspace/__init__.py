"""Host-side file and search operations on one session's workspace folder (`HostFiles`).

`HostFiles` implements `crogia.sandbox.files.Files` for local backends (`SANDBOX_FILES=host`);
the executor daemon serves the same interface from inside the sandbox (`DaemonFiles`).

The same folder is bind-mounted into a sandbox where an agent runs arbitrary
commands as root, concurrently with API requests, so confinement never relies on
path strings alone:

* paths are checked as strings (no `..`, absolute paths, backslashes, NUL), then
  resolved component by component from an fd on the root with O_NOFOLLOW;
* symlinks inside the workspace are listed as `symlink` and never followed:
  reading, writing, listing or searching through one (final or intermediate
  component) is refused with InvalidInput; `remove` and `move` act on the link;
* files are opened O_NOFOLLOW | O_NONBLOCK and must be regular (a FIFO cannot hang
  a request); writes are a temp file renamed over the target;
* ripgrep runs in a folder opened that way and, where the kernel has Landlock,
  confined to reading beneath the workspace root.
"""

from crogia.workspace.core import HostFiles, Workspace
from crogia.workspace.models import Entry, EntryType, GrepMatch, Listing, SearchResult
from crogia.workspace.ripgrep import Ripgrep

__all__ = ["Entry", "EntryType", "GrepMatch", "HostFiles", "Listing", "Ripgrep", "SearchResult", "Workspace"]
