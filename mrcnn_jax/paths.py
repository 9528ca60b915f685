"""Paths as every entry point takes them: a local path with `~` expanded and made absolute from
the current folder (orbax refuses relative paths, and a stored path must name the same file from
any folder), a URL (`gs://bucket/...`) as it is.

A shell leaves the `~` of `--workdir=~/runs/x` as it is (it expands only a word's leading `~`),
so the scripts would otherwise write into a folder named `~` under the current one.
"""

import errno
import os
import re

# The URL schemes that etils.epath (orbax's and the scripts' file access) reads and writes.
URL_SCHEMES = ("gs://", "s3://", "az://", "hf://")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names remote storage (`gs://...`) rather than a local path."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """`path` with `~` expanded, relative to the current folder if not absolute, normalized
    (`a/../b`, `//`; a leading `//` too, which POSIX lets a system give its own meaning, Linux
    and macOS none, and TensorStore, orbax's storage, refuses); a URL or "" as it is.

    Raises:
      ValueError: a URL of a scheme not in `URL_SCHEMES` (`ram://`, `file://`: etils.epath
        cannot open it), or a local path that is such a URL with one slash (`gs:/bucket`, which
        would be a folder `gs:` in the current one).
    """
    path = os.fspath(path)
    if is_url(path) and not path.startswith(URL_SCHEMES):
        scheme = path[: path.index("://") + 3]
        raise ValueError(
            f"{path}: {scheme} URLs are not supported; give a local path or a "
            f"{', '.join(URL_SCHEMES)} URL"
        )
    if re.match(r"(gs|s3|az|hf):/(?!/)", path):
        raise ValueError(f"{path}: a URL takes two slashes ({path[:3]}//...)")
    if not path or is_url(path):
        return path
    path = os.path.abspath(os.path.expanduser(path))
    return path[1:] if path.startswith("//") else path  # abspath keeps exactly two


def unreachable(path: str | os.PathLike) -> str:
    """Why the storage of URL `path` cannot be asked about it (no network, no credentials, no
    access to the bucket), in its own words; "" when it answers (whether or not `path` exists)
    and for a local path. etils.epath takes such a failure for "no" in `is_dir()`."""
    if not is_url(path):
        return ""
    from etils import epath

    try:
        epath.Path(os.fspath(path)).exists()
    except Exception as error:  # the storage backend's own (tf.errors.OpError for gs://)
        return " ".join(str(error).split()) or type(error).__name__
    return ""


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
