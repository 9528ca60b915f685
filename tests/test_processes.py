"""`processes`: what the processes of a multi-process run must agree on. The 2-process run that
disagrees is in tests/test_multihost.py; here the pure parts, and the collectives on one
process."""

import re

import jax

from mrcnn_jax.programs import processes

SETTINGS = {"config": {"train": {"num_steps": 6, "lr": 0.1}, "data": {"data_dir": "/data"}}}
FIRST = {"settings": {**SETTINGS, "workdir": "/shared/run"}, "folder": "/shared/run", "token": "a"}


def test_the_collectives_return_this_process_s_text_on_one_process():
    assert processes.broadcast_text("héllo {}") == "héllo {}"
    assert processes.gather_texts("") == [""]
    assert processes.gather_texts("a; b") == ["a; b"]


def test_differences_name_each_field_with_both_values():
    mine = {"train": {"num_steps": 8, "lr": 0.1, "new": [1, 2]}, "data": {}}
    assert processes.differences(SETTINGS["config"], mine) == [
        'data.data_dir=no such field (process 0: "/data")',
        "train.new=[1, 2] (process 0: no such field)",
        "train.num_steps=8 (process 0: 6)",
    ]
    assert processes.differences(SETTINGS, SETTINGS) == []


def test_agreement_problems():
    assert processes.agreement_problems(FIRST, FIRST, token_seen="a") == []
    # Another host's local disk: the same path, not process 0's file (none, or an old run's).
    for seen in (None, "old"):
        (problem,) = processes.agreement_problems(FIRST, FIRST, token_seen=seen)
        assert problem.startswith(
            f"it does not see the file process 0 wrote into /shared/run ({processes.TOKEN_FILE})"
        )
    no_folder = {**FIRST, "folder": "None", "token": None}  # nothing shared to check
    assert processes.agreement_problems(no_folder, no_folder, token_seen=None) == []
    other = {**FIRST, "settings": {"config": {"train": {"num_steps": 6}}, "workdir": "/local"}}
    assert processes.agreement_problems(FIRST, other, token_seen=None) == [
        'config.data.data_dir=no such field (process 0: "/data"), config.train.lr=no such '
        'field (process 0: 0.1), workdir="/local" (process 0: "/shared/run")'
    ]
    many = {**FIRST, "settings": {f"f{i:02d}": i for i in range(12)}}
    (problem,) = processes.agreement_problems({**FIRST, "settings": {}}, many, token_seen="a")
    assert problem.endswith("f07=7 (process 0: no such field) and 4 more")
    assert len(re.findall(r"\(process 0", problem)) == 8


def test_one_process_is_not_checked(tmp_path):
    processes.check_processes_agree({"a": 1}, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no token written


def test_lost_peer_is_the_deepest_error_saying_another_process_is_gone():
    """A checkpoint write wrapping gloo's error is named by gloo's error, not by the wrapper's
    reading of it ("... MiB free on its disk"); other errors are not a lost peer."""
    gloo = jax.errors.JaxRuntimeError(
        "UNKNOWN: Gloo AllGather failed: Read error: Connection reset by peer"
    )
    try:
        try:
            raise gloo
        except RuntimeError as error:
            raise OSError(f"writing a checkpoint failed ({error}), 100 MiB free") from error
    except OSError as wrapped:
        assert processes.lost_peer(wrapped) is gloo
    assert processes.lost_peer(ValueError("config.data.image_size must be ...")) is None
    # A small collective that runs as it is dispatched (process_allgather of a scalar) raises
    # gloo's error as a ValueError.
    at_dispatch = ValueError(
        "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
        "Connection closed by peer [127.0.0.1]:32677"
    )
    assert processes.lost_peer(at_dispatch) is at_dispatch
    heartbeat = jax.errors.JaxRuntimeError("UNAVAILABLE: Task 1 heartbeat timeout")
    assert processes.lost_peer(heartbeat) is heartbeat
    # This process's own: a closed stdout pipe (`train.py | head`), a storage connection reset.
    assert processes.lost_peer(BrokenPipeError(32, "Broken pipe")) is None
    assert processes.lost_peer(ConnectionResetError(104, "Connection reset by peer")) is None
    cycle = ValueError("x")
    cycle.__cause__ = cycle  # `raise e from e`
    assert processes.lost_peer(cycle) is None
