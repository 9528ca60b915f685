"""Multi-host for real: scripts/train.py and scripts/eval.py as 2 JAX processes × 2 CPU devices on
localhost (gloo collectives), against 1 process × 4 devices.

The 2×2 run is interrupted (Ctrl-C on one process) after its first checkpoint: both processes
stop at a step they both reach, checkpointed; relaunched, it resumes, finishes and evaluates. A
1×4 run of the same config sees the same global batches, so it must log the same per-step losses
and end with the same parameters, up to float rounding: gloo's ring all-reduce sums the devices'
gradients in another order than the in-process one (about 1 ulp), and discrete choices (proposal
top-k and NMS, RoI sampling) later amplify that; 4 steps stay within rtol 1e-4 (measured: losses
equal to 6 digits, params within 6% of the tolerance), 6 do not. scripts/eval.py on 2 processes
must score every val image exactly once and give what 1 process gives on the same checkpoint.
Every process is bounded in time and killed in a `finally`. The README's "Multi-host" section
shows the same commands. Processes given different flags stop before training, naming them.
"""

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from collections import Counter, defaultdict

import numpy as np
import pytest
from conftest import tiny_config
from test_train_loop import config_flags, final_state, leaves, read_jsonl

from mrcnn_jax import sharding
from mrcnn_jax.data import get_builder
from mrcnn_jax.train import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4
NUM_VAL = 7  # odd: the 2 eval shards have 4 and 3 images, the second padded
TIMEOUT_S = 900  # per launch (compiling on 2 busy cores is most of it)
# Variables that would make JAX detect a cluster, or route localhost gRPC through a proxy.
_DROPPED_ENV = (
    "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
    "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """`num_processes` processes of scripts/<script> with `devices` CPU devices each (process i
    given `args` and `per_process[i]`), stdout and stderr in files under `logs`; `wait()` bounds
    them in time, `kill()` ends those alive."""

    def __init__(self, script, args, num_processes, devices, logs, cache, per_process=None):
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
        env.update(
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JAX_COMPILATION_CACHE_DIR=str(cache),
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        address = f"127.0.0.1:{free_port()}"
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [(logs / f"{i}.out", logs / f"{i}.err") for i in range(num_processes)]
        self.processes = []
        for i, (out, err) in enumerate(self.logs):
            place = []
            if num_processes > 1:
                place = [
                    f"--coordinator_address={address}",
                    f"--num_processes={num_processes}",
                    f"--process_id={i}",
                ]
            with out.open("w") as stdout, err.open("w") as stderr:
                self.processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            os.path.join(REPO, "scripts", script),
                            *args,
                            *(per_process[i] if per_process else []),
                            *place,
                        ],
                        env=env,
                        cwd=REPO,
                        stdout=stdout,
                        stderr=stderr,
                    )
                )
        self.deadline = time.time() + TIMEOUT_S

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.processes)

    def output(self, i: int) -> str:
        out, err = self.logs[i]
        return out.read_text() + err.read_text()

    def failure(self) -> str | None:
        """The exit status and output tail of the first process that failed, if any."""
        for i, p in enumerate(self.processes):
            if p.poll() not in (None, 0):
                return f"process {i} exited {p.returncode}:\n{self.output(i)[-5000:]}"
        return None

    def wait(self) -> list[str]:
        """Waits for all to end (the others are killed as soon as one fails); their outputs."""
        while self.alive() and time.time() < self.deadline and not self.failure():
            time.sleep(0.2)
        problem = self.failure() or (f"timed out after {TIMEOUT_S} s" if self.alive() else None)
        self.kill()
        assert problem is None, problem
        return [self.output(i) for i in range(len(self.processes))]

    def kill(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.processes:
            p.wait()


@pytest.fixture
def launches():
    """`launch(...)` starts a `Launch`; every process still alive at the end is killed."""
    started = []

    def launch(*args, **kwargs) -> Launch:
        started.append(Launch(*args, **kwargs))
        return started[-1]

    yield launch
    for launched in started:
        launched.kill()


def train_records(workdir) -> dict[int, dict]:
    """The last `train/*` record of each step in metrics.jsonl (a resumed run re-logs the steps
    after its checkpoint), after checking that such repeats agree."""
    records = defaultdict(list)
    for record in read_jsonl(workdir / "metrics.jsonl"):
        if "train/loss" in record:
            records[record.pop("step")].append(record)
    for repeats in records.values():
        for record in repeats[1:]:
            np.testing.assert_allclose(record["train/loss"], repeats[0]["train/loss"], rtol=1e-4)
    return {step: repeats[-1] for step, repeats in sorted(records.items())}


def logged_steps(workdir) -> set[int]:
    """The steps with a `train/*` record in metrics.jsonl so far (a line being written aside)."""
    path = workdir / "metrics.jsonl"
    steps = set()
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/loss" in record:
            steps.add(record["step"])
    return steps


def eval_records(workdir) -> dict[int, dict]:
    """`{step: eval record}` of metrics.jsonl (one per step: a repeat fails)."""
    records = [r for r in read_jsonl(workdir / "metrics.jsonl") if "eval/bbox/AP" in r]
    by_step = {r["step"]: r for r in records}
    assert len(by_step) == len(records), records
    return by_step


def eval_record(workdir) -> dict:
    """The final evaluation's record in metrics.jsonl."""
    return eval_records(workdir)[NUM_STEPS]


def latest_step(workdir) -> int | None:
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    step = manager.latest_step()
    manager.close()
    return step


@pytest.mark.slow
def test_two_processes_train_resume_and_evaluate_as_one(tmp_path, launches):
    start = time.time()
    config = tiny_config(
        **{
            "data.data_dir": str(tmp_path / "tfds"),
            "data.shapes_num_train": 16,
            "data.shapes_num_val": NUM_VAL,
            "train.batch_size": 4,  # one image per device
            "eval.batch_size": 4,
            "train.num_steps": NUM_STEPS,
            "train.checkpoint_every": 2,
            "train.eval_every": 2,  # a stop at step 2 evaluates it on resume (a collective)
            "train.log_every": 1,
            "model.roi_heads.score_threshold": 0.0,  # detections on every val image
        }
    )
    get_builder(config.data)  # built once here: the processes would race to build it
    cache = tmp_path / "xla_cache"
    train_args = ["--config=configs/shapes_r18.py", *config_flags(config)]
    two, one = tmp_path / "two_by_two", tmp_path / "one_by_four"

    # 2 processes × 2 devices; Ctrl-C on process 1 once step 1 is logged stops both at a step
    # they both reach, checkpointed (it left process 0 waiting in a collective forever).
    killed = launches("train.py", [*train_args, f"--workdir={two}"], 2, 2, tmp_path / "a", cache)
    while 1 not in logged_steps(two) and killed.alive() and time.time() < killed.deadline:
        assert killed.failure() is None, killed.failure()
        time.sleep(0.02)
    assert 1 in logged_steps(two), killed.failure() or "the 2-process run timed out at step 1"
    killed.processes[1].send_signal(signal.SIGINT)
    while killed.alive() and time.time() < killed.deadline:
        time.sleep(0.05)
    outputs = [killed.output(i) for i in range(2)]
    assert [p.returncode for p in killed.processes] == [128 + signal.SIGTERM] * 2, outputs
    killed_at = latest_step(two)
    assert "interrupted: every process stops at the next step they all reach" in outputs[1]
    stopped = f"stopped at step {killed_at} on "
    assert f"{stopped}SIGTERM or Ctrl-C of one of the processes" in outputs[0], outputs[0][-3000:]
    assert f"{stopped}Ctrl-C (SIGINT) of this process" in outputs[1], outputs[1][-3000:]
    assert killed_at < NUM_STEPS, "stopped after the last checkpoint: nothing to resume"
    # As if stopped at step 2 before its evaluation was logged (where the stop lands varies):
    # the resumed processes see that together (a collective) and evaluate step 2 first.
    for step in range(3, killed_at + 1):
        shutil.rmtree(two / "checkpoints" / str(step))
    rows = read_jsonl(two / "metrics.jsonl")
    kept = [r for r in rows if not (r["step"] == 2 and "eval/bbox/AP" in r)]
    (two / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    resumed = launches("train.py", [*train_args, f"--workdir={two}"], 2, 2, tmp_path / "b", cache)
    outputs = resumed.wait()
    assert "at step 2\n" in outputs[0] and "Resumed from" in outputs[0]
    assert "step 2 eval: " in outputs[0], outputs[0][-3000:]
    assert "final eval: bbox AP" in outputs[0]
    two_s = time.time() - start

    # 1 process × 4 devices, uninterrupted.
    launches("train.py", [*train_args, f"--workdir={one}"], 1, 4, tmp_path / "c", cache).wait()
    one_s = time.time() - start - two_s

    losses_two, losses_one = train_records(two), train_records(one)
    assert list(losses_two) == list(losses_one) == list(range(1, NUM_STEPS + 1))
    for step, record in losses_one.items():
        for key, value in record.items():
            if key not in ("train/steps_per_second", "train/input_wait"):
                np.testing.assert_allclose(
                    losses_two[step][key], value, rtol=1e-4, atol=1e-6, err_msg=f"{key} {step}"
                )
    diffs = [abs(losses_two[s]["train/loss"] - r["train/loss"]) for s, r in losses_one.items()]
    print(
        "\nper-step loss 1x4:", [r["train/loss"] for r in losses_one.values()],
        "\nper-step loss 2x2:", [r["train/loss"] for r in losses_two.values()],
        f"\nmax |diff| {max(diffs):.3g}; wall: 2x2 (killed after step {killed_at}, resumed) "
        f"{two_s:.0f} s, 1x4 {one_s:.0f} s",
    )  # fmt: skip
    state_two, state_one = leaves(final_state(two)), leaves(final_state(one))
    assert state_two.keys() == state_one.keys()
    for path, value in state_one.items():
        # The momentum holds raw gradients, the most sensitive to the summation order.
        tolerance = {"rtol": 1e-3, "atol": 1e-4} if "opt_state" in path else {"rtol": 1e-4}
        np.testing.assert_allclose(
            state_two[path], value, **{"atol": 1e-6, **tolerance}, err_msg=path
        )
    evals_two, evals_one = eval_records(two), eval_records(one)
    assert list(evals_two) == list(evals_one) == [2, NUM_STEPS]  # stopped at 2 or 3: both kept
    for step, record in evals_one.items():
        assert evals_two[step] == pytest.approx(record, abs=1e-6), step

    # scripts/eval.py on 2 processes scores every val image once, as 1 process does, on the
    # same checkpoint (inference has no cross-device arithmetic: the same numbers).
    found, evals = {}, {}
    for name, processes, devices in (("2x2", 2, 2), ("1x4", 1, 4)):
        launches("eval.py", [f"--workdir={two}"], processes, devices, tmp_path / name, cache).wait()
        found[name] = json.loads((two / f"detections_{NUM_STEPS}.json").read_text())
        evals[name] = json.loads((two / f"eval_{NUM_STEPS}.json").read_text())
    per_image = {name: Counter(d["image_id"] for d in dets) for name, dets in found.items()}
    assert set(per_image["2x2"]) == set(range(1, NUM_VAL + 1))  # every val image ...
    assert per_image["2x2"] == per_image["1x4"]  # ... once: as many detections as on 1 process
    for image_id in per_image["1x4"]:
        mine = {
            name: sorted((-d["score"], d["category_id"], d["bbox"]) for d in dets
                         if d["image_id"] == image_id)
            for name, dets in found.items()
        }  # fmt: skip
        for got, want in zip(mine["2x2"], mine["1x4"]):
            np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
            np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-3)
    assert evals["2x2"] == pytest.approx(evals["1x4"], abs=1e-6)
    # ... and the numbers of the 2-process run's own final evaluation.
    saved = {k: v for k, v in evals["2x2"].items() if k not in ("step", "split", "num_images")}
    expected = {k: v for k, v in eval_record(two).items() if k != "step"}
    assert {f"eval/{k}": v for k, v in saved.items()} == pytest.approx(expected, abs=1e-6)
    assert (evals["2x2"]["step"], evals["2x2"]["split"]) == (NUM_STEPS, "validation")
    # eval.py processes given different flags stop, naming them, before evaluating.
    other = launches(
        "eval.py", [f"--workdir={two}"], 2, 2, tmp_path / "split", cache, [[], ["--split=train"]]
    )
    while other.alive() and time.time() < other.deadline:
        time.sleep(0.2)
    for i, process in enumerate(other.processes):
        assert process.returncode == 1, other.output(i)[-3000:]
        assert 'process 1: split="train" (process 0: "validation")' in other.output(i)
    print(f"total wall {time.time() - start:.0f} s")


@pytest.mark.slow
def test_a_process_killed_mid_training_ends_the_other_in_one_line_at_once(tmp_path, launches):
    """kill -9 of process 1 after step 1: process 0 ends at its next collective with one line
    naming the likely cause and the kept checkpoints (exit status 1). It printed JAX's
    traceback (or, in a checkpoint's write, "failed ... N MiB free on its disk"), then waited
    for process 1's heartbeat and aborted with a C++ stack (77 s)."""
    config = tiny_config(
        **{
            "data.data_dir": str(tmp_path / "tfds"),
            "data.shapes_num_train": 16,
            "data.shapes_num_val": 4,
            "train.batch_size": 4,
            "train.num_steps": 1000,
            "train.checkpoint_every": 1,
            "train.eval_every": 0,
            "train.log_every": 1,
        }
    )
    get_builder(config.data)  # built once here: the processes would race to build it
    workdir = tmp_path / "run"
    args = ["--config=configs/shapes_r18.py", *config_flags(config), f"--workdir={workdir}"]
    launched = launches("train.py", args, 2, 2, tmp_path / "logs", tmp_path / "cache")
    while 1 not in logged_steps(workdir) and launched.alive():
        assert time.time() < launched.deadline, "timed out before step 1"
        assert launched.failure() is None, launched.failure()
        time.sleep(0.02)
    launched.processes[1].send_signal(signal.SIGKILL)
    killed = time.time()
    while launched.processes[0].poll() is None and time.time() < killed + 60:
        time.sleep(0.05)
    output = launched.output(0)
    assert launched.processes[0].returncode == 1, output[-3000:]
    message = (
        "error: another process of this run is gone (killed, out of memory, preempted: see its "
        "log); process 0 stopped at a collective with it ("
    )
    assert message in output, output[-3000:]
    if ckpt_lib.has_complete_checkpoint(workdir):  # step 1's may have been cut by the kill
        assert f"The complete checkpoints in {workdir / 'checkpoints'} are kept" in output
    else:
        assert f"No checkpoint in {workdir / 'checkpoints'} was complete yet" in output
    assert "MiB free" not in output  # not taken for a full disk
    assert "Traceback" not in output and "Fatal Python error" not in output, output[-3000:]


def test_processes_given_different_flags_all_stop_naming_them(tmp_path, launches):
    """A flag typed on one host only (here num_steps and the workdir) made every process wait
    in a collective the others never reach, forever; now each stops before training with the
    same error, naming the process and what differs (`processes.check_processes_agree`). A
    batch size that process 1 alone refuses (2 devices) ended it with that error and process 0
    with a 72-line traceback 30 s later: train.py compares the flags first."""
    args = ["--config=configs/shapes_r18.py", f"--config.data.data_dir={tmp_path / 'tfds'}"]
    per_process = [
        [f"--workdir={tmp_path / 'run'}"],
        [f"--workdir={tmp_path / 'other'}", "--config.train.num_steps=8"],
    ]
    per_process[1].append("--config.train.batch_size=3")  # refused by process 1 alone
    launched = launches("train.py", args, 2, 1, tmp_path / "logs", tmp_path / "cache", per_process)
    while launched.alive() and time.time() < launched.deadline:
        time.sleep(0.2)
    outputs = [launched.output(i) for i in range(2)]
    message = (
        "error: the processes of this run disagree (give every process the same flags, "
        "--process_id aside, and one shared workdir): process 1: config.train.batch_size=3 "
        '(process 0: 8), config.train.num_steps=8 (process 0: 400), workdir="'
        f'{tmp_path / "other"}" (process 0: "{tmp_path / "run"}")\n'
    )
    for process, output in zip(launched.processes, outputs):
        assert process.returncode == 1, output[-3000:]
        assert message in output, output[-3000:]
    assert not (tmp_path / "tfds").exists()  # before the data
    assert not (tmp_path / "run").exists()  # before any work


@pytest.mark.parametrize("lock", ["held", "a link to a file"])
def test_a_workdir_in_use_stops_every_process_with_process_0s_refusal(lock, tmp_path, launches):
    """Process 0 alone holds the workdir's lock: it refused in one line, and process 1 ended
    in JAX's C++ abort ("Terminating process because the JAX distributed service detected
    fatal errors", exit status 134). Now every process ends with process 0's refusal, or with
    its error opening the lock file (here a planted link to a file, not written through)."""
    busy = tmp_path / "busy"
    busy.mkdir()
    args = [
        "--config=configs/shapes_r18.py",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        f"--workdir={busy}",
    ]
    with contextlib.ExitStack() as stack:
        if lock == "held":
            held = stack.enter_context(open(busy / ".train.lock", "w"))
            fcntl.flock(held, fcntl.LOCK_EX)
            held.write("pid 4242 on elsewhere\n")
            held.flush()
            message = f"error: {busy} is in use by another training run (pid 4242 on elsewhere; "
        else:
            (tmp_path / "bashrc").write_text("keep me\n")
            (busy / ".train.lock").symlink_to(tmp_path / "bashrc")
            message = f"it is a symbolic link to the file {tmp_path / 'bashrc'}, not written "
        launched = launches("train.py", args, 2, 1, tmp_path / "logs", tmp_path / "cache")
        while launched.alive() and time.time() < launched.deadline:
            time.sleep(0.2)
    for i, process in enumerate(launched.processes):
        output = launched.output(i)
        assert process.returncode == 1, output[-3000:]
        assert message in output, output[-3000:]
        assert "Terminating process" not in output, output[-3000:]
    assert not (tmp_path / "tfds").exists()  # before the data
    if lock != "held":
        assert (tmp_path / "bashrc").read_text() == "keep me\n"


def test_a_second_process_0_on_a_port_in_use_is_refused(monkeypatch):
    """gRPC shares a port between servers: the same command started twice (or two runs on one
    address) served a second coordinator beside the first, the processes of two runs joined
    each other's, and the spare process 0 waited 5 minutes, then aborted in C++."""

    def reached(**kwargs):
        raise AssertionError("jax.distributed.initialize was called")  # it would abort here

    monkeypatch.setattr(sharding.jax.distributed, "initialize", reached)
    family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as gRPC binds
        if family == socket.AF_INET6:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        server.listen()
        port = server.getsockname()[1]
        address = f"127.0.0.1:{port}"
        with pytest.raises(ValueError) as refused:
            sharding.initialize_distributed(
                coordinator_address=address, num_processes=2, process_id=0
            )
        assert str(refused.value) == (
            f"--coordinator_address={address}: port {port} is in use on this host, where "
            "process 0 serves the run: by another run's process 0, this run's started twice "
            "(one --process_id=0 per run), or another program. Give each run a free port"
        )
    sharding.check_coordinator_port_free(address)  # free again (a TIME_WAIT aside)


def test_eval_processes_given_other_workdirs_or_steps_stop_before_any_checkpoint(
    tmp_path, launches
):
    """eval.py's process 1 given another --workdir looked for process 0's checkpoint step there
    (`no complete checkpoint 22 in <its workdir>`) while process 0 waited forever, and a
    --checkpoint_step on one process only was ignored; now each stops with the same error,
    before any checkpoint is read (these workdirs hold none)."""
    per_process = [
        [f"--workdir={tmp_path / 'run'}"],
        [f"--workdir={tmp_path / 'other'}", "--checkpoint_step=2"],
    ]
    launched = launches("eval.py", [], 2, 1, tmp_path / "logs", tmp_path / "cache", per_process)
    while launched.alive() and time.time() < launched.deadline:
        time.sleep(0.2)
    message = (
        "error: the processes of this run disagree (give every process the same flags, "
        "--process_id aside, and one shared workdir): process 1: checkpoint_step=2 (process 0: "
        f'"latest"), workdir="{tmp_path / "other"}" (process 0: "{tmp_path / "run"}")\n'
    )
    for i, process in enumerate(launched.processes):
        assert process.returncode == 1, launched.output(i)[-3000:]
        assert message in launched.output(i), launched.output(i)[-3000:]


@pytest.mark.parametrize(
    "given, missing",
    [
        ({"num_processes": 2}, "without --coordinator_address, --process_id"),
        ({"coordinator_address": "127.0.0.1:1234", "process_id": 0}, "without --num_processes"),
    ],
)
def test_partial_distributed_flags_are_refused(given, missing):
    with pytest.raises(ValueError, match=f"go together .* {missing}$"):
        sharding.initialize_distributed(**given)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"process_id": 2}, r"--process_id=2 must be in \[0, --num_processes=2\)"),
        ({"coordinator_address": "127.0.0.1"}, "must be host:port"),
        ({"coordinator_address": "127.0.0.1:http"}, r"a port from 1 to 65535"),
        ({"coordinator_address": "[::1]:70000"}, r"a port from 1 to 65535"),
        ({"coordinator_address": "h:\u0663\u0663"}, r"a port from 1 to 65535"),  # not ASCII
        ({"multihost": False}, "--nomultihost contradicts"),
    ],
)
def test_bad_distributed_flags_are_refused(kwargs, message):
    flags = {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 0}
    with pytest.raises(ValueError, match=message):
        sharding.initialize_distributed(**{**flags, **kwargs})


def test_processes_with_different_device_counts_are_refused():
    """Each process feeds an equal slice of every batch: processes of 2 and 1 devices ended in
    JAX's "Unable to compute global_shape due to non-uniform sharding"."""
    devices = [types.SimpleNamespace(process_index=p) for p in (1, 0, 0)]
    with pytest.raises(ValueError, match=r"same number of devices \(process 0: 2, process 1: 1\)"):
        sharding.check_equal_slices(devices)
    sharding.check_equal_slices([*devices, devices[0]])  # 2 and 2


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_scripts_name_the_missing_distributed_flags(tmp_path, script):
    args = ["--workdir", str(tmp_path), "--num_processes=2", "--process_id=1"]
    if script == "train.py":
        args.append("--config=configs/shapes_r18.py")
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", script), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "without --coordinator_address" in result.stderr
    assert not (tmp_path / "checkpoints").exists()
