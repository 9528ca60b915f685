"""`write_file`: an output file (a drawing, a results json) whose failed write says which file
and why, and leaves nothing behind."""

import contextlib
import os
import shutil
import stat
from collections.abc import Callable
from typing import IO

from etils import epath

from mrcnn_jax import paths


def write_file(
    path: str | os.PathLike, write: Callable[[IO], object], binary: bool = False
) -> None:
    """Writes `path` (a local path or a `gs://` one, through `epath`) with `write(file)`, the
    file opened for bytes with `binary`, else text.

    A new or regular local file is written beside its place (`.<name>.partial-<pid>`, the old
    file's permissions) and renamed into it, so a process killed while writing (SIGKILL, a power
    cut) leaves the file that was there before or none, never a truncated one under `path`. A
    link to a device (`/dev/stdout`) is written through, and on cloud storage the object is
    replaced when its upload closes.

    Raises:
      OSError: a local file cannot be written (no such folder, a full disk, no permission),
        with the system's reason and `path`; `path` is a symbolic link to a file
        (`paths.check_not_a_link_to_a_file`).
      Whatever `write` raises. A failed write leaves a local `path` as it was (on cloud
        storage: removed).
    """
    paths.check_not_a_link_to_a_file(path)
    path = epath.Path(path)
    renamed = not paths.is_url(path) and (not os.path.lexists(path) or _is_regular_file(path))
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}") if renamed else path
    try:
        with partial.open("wb" if binary else "w") as f:
            write(f)
        if renamed:
            if os.path.exists(path):
                shutil.copymode(path, partial)
            os.replace(partial, path)
    except OSError as e:
        _remove(partial)
        if e.filename not in (None, os.fspath(partial)):  # e.g. no such folder: named by `write`
            raise
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e  # e.g. a full disk's: unnamed
    except BaseException:  # e.g. `write`'s own error, or Ctrl-C
        _remove(partial)
        raise


def _is_regular_file(path: epath.Path) -> bool:
    """A regular file, not a symbolic link."""
    return stat.S_ISREG(os.lstat(path).st_mode)


def _remove(path: epath.Path) -> None:
    """Removes a partial file; a failure to do so is not the error to report."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
