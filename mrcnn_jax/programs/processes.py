"""What the processes of a multi-process run must agree on, checked before they train together.

Processes given different configs (a flag typed on one host only) or workdirs would not fail:
each would wait in a collective the others never reach, forever (SIGTERM included), or in the
first checkpoint's commit when the workdir is not one folder they all share (a local disk per
host). `check_processes_agree` compares them at the start of `trainer.train_and_evaluate` and
raises the same error on every process, naming what differs.
"""

import json
import secrets
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

TOKEN_FILE = ".process_0_token"  # in the workdir, while the processes check it is shared
_MAX_LISTED = 8  # differing config fields named in an error


def broadcast_text(text: str) -> str:
    """Process 0's `text`, on every process (a collective: every process must call it)."""
    data = np.frombuffer(text.encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    padded = np.zeros(size, np.uint8)
    padded[: min(size, data.size)] = data[:size]
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


def config_differences(first: dict, mine: dict) -> list[str]:
    """The fields of config dict `mine` that differ from `first`'s (process 0's), as
    `name=value (process 0: value)`, sorted by name."""
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
    """Why this process cannot train with process 0: `first` and `mine` are their
    `{"config", "workdir", "token"}` (process 0's token: what it wrote into the workdir's
    `TOKEN_FILE`), `token_seen` what this process reads there (None: no such file)."""
    problems = []
    differences = config_differences(first["config"], mine["config"])
    if differences:
        listed = ", ".join(differences[:_MAX_LISTED])
        more = len(differences) - _MAX_LISTED
        listed += f" and {more} more" if more > 0 else ""
        problems.append(f"its config differs from process 0's: {listed}")
    if mine["workdir"] != first["workdir"]:
        problems.append(f"its workdir {mine['workdir']} is not process 0's {first['workdir']}")
    elif token_seen != first["token"]:
        problems.append(
            f"it does not see the file process 0 wrote into {mine['workdir']} ({TOKEN_FILE}): "
            "the workdir must be one folder that every process shares (gs://..., NFS), not a "
            "local disk per host"
        )
    return problems


def check_processes_agree(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """With several processes (a collective: all call it), checks that each was given process
    0's config and workdir, and sees what process 0 writes into the workdir. Does nothing with
    one process.

    Raises:
      ValueError: on every process, naming each process that disagrees and why (the first
        differing config fields, or the workdir).
    """
    if jax.process_count() == 1:
        return
    mine = {"config": json.loads(config.to_json_best_effort()), "workdir": str(workdir)}
    token_file = workdir / TOKEN_FILE
    if jax.process_index() == 0:
        mine["token"] = secrets.token_hex(8)
        token_file.write_text(mine["token"])
    first = json.loads(broadcast_text(json.dumps(mine)))  # after process 0 wrote the token
    token_seen = token_file.read_text() if token_file.exists() else None
    problems = gather_texts("; ".join(agreement_problems(first, mine, token_seen)))
    if jax.process_index() == 0:
        token_file.unlink(missing_ok=True)
    disagreeing = [f"process {i}: {text}" for i, text in enumerate(problems) if text]
    if disagreeing:
        raise ValueError(
            "the processes of this run disagree (give every process the same flags, "
            f"--process_id aside, and one shared --workdir): {'; '.join(disagreeing)}"
        )
