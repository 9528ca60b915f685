"""What the processes of a multi-process run must agree on, checked before they train together.

Processes given different configs (a flag typed on one host only) or workdirs would not fail:
each would wait in a collective the others never reach, forever (SIGTERM included), or in the
first checkpoint's commit when the workdir is not one folder they all share (a local disk per
host). `check_processes_agree` compares them at the start of `trainer.train_and_evaluate` and of
scripts/train.py and scripts/eval.py (before checks that one process could fail alone) and
raises the same error on every process, naming what differs.
"""

import contextlib
import json
import os
import secrets
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

TOKEN_FILE = ".process_0_token"  # in the shared folder while the processes check it
_MAX_LISTED = 8  # differing settings named in an error


def broadcast_text(text: str) -> str:
    """Process 0's `text`, on every process (a collective: every process must call it)."""
    data = np.frombuffer(text.encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    padded = data if jax.process_index() == 0 else np.zeros(size, np.uint8)  # others: ignored
    return np.asarray(multihost_utils.broadcast_one_to_all(padded)).tobytes().decode()


def gather_texts(text: str) -> list[str]:
    """Every process's `text`, in process order (a collective: every process must call it)."""
    data = np.frombuffer(text.encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [row[:size].tobytes().decode() for row, size in zip(rows, sizes)]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: tree}


def differences(first: dict, mine: dict) -> list[str]:
    """The entries of the nested dict `mine` that differ from `first`'s (process 0's), as
    `dotted.name=value (process 0: value)`, sorted by name."""
    a, b = _flat(first), _flat(mine)
    missing = object()

    def shown(tree: dict[str, Any], name: str) -> str:
        return json.dumps(tree[name]) if name in tree else "no such field"

    return [
        f"{name}={shown(b, name)} (process 0: {shown(a, name)})"
        for name in sorted(a.keys() | b.keys())
        if a.get(name, missing) != b.get(name, missing)
    ]


def agreement_problems(first: dict, mine: dict, token_seen: str | None) -> list[str]:
    """Why this process cannot run with process 0: `first` and `mine` are their `{"settings",
    "folder", "token"}` (`token`: what process 0 wrote into `TOKEN_FILE` of the shared folder,
    `folder`; None: no folder to check), `token_seen` what this process reads there (None: no
    such file)."""
    found = differences(first["settings"], mine["settings"])
    if found:
        listed = ", ".join(found[:_MAX_LISTED])
        more = len(found) - _MAX_LISTED
        return [listed + (f" and {more} more" if more > 0 else "")]
    if first["token"] is not None and token_seen != first["token"]:
        return [
            f"it does not see the file process 0 wrote into {first['folder']} ({TOKEN_FILE}): "
            "it must be one folder that every process shares (gs://..., NFS), not a local disk "
            "per host"
        ]
    return []


def check_processes_agree(settings: dict[str, Any], folder: epath.Path | None = None) -> None:
    """With several processes (a collective: all call it), checks that each has process 0's
    `settings` (a JSON-able nested dict: the config, the paths and flags that must be the same
    everywhere) and, if `folder` is given (a folder all must share, e.g. the workdir; it must
    be in `settings` too), sees what process 0 writes there. Does nothing with one process.

    Raises:
      ValueError: on every process, naming each process that disagrees and why (the first
        differing settings, or the folder it does not share).
    """
    if jax.process_count() == 1:
        return
    mine = {"settings": settings, "folder": str(folder), "token": None}
    token_file = folder / TOKEN_FILE if folder is not None else None
    if token_file is not None and jax.process_index() == 0:
        mine["token"] = secrets.token_hex(8)
        token_file.write_text(mine["token"])
    first = json.loads(broadcast_text(json.dumps(mine)))  # after process 0 wrote the token
    token_seen = token_file.read_text() if token_file and token_file.exists() else None
    problems = gather_texts("; ".join(agreement_problems(first, mine, token_seen)))
    if token_file is not None and jax.process_index() == 0:
        token_file.unlink(missing_ok=True)
    disagreeing = [f"process {i}: {text}" for i, text in enumerate(problems) if text]
    if disagreeing:
        raise ValueError(
            "the processes of this run disagree (give every process the same flags, "
            f"--process_id aside, and one shared workdir): {'; '.join(disagreeing)}"
        )


# What a collective's error says when the process at the other end is gone (gloo on CPU; the
# coordination service's heartbeat everywhere).
_LOST_PEER = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "heartbeat timeout",
    "stopped sending heartbeats",
)


def lost_peer(error: BaseException) -> BaseException | None:
    """The JAX runtime error saying that another process is gone: `error` or the deepest error
    it was raised from that says so (the collective's own, not a wrapper's reading of it, e.g. a
    checkpoint write that failed "with N MiB free"); None. An OSError of this process's own
    (a closed stdout pipe, a storage connection reset) is not one."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:  # `raise e from e` makes a cycle
        seen.add(id(error))
        if isinstance(error, jax.errors.JaxRuntimeError) and any(
            sign in str(error) for sign in _LOST_PEER
        ):
            found = error
        error = error.__cause__ or error.__context__
    return found


@contextlib.contextmanager
def exit_at_once_if_a_peer_is_lost(what_is_kept: str) -> Iterator[None]:
    """With several processes, an error in the block that says another process is gone (killed,
    out of memory) ends this one at once: one line naming the likely cause and `what_is_kept`,
    exit status 1. Otherwise JAX's exit waits for the lost process's heartbeat (about a
    minute), then aborts the interpreter with a C++ stack, after whatever the error was taken
    for (a checkpoint write that failed "with N MiB free on its disk")."""
    try:
        yield
    except Exception as error:
        lost = lost_peer(error) if jax.process_count() > 1 else None
        if lost is None:
            raise
        first_line = str(lost).strip().splitlines()[0]
        print(
            f"error: another process of this run is gone (killed, out of memory, preempted: "
            f"see its log); process {jax.process_index()} stopped at a collective with it "
            f"({first_line}). {what_is_kept}",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)  # skips JAX's shutdown, which would wait for the lost process, then abort
