"""Paths as every entry point takes them: a local path with `~` expanded and made absolute from
the current folder (orbax refuses relative paths, and a stored path must name the same file from
any folder), a URL (`gs://bucket/...`) as it is.

A shell leaves the `~` of `--workdir=~/runs/x` as it is (it expands only a word's leading `~`),
so the scripts would otherwise write into a folder named `~` under the current one.
"""

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
