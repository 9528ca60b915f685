"""`write_file`: an output file (a drawing, a results json) whose failed write says which file
and why, and leaves nothing behind."""

import contextlib
import os
from collections.abc import Callable
from typing import IO

from etils import epath

from mrcnn_jax import paths


def write_file(
    path: str | os.PathLike, write: Callable[[IO], object], binary: bool = False
) -> None:
    """Writes `path` (a local path or a `gs://` one, through `epath`) with `write(file)`, the
    file opened for bytes with `binary`, else text.

    A local file is written beside its place (`.<name>.partial-<pid>`) and renamed into it, so
    a process killed while writing (SIGKILL, a power cut) leaves the file that was there before
    or none, never a truncated one under `path`; an object store's upload appears only whole.

    Raises:
      OSError: a local file cannot be written (no such folder, a full disk, no permission),
        with the system's reason and `path`; `path` is a symbolic link to a file
        (`paths.check_not_a_link_to_a_file`).
      Whatever `write` raises. A failed write leaves `path` as it was.
    """
    paths.check_not_a_link_to_a_file(path)
    path = epath.Path(path)
    partial = path if paths.is_url(path) else path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb" if binary else "w") as f:
            write(f)
        if partial != path:
            os.replace(partial, path)
    except OSError as e:
        _remove(partial)
        if e.filename not in (None, os.fspath(partial)):  # e.g. no such folder: named by `write`
            raise
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e  # e.g. a full disk's: unnamed
    except BaseException:  # e.g. `write`'s own error, or Ctrl-C
        _remove(partial)
        raise


def _remove(path: epath.Path) -> None:
    """Removes a partial file; a failure to do so is not the error to report."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
