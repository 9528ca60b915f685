"""What the processes of a multi-process run must agree on, checked before they train together.

Processes given different configs (a flag typed on one host only) or workdirs would not fail:
each would wait in a collective the others never reach, forever (SIGTERM included), or in the
first checkpoint's commit when the workdir is not one folder they all share (a local disk per
host). `check_processes_agree` compares them at the start of `trainer.train_and_evaluate` and of
scripts/train.py and scripts/eval.py (before checks that one process could fail alone) and
raises the same error on every process, naming what differs.

A process that ends while the others go on (killed, or interrupted alone) must not leave them
waiting either: `stop_together` tells an interrupted process whether every process stops (then
JAX's exit, a barrier of all processes, may run) or this one alone (then it leaves without it),
and `exit_at_once_if_a_peer_is_lost` ends the others at their next collective with it, in one
line naming the process that left and why where it told the coordination service.
"""

import contextlib
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

TOKEN_FILE = ".process_0_token"  # in the shared folder while the processes check it
_MAX_LISTED = 8  # differing settings named in an error
STOP_WAIT_S = 10.0  # how long a process that stops early waits for the others to end too
# Keys of the coordination service's key-value store (process 0 keeps it for the run).
_ENDED = "mrcnn_jax/ended/"  # + process index: why it ended ("" when its work was done)
_MAX_CAUSE = 300  # characters of a cause kept there
_HOW = "mrcnn_jax/stop"  # written once: "together" (every process ends) or "alone"
_ended_here: list[str] = []  # this process's mark, once written


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
        runtime = isinstance(error, jax.errors.JaxRuntimeError) or (
            isinstance(error, ValueError) and "Gloo" in str(error)  # a collective run at dispatch
        )
        if runtime and any(sign in str(error) for sign in _LOST_PEER):
            found = error
        error = error.__cause__ or error.__context__
    return found


def _coordination() -> Any:
    """JAX's distributed state (`jax.distributed.initialize`: its `client` of the coordination
    service, `process_id`, `num_processes`), or None: one process, or a JAX that keeps it
    elsewhere (private; then the callers do as before it was used)."""
    if not jax.distributed.is_initialized():
        return None
    try:
        from jax._src.distributed import global_state
    except ImportError:
        return None
    if (getattr(global_state, "num_processes", 1) or 1) < 2:
        return None
    return global_state if getattr(global_state, "client", None) is not None else None


def is_distributed() -> bool:
    """Whether this process is one of several of a `jax.distributed.initialize` run."""
    return _coordination() is not None


_INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait (blocked) during the block: a coordination-service call cut by
    an exception would leave the others' count or decision half done."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _mark(state: Any, cause: str) -> bool:
    """Writes once that this process ends (`cause`: why, "" when its work is done); whether
    every process has now (each reads the marks after writing its own, so the last to write
    sees them all)."""
    if not _ended_here:
        state.client.key_value_set(f"{_ENDED}{state.process_id}", cause, allow_overwrite=True)
        _ended_here.append(cause)
    return len(state.client.key_value_dir_get(_ENDED)) == state.num_processes


def _settle(client: Any, proposal: str) -> str:
    """How the processes end: `proposal`, unless one wrote the other first (the key is written
    once: every process follows the same decision)."""
    try:
        client.key_value_set(_HOW, proposal)
        return proposal
    except Exception:  # written already
        return client.blocking_key_value_get(_HOW, 1000)


def finish(status: int) -> None:
    """For a process of several whose script ends as planned (its work done, or stopped with
    the others at a step they all reached: status `status`), before JAX's exit: marks it, so
    that one that stops early after the last exchange (`stop_together`) sees every process end
    and lets JAX's exit run. If one already stopped alone and left, ends at once with `status`
    (JAX's exit would wait for it, then abort). Nothing with one process, or once marked."""
    state = _coordination()
    if state is None or _ended_here:
        return
    try:
        with _signals_held():
            if _mark(state, "") and _settle(state.client, "together") != "together":
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
    except Exception:  # the service is gone: process 0 ended; JAX's exit reports it
        pass


def stop_together(cause: str) -> bool:
    """For a process of several that ends before its work is done (`cause`: "SIGTERM",
    "Ctrl-C", an error message; its first line is kept): True when every process ends too, so
    that JAX's exit, which waits at a barrier for every process, may run (a scheduler stops
    them all; the others finished their work, `finish`); False when this one ends alone, and
    must end without JAX's exit (`os._exit`): it would wait there while the others wait for it
    in their next collective (5 minutes, then all abort with C++ stacks). The others then end
    at that collective, in one line naming this process and `cause`
    (`exit_at_once_if_a_peer_is_lost`).

    The process marks in the coordination service that it ends and waits up to `STOP_WAIT_S`
    for every other to (all interrupted, all failing on the same input, all done); the first to
    see all marks, or to give up waiting, writes the decision, which all follow. A second
    interrupt while it waits ends the wait (alone, unless all were marked already). True at
    once with one process; False if the service is gone (process 0 left) or does not answer.
    When process 0, which runs the service, leaves alone, the others end with JAX's own
    message ("Terminating process because the JAX distributed service detected fatal errors")
    and a C++ stack; a process waiting in a collective with one that stopped first cannot take
    its own interrupt, and ends at that collective instead.
    """
    state = _coordination()
    if state is None:
        return True
    client = state.client
    cause = (cause.strip().splitlines() or [""])[0][:_MAX_CAUSE] or "stopped"
    # Interrupts wait from here on (the process ends soon), but during the wait for the others:
    # one cutting a call to the service would leave the marks or the decision half written.
    signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        if _mark(state, cause):
            return _settle(client, "together") == "together"
        deadline = time.monotonic() + STOP_WAIT_S
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _INTERRUPTS)
            while True:  # in short waits: a second Ctrl-C raises between them
                try:
                    return client.blocking_key_value_get(_HOW, 200) == "together"
                except jax.errors.JaxRuntimeError as error:
                    if "DEADLINE_EXCEEDED" not in str(error):
                        raise  # not a wait that ended: the service is gone
                    if time.monotonic() > deadline:
                        break
        except KeyboardInterrupt:
            pass
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
        return _settle(client, "alone") == "together"
    except Exception:  # the service is gone
        return False


def end_unless_all_stop(cause: str, status: int) -> None:
    """Returns if `stop_together(cause)`; otherwise ends this process at once, without JAX's
    exit, saying so on stderr: exit status `status`, or killed by signal `-status` when it is
    negative (as Python ends on a Ctrl-C). Call it where a script would exit before its work is
    done, after printing why."""
    if stop_together(cause):
        return
    print(
        f"process {_coordination().process_id} stops without the others: they end at their "
        "next collective with it",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {-status})
        os.kill(os.getpid(), -status)
    os._exit(status)


def _who_stopped(wait_s: float = 1.0) -> str:
    """`process 1 of this run stopped without the others (SIGTERM)`: the processes that marked
    in the coordination service that they stop early (`stop_together`); "" if none did or the
    service does not answer within `wait_s` (it runs in process 0, which may be the one gone)."""
    state, found = _coordination(), []
    if state is None:
        return ""
    client = state.client

    def read() -> None:
        with contextlib.suppress(Exception):
            found.extend(client.key_value_dir_get(_ENDED))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(wait_s)
    marks = sorted((int(key.rsplit("/", 1)[-1]), cause) for key, cause in list(found) if cause)
    if len(marks) == 1:
        return f"process {marks[0][0]} of this run stopped without the others ({marks[0][1]})"
    listed = ", ".join(f"{index} ({cause})" for index, cause in marks)
    return f"processes {listed} of this run stopped without the others" if marks else ""


@contextlib.contextmanager
def exit_at_once_if_a_peer_is_lost(what_is_kept: str | Callable[[], str]) -> Iterator[None]:
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
        # An interrupt from here on would skip the exit below (this process's own SIGTERM
        # while its peer left first): it ends here anyway.
        signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
        first_line = str(lost).strip().splitlines()[0]
        gone = _who_stopped() or (
            "another process of this run is gone (killed, out of memory, preempted: see its log)"
        )
        print(
            f"error: {gone}; process {jax.process_index()} stopped at a collective with it "
            f"({first_line}). {what_is_kept() if callable(what_is_kept) else what_is_kept}",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(1)  # skips JAX's shutdown, which would wait for the lost process, then abort
