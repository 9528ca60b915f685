"""Paths as every entry point takes them: a local path with `~` expanded and made absolute from
the current folder (orbax refuses relative paths, and a stored path must name the same file from
any folder), a URL (`gs://bucket/...`) as it is.

A shell leaves the `~` of `--workdir=~/runs/x` as it is (it expands only a word's leading `~`),
so the scripts would otherwise write into a folder named `~` under the current one.
"""

import errno
import os


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names remote storage (`gs://...`) rather than a local path."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """`path` with `~` expanded, relative to the current folder if not absolute; a URL or "" as
    it is."""
    path = os.fspath(path)
    if not path or is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def check_not_a_link_to_a_file(path: str | os.PathLike) -> None:
    """Raises OSError naming `path` when it is a local symbolic link to a regular file: a
    downloaded workdir or folder may plant one so that writing `path` (a drawing, a results
    json, metrics) would overwrite a file elsewhere. Links to devices (`/dev/stdout`) and linked
    folders above `path` are followed as usual; a URL is not checked.
    """
    name = os.fspath(path)
    if not is_url(name) and os.path.islink(name) and os.path.isfile(name):
        raise OSError(
            errno.ELOOP,
            f"it is a symbolic link to the file {os.path.realpath(name)}, not written through "
            "(remove the link)",
            name,
        )
