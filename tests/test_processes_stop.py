"""Two real JAX processes (gloo on localhost) that exchange in a loop, as eval.py's gathers and the
trainer's steps do, run by `launch.run` as the scripts are; some of them are interrupted or fail
at exchange 20. A process that stops alone leaves at once, and the other ends at its next
collective with it, naming it and why (`processes.stop_together`,
`exit_at_once_if_a_peer_is_lost`). Before, the one that stopped waited in JAX's exit-time barrier
for the other, which waited for it in the collective: both hung 5 minutes, then aborted with C++
stacks. Processes all stopped together still exit as before (JAX's shutdown runs)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from test_multihost import _DROPPED_ENV, REPO, free_port

WAIT_S = 3  # processes.STOP_WAIT_S in the children (10 s in the scripts)
TIMEOUT_S = 90  # a hang would take 300 s (JAX's shutdown timeout)

EXCHANGER = """
import os, signal, sys, time
from absl import flags
from mrcnn_jax.programs import launch

launch.define_flags()
_STOPPING = flags.DEFINE_list("stopping", [], "processes that stop at exchange 20")
_HOW = flags.DEFINE_enum(
    "how", "TERM", ["TERM", "INT", "exit", "raise", "exit_after"], "how they stop"
)


def main(argv):
    import numpy as np
    from jax.experimental import multihost_utils

    from mrcnn_jax.programs import processes

    processes.STOP_WAIT_S = {wait_s}
    launch.initialize()
    with processes.exit_at_once_if_a_peer_is_lost("Nothing was written."):
        for i in range(30 if _HOW.value == "exit_after" else 100_000):
            multihost_utils.process_allgather(np.int32(i))
            if i == 20 and str(flags.FLAGS.process_id) in _STOPPING.value:
                if _HOW.value == "exit_after":
                    continue
                if _HOW.value == "exit":
                    sys.exit("error: cannot read the data")
                if _HOW.value == "raise":
                    raise RuntimeError("a bug")
                os.kill(os.getpid(), getattr(signal, "SIG" + _HOW.value))
            time.sleep(0.01)
    if _HOW.value == "exit_after" and str(flags.FLAGS.process_id) in _STOPPING.value:
        time.sleep(1)  # the other is done and in JAX's exit by now
        sys.exit("error: cannot write the results")


if __name__ == "__main__":
    launch.run(main)
"""


def exchange(tmp_path, stopping: str, how: str) -> list[tuple[int, str]]:
    """Runs 2 exchanging processes; each one's exit status and output."""
    script = tmp_path / "exchanger.py"
    script.write_text(EXCHANGER.format(wait_s=WAIT_S))
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    address = f"127.0.0.1:{free_port()}"
    started = time.time()
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                f"--stopping={stopping}",
                f"--how={how}",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    ended = []
    try:
        for run in runs:
            output, _ = run.communicate(timeout=max(1, started + TIMEOUT_S - time.time()))
            ended.append((run.returncode, output))
    finally:
        for run in runs:
            run.kill()
    return ended


@pytest.mark.parametrize("how, status", [("TERM", 143), ("INT", -signal.SIGINT)])
def test_a_process_interrupted_alone_leaves_and_the_other_names_it(tmp_path, how, status):
    (status_0, output_0), (status_1, output_1) = exchange(tmp_path, "1", how)
    assert status_1 == status, output_1[-3000:]
    assert "process 1 stops without the others: they end at their next collective" in output_1
    cause = "SIGTERM" if how == "TERM" else "Ctrl-C"
    assert status_0 == 1, output_0[-3000:]
    assert (
        f"error: process 1 of this run stopped without the others ({cause}); process 0 stopped "
        "at a collective with it (" in output_0
    ), output_0[-3000:]
    assert output_0.rstrip().endswith("Nothing was written."), output_0[-3000:]
    assert "Traceback" not in output_0 + output_1 and "Fatal" not in output_0 + output_1


@pytest.mark.slow  # the same protocol as the interrupted cases above (the default run's time)
def test_a_process_failing_alone_leaves_and_the_other_names_its_error(tmp_path):
    (status_0, output_0), (status_1, output_1) = exchange(tmp_path, "1", "raise")
    assert status_1 == 1 and "RuntimeError: a bug" in output_1, output_1[-3000:]
    assert "process 1 stops without the others" in output_1
    assert status_0 == 1, output_0[-3000:]
    assert "error: process 1 of this run stopped without the others (RuntimeError: a bug)" in (
        output_0
    ), output_0[-3000:]


@pytest.mark.slow  # the default run's time; the README's commands stop one process
@pytest.mark.parametrize("how, status", [("TERM", 143), ("exit", 1)])
def test_processes_stopped_together_exit_as_before(tmp_path, how, status):
    """Both interrupted (a scheduler), or both failing on the same input: each ends with its own
    message and exit status, through JAX's shutdown."""
    ended = exchange(tmp_path, "0,1", how)
    for returncode, output in ended:
        assert returncode == status, output[-3000:]
        assert "without the others" not in output, output[-3000:]
        assert "Fatal" not in output and "Traceback" not in output, output[-3000:]
    message = "terminated (SIGTERM)" if how == "TERM" else "error: cannot read the data"
    assert all(message in output for _, output in ended)


def test_a_process_failing_after_the_last_exchange_lets_the_finished_one_exit(tmp_path):
    """Process 1 fails after the last collective while process 0, done, waits in JAX's exit:
    process 0 marked that it finished, so process 1 sees every process end and exits through
    JAX's exit too (the review found process 1 leaving alone, and process 0 then aborting)."""
    (status_0, output_0), (status_1, output_1) = exchange(tmp_path, "1", "exit_after")
    assert status_0 == 0, output_0[-3000:]
    assert status_1 == 1 and "error: cannot write the results" in output_1, output_1[-3000:]
    for output in (output_0, output_1):
        assert "without the others" not in output and "Fatal" not in output, output[-3000:]
