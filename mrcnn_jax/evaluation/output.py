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
    """Opens `path` (a local path or a `gs://` one, through `epath`) for writing, bytes with
    `binary`, else text, and calls `write(file)`.

    Raises:
      OSError: a local file cannot be written (no such folder, a full disk, no permission),
        with the system's reason and `path` (a full disk's error carries no file name of its
        own); `path` is a symbolic link to a file (`paths.check_not_a_link_to_a_file`).
      Whatever `write` raises. Nothing is left at `path` after a failed write.
    """
    paths.check_not_a_link_to_a_file(path)
    path = epath.Path(path)
    try:
        with path.open("wb" if binary else "w") as f:
            write(f)
    except OSError as e:
        if e.filename is not None:  # e.g. no such folder: nothing written, the error names `path`
            raise
        _remove(path)
        raise OSError(e.errno, e.strerror, os.fspath(path)) from e  # e.g. a full disk
    except BaseException:  # e.g. `write`'s own error, or Ctrl-C
        _remove(path)
        raise


def _remove(path: epath.Path) -> None:
    """Removes a partial file; a failure to do so is not the error to report."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)
