"""The scripts' usage errors that need no checkpoint: each names the bad argument (exit status 1,
one `error: ...` line, no traceback, not behind absl's usage message: `launch.run`).
scripts/predict.py's and scripts/eval.py's errors about a checkpoint are in
tests/test_predict.py."""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mrcnn_jax import interrupts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", name), *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def assert_usage_error(result: subprocess.CompletedProcess, message: str):
    assert result.returncode == 1, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "\nflags:\n" not in result.stderr, result.stderr[-3000:]  # absl's usage message


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--platforms=cpu,gpu", "--platforms=cpu,gpu must be some of cpu,cuda,rocm,tpu"),
        ("--score_threshold=nan", "--score_threshold=nan must be in [0, 1]"),
    ],
)
def test_export_script_names_its_bad_flags(flag, message, tmp_path):
    """Before the checkpoint is read (they named export_saved_model's arguments: `platforms=
    ('cpu', 'gpu') must be ...`)."""
    result = run_script("export.py", f"--workdir={tmp_path}", f"--out={tmp_path / 'out'}", flag)
    assert_usage_error(result, message)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "out",
    [
        "a_file",
        "a_link_to_nothing",
        pytest.param("/proc/no_such_folder/out", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("script", ["export.py", "convert_torchvision.py"])
def test_scripts_refuse_an_out_they_cannot_write_before_reading_the_model(script, out, tmp_path):
    """An --out that is a regular file was a NotADirectoryError traceback, and one that cannot
    be made failed only after the model was loaded and converted (here the workdir, or the
    state dict, does not exist: that error would come first)."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_link_to_nothing").symlink_to(tmp_path / "nothing")
    what = {"a_file": "a file, not a folder", "a_link_to_nothing": "a symbolic link to nothing"}
    out = tmp_path / out if out in what else out
    model = {"export.py": "--workdir=", "convert_torchvision.py": "--state_dict="}[script]
    result = run_script(script, f"{model}{tmp_path / 'none'}", f"--out={out}")
    assert_usage_error(result, f"cannot write into {out} (--out): ")
    if os.path.basename(out) in what:
        assert f": {out} is {what[os.path.basename(out)]}\n" in result.stderr, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["a_file", "a_link_to_nothing"]


def test_a_failed_export_leaves_no_out_folder_it_made(tmp_path):
    """--out (and its missing parents) is made before the model is read, so that one that
    cannot be written is said at once; an export that then fails (here: no checkpoint) removes
    them again (the review found them left behind)."""
    out = tmp_path / "made" / "a" / "b"
    result = run_script("export.py", f"--workdir={tmp_path}", f"--out={out}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{tmp_path} is neither a workdir with checkpoints/" in result.stderr, result.stderr[
        -3000:
    ]
    assert os.listdir(tmp_path) == []


def test_a_ctrl_c_the_script_does_not_handle_is_one_line():
    """eval.py stopped by Ctrl-C printed a 30-line traceback (train.py and predict.py handle
    theirs, saying what is kept): `launch.run` ends any script with one line, killed by SIGINT
    (a shell sees exit status 130 and stops a loop running it)."""
    code = (
        "from mrcnn_jax.programs import launch\n"
        "def main(argv):\n"
        "    raise KeyboardInterrupt\n"
        "launch.run(main)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGINT, result.stderr[-3000:]
    assert result.stderr.endswith("\ninterrupted (Ctrl-C)\n") or result.stderr == (
        "interrupted (Ctrl-C)\n"
    ), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def assert_interrupted(result: subprocess.CompletedProcess) -> None:
    """Ended by a Ctrl-C as `launch.run` ends a script: one line, killed by SIGINT."""
    assert result.returncode == -signal.SIGINT, result.stderr[-3000:]
    assert result.stderr.endswith("interrupted (Ctrl-C)\n"), result.stderr[-3000:]


def run_launched(tmp_path, body: str) -> subprocess.CompletedProcess:
    """`body` (the lines of a script's `main`) run by `launch.run`, in a subprocess."""
    code = (
        "import os, signal, time\n"
        "from mrcnn_jax.evaluation import output\n"
        "from mrcnn_jax.programs import launch\n"
        "def main(argv):\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
        + "launch.run(main)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


def test_sigterm_runs_the_clean_ups_of_a_ctrl_c_and_exits_143(tmp_path):
    """SIGTERM (a scheduler's stop) killed eval.py/export.py mid-write: a truncated detections
    file, a half-written SavedModel that refused the rerun. Now it is raised as
    `interrupts.Terminated`, so the clean-ups of a Ctrl-C run, and the script says so."""
    result = run_launched(
        tmp_path,
        "def write(f):\n"
        "    f.write('[1, ')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(60)\n"
        "output.write_file('detections.json', write)",
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert result.stderr.endswith("terminated (SIGTERM)\n"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and os.listdir(tmp_path) == []


def test_a_ctrl_c_that_python_drops_in_a_finalizer_still_stops_the_script(tmp_path):
    """A Ctrl-C landing in a finalizer (TF's `__del__`, JAX's gc callback) is dropped by Python
    ("Exception ignored in ..."): eval.py then ran on, printed its metrics and exited 0."""
    result = run_launched(
        tmp_path,
        "class Resource:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.5)  # the KeyboardInterrupt is raised here, in the finalizer\n"
        "Resource()\n"
        "time.sleep(30)\n"
        "open('finished', 'w').close()",
    )
    assert_interrupted(result)
    assert "Exception ignored" not in result.stderr and os.listdir(tmp_path) == []


def test_a_ctrl_c_during_a_compile_stops_the_script_after_it(tmp_path):
    """XLA's compiler runs Python's signal handlers from C++: a Ctrl-C raised there was dropped
    (eval.py went on and wrote its results) or abandoned the compile, whose threads crashed
    Python's exit (train.py and eval.py: `interrupted`, then a segmentation fault, exit status
    139). The scripts' handler raises once the compile is done."""
    result = run_launched(
        tmp_path,
        "import threading, jax, jax.numpy as jnp\n"
        "def long_to_compile(x):\n"
        "    for i in range(150):  # unrolled: seconds of compiling\n"
        "        x = jnp.tanh(x @ x.T + i) * 0.5 + jnp.roll(x, i, axis=1)\n"
        "    return x.sum()\n"
        "lowered = jax.jit(long_to_compile).lower(jnp.ones((8, 8)))\n"
        "threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "start = time.time()\n"
        "lowered.compile()\n"
        "open(f'compiled in {time.time() - start:.1f} s', 'w').close()\n"
        "time.sleep(1)\n"
        "open('finished', 'w').close()",
    )
    assert_interrupted(result)
    compiled = os.listdir(tmp_path)
    assert len(compiled) == 1 and compiled[0].startswith("compiled in "), compiled
    assert float(compiled[0].split()[2]) > 0.3, compiled  # the signal came during the compile


def run_plain(tmp_path, body: str) -> subprocess.CompletedProcess:
    """`body` run as a notebook runs a cell: Python's default SIGINT handler, no `launch.run`."""
    return subprocess.run(
        [sys.executable, "-c", "import os, signal, threading, time\n" + body],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env(tmp_path),
    )  # fmt: skip


def _env(tmp_path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, str(tmp_path)])}


@pytest.mark.parametrize("what", ["compile", "import", "finalizer"])
def test_a_ctrl_c_in_a_library_call_is_raised_after_a_compile_an_import_or_a_finalizer(
    what, tmp_path
):
    """A notebook's Ctrl-C (Python's default handler) during a predictor's first compile
    abandoned it, which went on in the background (4.3 GB and both cores after 20 interrupted
    calls) and crashed the exit (segmentation fault, 6 of 6); one during the first
    `load_checkpoint`'s imports left `jax` half imported until the kernel restarted; one in
    JAX's garbage-collection callback was lost. In the library's entry points
    (`interrupts.handled_interrupts`) each is raised after, and the default handler is back."""
    (tmp_path / "slow_module.py").write_text("import time\ntime.sleep(1.5)\nDONE = True\n")
    work = {
        "compile": (
            "import jax, jax.numpy as jnp\n"
            "def long_to_compile(x):\n"
            "    for i in range(150):  # unrolled: seconds of compiling\n"
            "        x = jnp.tanh(x @ x.T + i) * 0.5 + jnp.roll(x, i, axis=1)\n"
            "    return x.sum()\n"
            "lowered = jax.jit(long_to_compile).lower(jnp.ones((8, 8)))\n"
            "def work():\n"
            "    lowered.compile()\n"
        ),
        "import": "def work():\n    import slow_module\n",
        "finalizer": (
            "import gc\n"
            "class Resource:\n"
            "    def __del__(self):\n"
            "        time.sleep(1.0)  # the KeyboardInterrupt is raised here: dropped\n"
            "def work():\n"
            "    Resource()\n"
            "    time.sleep(1.0)\n"
        ),
    }[what]
    result = run_plain(
        tmp_path,
        work + "from mrcnn_jax import interrupts\n"
        "threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "start = time.time()\n"
        "try:\n"
        "    with interrupts.handled_interrupts():\n"
        "        work()\n"
        "    print('not interrupted')\n"
        "except KeyboardInterrupt:\n"
        "    print(f'interrupted after {time.time() - start:.1f} s')\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "import sys\n"
        "print('imported whole' if getattr(sys.modules.get('slow_module'), 'DONE', 0) else '')\n",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "interrupted after " in result.stdout, result.stdout + result.stderr[-3000:]
    assert "Exception ignored" not in result.stderr, result.stderr[-3000:]
    seconds = float(result.stdout.split("interrupted after ")[1].split()[0])
    after = {"compile": 0.3, "import": 1.4, "finalizer": 0.3}[what]  # its end (dropped there)
    assert seconds > after, result.stdout
    assert ("imported whole" in result.stdout) == (what == "import"), result.stdout


@pytest.mark.parametrize("signals, stopped", [(1, "after"), (2, "during")])
def test_a_ctrl_c_in_a_compile_waits_for_it_unless_pressed_again(tmp_path, signals, stopped):
    """The scripts' handler defers a Ctrl-C that lands in a compile (here a 3 s loop taken for
    one) until it is done; a second Ctrl-C meanwhile stops the script at once, wherever it
    lands (a compile that never ends can still be stopped)."""
    result = run_launched(
        tmp_path,
        "import threading\n"
        "from mrcnn_jax import interrupts\n"
        "interrupts.in_compile = lambda frame: getattr(frame, 'f_code', None) is spin.__code__\n"
        "def spin(seconds):\n"
        "    end = time.time() + seconds\n"
        "    while time.time() < end:\n"
        "        pass\n"
        f"for delay in [0.3, 0.8][:{signals}]:\n"
        "    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "start = time.time()\n"
        "try:\n"
        "    spin(3)\n"
        "finally:\n"
        "    open(f'{time.time() - start:.1f}', 'w').close()\n"
        "time.sleep(5)",
    )
    assert_interrupted(result)
    (seconds,) = [float(name) for name in os.listdir(tmp_path)]
    assert (2.9 < seconds < 4) if stopped == "after" else (0.7 < seconds < 2), seconds


def test_a_ctrl_c_in_a_loop_waiting_for_the_device_stops_it_at_once(tmp_path):
    """Only a compile defers a Ctrl-C: one landing in JAX's waits for results (a train step's
    `block_until_ready`, a predictor's `device_get`) stops the loop at once (the review found
    it deferred there, over and over, until the loop ended)."""
    result = run_launched(
        tmp_path,
        "import threading, jax, jax.numpy as jnp\n"
        "step = jax.jit(lambda x: jnp.tanh(x @ x) * 0.5)\n"
        "x = jnp.ones((600, 600))\n"
        "jax.block_until_ready(step(x))  # compiled before the signal\n"
        "threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "start = time.time()\n"
        "try:\n"
        "    while time.time() < start + 20:\n"
        "        x = jax.device_get(jax.block_until_ready(step(x)))\n"
        "finally:\n"
        "    open(f'{time.time() - start:.1f}', 'w').close()",
    )
    assert_interrupted(result)
    (seconds,) = [float(name) for name in os.listdir(tmp_path)]
    assert seconds < 3, seconds


@pytest.mark.parametrize("name", ["train.py", "convert_torchvision.py"])
def test_a_config_override_without_its_dashes_is_refused(name, tmp_path):
    """Refused before anything runs (flags that would fail fast otherwise: a regular file as
    the workdir, a missing state dict)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    flags = {
        "train.py": ["--config=configs/shapes_r18.py", f"--workdir={a_file}"],
        "convert_torchvision.py": [f"--out={tmp_path / 'out'}", f"--state_dict={a_file}.pth"],
    }[name]
    result = run_script(name, *flags, "config.train.num_steps=5", "extra")
    assert_usage_error(result, "unexpected arguments: ['config.train.num_steps=5', 'extra']")
    assert result.stderr.endswith(
        "error: unexpected arguments: ['config.train.num_steps=5', 'extra']\n"
        f"(`{os.path.join(REPO, 'scripts', name)} --help` describes the script and its flags)\n"
    ), result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


_UNKNOWN_FIELDS = [
    ("--config.train.foo=1", "flag --config.train.foo: the config has no field 'foo'"),
    (
        "--config.trian.num_steps=1",
        "flag --config.trian.num_steps: the config has no field 'trian' (did you mean \"train\"?)",
    ),
    (
        "--config.model.rpn.pre_nms_topk_tran=5",
        "flag --config.model.rpn.pre_nms_topk_tran: the config has no field "
        "'pre_nms_topk_tran' (did you mean \"pre_nms_topk_train\"?)",
    ),
]


@pytest.mark.parametrize(
    "name, override, message",
    [("train.py", *case) for case in _UNKNOWN_FIELDS]
    + [  # the same `launch.parse_flags`: one case by default, the others slow (a start each)
        pytest.param("convert_torchvision.py", *case, marks=[pytest.mark.slow] if i else [])
        for i, case in enumerate(_UNKNOWN_FIELDS)
    ],
)
def test_a_config_override_naming_no_field_is_a_usage_error(name, override, message, tmp_path):
    """ml_collections raises KeyError/AttributeError while absl parses the flags: without
    `launch.parse_flags` that was a traceback through absl and ml_collections."""
    flags = {
        "train.py": ["--config=configs/shapes_r18.py", f"--workdir={tmp_path / 'w'}"],
        "convert_torchvision.py": [
            "--config=configs/torchvision_r50_fpn_v1.py",  # overrides need it there
            f"--out={tmp_path / 'out'}",
            f"--state_dict={tmp_path}.pth",
        ],
    }[name]
    result = run_script(name, *flags, override)
    assert_usage_error(result, message)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "name, override",
    [
        ("train.py", []),
        ("convert_torchvision.py", ["--config.train.num_steps=5"]),
        pytest.param("train.py", ["--config.train.num_steps=5"], marks=pytest.mark.slow),
        pytest.param("convert_torchvision.py", [], marks=pytest.mark.slow),
    ],
)
def test_a_config_file_that_cannot_be_opened_is_a_usage_error(name, override, tmp_path):
    """ml_collections defers the failure to the config's first use: an OSError chained to
    another, while absl parses the flags when an override reads the config (a 59-line
    traceback). The message names the flag, the file and, for a relative path, the folder."""
    flags = {
        "train.py": [f"--workdir={tmp_path / 'w'}"],
        "convert_torchvision.py": [f"--out={tmp_path / 'out'}", f"--state_dict={tmp_path}.pth"],
    }[name]
    result = run_script(name, "--config=configs/shapes_r81.py", *flags, *override)
    assert_usage_error(
        result,
        f"--config=configs/shapes_r81.py: No such file or directory (looked for from {REPO})",
    )
    assert not os.listdir(tmp_path)


def test_a_config_override_without_a_config_says_so(tmp_path):
    """absl called it an unknown flag (`Unknown command line flag 'config.model.num_classes'`),
    confusing where --config has a default, as convert_torchvision.py's (the release's)."""
    result = run_script(
        "convert_torchvision.py", f"--out={tmp_path / 'out'}", "--config.model.num_classes=5"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        "FATAL Flags parsing error: --config.model.num_classes overrides a field of --config, "
        "which is not given: pass the config file first (--config=configs/<name>.py)"
    ) in result.stderr, result.stderr[-3000:]
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "config, message",
    [
        ("--flagfile", "flag --config.train.num_stpes: the config has no field 'num_stpes'"),
        ("--config=", "--config is empty: give a config file (configs/<name>.py)"),
    ],
)
def test_config_given_in_a_flagfile_or_empty_is_seen(config, message, tmp_path):
    """--config in a --flagfile counts as given (the override was refused as having none);
    an empty --config with an override was ml_collections' words on an empty path."""
    flagfile = tmp_path / "flags.cfg"
    flagfile.write_text("--config=configs/shapes_r18.py\n")
    config = f"--flagfile={flagfile}" if config == "--flagfile" else config
    result = run_script(
        "train.py", config, f"--workdir={tmp_path / 'w'}", "--config.train.num_stpes=5"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"FATAL Flags parsing error: {message}" in result.stderr, result.stderr[-3000:]
    assert os.listdir(tmp_path) == ["flags.cfg"]


def test_a_config_file_without_get_config_is_one_line(tmp_path):
    """A file that is not a config (`/dev/null`, a module without `get_config`): ml_collections'
    40-line AttributeError traceback."""
    (tmp_path / "notes.py").write_text("x = 1\n")
    (tmp_path / "mine.py").write_text(  # its own code's error: its traceback, naming the line
        f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport notes\n"
        "def get_config():\n    return notes.get_config()\n"
    )
    result = run_script("train.py", f"--config={tmp_path / 'mine.py'}", f"--workdir={tmp_path}/w")
    assert "return notes.get_config()" in result.stderr, result.stderr[-3000:]
    assert "the file defines no get_config()" not in result.stderr, result.stderr[-3000:]
    for config in (tmp_path / "notes.py", "/dev/null"):
        result = run_script("train.py", f"--config={config}", f"--workdir={tmp_path / 'w'}")
        assert_usage_error(
            result, f"--config={config}: the file defines no get_config() (a config file: "
        )
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "name, flags",
    [
        ("train.py", ["--config=configs/shapes_r18.py", "--workdir="]),
        ("eval.py", ["--workdir="]),
        ("predict.py", ["--workdir=", "photo.jpg"]),
        ("export.py", ["--workdir=/tmp/w", "--out="]),
    ],
)
def test_an_empty_path_flag_is_refused_not_the_current_folder(name, flags, tmp_path):
    """`--workdir=$RUN` with RUN unset trained into the current folder (its config.json
    replaced), and the readers read it."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", name), *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    flag = next(f for f in flags if f.endswith("="))
    assert_usage_error(result, f"{flag[:-1]} is empty (an unset shell variable?): name a folder")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("given", ["--config=~/c.py", "--flagfile=~/flags.cfg"])
def test_a_config_file_under_home_is_found_through_its_tilde(given, tmp_path):
    """A shell leaves the `~` of `--config=~/c.py` as it is ("No such file or directory"), and
    a flagfile's lines are never expanded."""
    shutil.copy(os.path.join(REPO, "configs", "shapes_r18.py"), tmp_path / "c.py")
    (tmp_path / "flags.cfg").write_text("--config=~/c.py\n")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "train.py"),
         given.replace("~", str(tmp_path)) if "flagfile" in given else given,
         f"--workdir={tmp_path / 'w'}", "--config.train.num_stpes=5"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert_usage_error(result, "flag --config.train.num_stpes: the config has no field")


def test_a_deferred_interrupt_is_raised_once_and_not_again_later():
    """`raise_pending` takes a deferral whose repeat is not sent yet (the repeat is then not
    sent: a second KeyboardInterrupt came after the call), and one already sent is not left
    behind to raise at the end of a later, uninterrupted call (a notebook's next cell)."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    interrupts._defer(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        interrupts.raise_pending()
    time.sleep(3 * interrupts._RETRY_S)  # no repeat arrives (it would raise here)
    interrupts._deferred[signal.SIGINT] = True  # sent, and taken by another handler
    interrupts.raise_pending()  # nothing to raise
    assert not interrupts._deferred


@pytest.mark.parametrize("name", ["train.py", "convert_torchvision.py", "eval.py"])
def test_a_flagfile_that_cannot_be_opened_is_one_line(name, tmp_path):
    """ml_collections reads the --flagfile as train.py and the converter define --config: a
    missing one was a 30-line traceback there, absl's one line in the other scripts."""
    result = run_script(name, f"--flagfile={tmp_path / 'flags.cfg'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        "FATAL Flags parsing error: ERROR:: Unable to open flagfile: [Errno 2] No such file or "
        f"directory: '{tmp_path / 'flags.cfg'}'"
    ) in result.stderr, result.stderr[-3000:]


def test_train_refuses_a_config_that_does_not_fit_before_any_work(tmp_path):
    result = run_script(
        "train.py",
        "--config=configs/shapes_r18.py",
        f"--workdir={tmp_path / 'w'}",
        "--config.data.image_size=(300, 451)",
    )
    assert_usage_error(
        result,
        "config.data.image_size=(300, 451) is not a multiple of config.model.size_divisibility=32",
    )
    assert not os.listdir(tmp_path)


def test_a_tuple_override_given_twice_is_refused_where_a_scalar_takes_the_last(tmp_path):
    """ml_collections joins a tuple field's values given twice (absl's last-one-wins for a
    scalar): (256, 256, 320, 320) would be refused as an image size, naming no repetition."""
    flags = ["--config=configs/shapes_r18.py", f"--workdir={tmp_path / 'w'}"]
    result = run_script(
        "train.py", *flags, "--config.data.image_size=(256, 256)", "--config.seed=1",
        "--config.data.image_size=(320, 320)",
    )  # fmt: skip
    assert_usage_error(
        result,
        "error: --config.data.image_size is given 2 times ((256, 256), (320, 320)); "
        "ml_collections would join the tuples into (256, 256, 320, 320): give it once",
    )
    result = run_script("train.py", *flags, "--config.seed=1", "--config.seed=-1")
    assert_usage_error(result, "error: config.seed=-1 must be an integer in [0, 2**32 - 1]")
    assert not os.listdir(tmp_path)


def test_train_refuses_weights_that_cannot_start_it_before_making_the_workdir(tmp_path):
    result = run_script(
        "train.py", "--config=configs/shapes_r18.py", f"--workdir={tmp_path / 'w'}",
        f"--config.model.init_from={tmp_path / 'nowhere'}",
    )  # fmt: skip
    assert_usage_error(
        result, f"error: config.model.init_from: {tmp_path / 'nowhere'} does not exist"
    )
    assert not os.listdir(tmp_path)


def test_train_refuses_a_workdir_inside_another_run_s_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.json").write_text('{"model": {}, "train": {}}')
    result = run_script(
        "train.py", "--config=configs/shapes_r18.py", f"--workdir={tmp_path / 'checkpoints'}"
    )
    assert_usage_error(
        result,
        f"error: the workdir {tmp_path / 'checkpoints'} is inside the checkpoints folder of the "
        f"training run in {tmp_path}: train in --workdir={tmp_path} to resume that run",
    )
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]
    assert os.listdir(tmp_path / "checkpoints") == []


def test_train_refuses_a_workdir_that_is_a_regular_file(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    result = run_script("train.py", "--config=configs/shapes_r18.py", f"--workdir={a_file}")
    assert_usage_error(result, f"--workdir={a_file} is a file, not a folder")
    below = a_file / "run"  # was `error: [Errno 20] Not a directory: ...`, after the set-up
    result = run_script("train.py", "--config=configs/shapes_r18.py", f"--workdir={below}")
    assert_usage_error(result, f"cannot write into {below} (--workdir): [Errno 20] Not a directory")


def test_train_ends_later_errors_in_one_line_and_refuses_a_workdir_in_use(tmp_path):
    """A config that does not fit the data (known once the dataset is built) ends the run with
    `error: ...` and no traceback (which `--verbosity=0` shows); a workdir whose lock another
    train.py holds is refused before any work, naming that run (two runs in one workdir wrote
    each other's checkpoints and interleaved their metrics)."""
    common = [
        "--config=configs/shapes_r18.py",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.data.shapes_num_train=8",
        "--config.data.shapes_num_val=8",
    ]
    message = "error: config.model.num_classes=4 but dataset shapes/"
    for verbosity in ([], ["--verbosity=0"]):
        result = run_script(
            "train.py", *common, f"--workdir={tmp_path / 'w'}", "--config.model.num_classes=4",
            *verbosity,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr[-3000:]
        assert message in result.stderr, result.stderr[-3000:]
        assert ("Traceback" in result.stderr) == bool(verbosity), result.stderr[-3000:]

    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / ".train.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("pid 4242 on elsewhere\n")
        lock.flush()
        result = run_script("train.py", *common, f"--workdir={busy}")
    assert result.returncode == 1, result.stderr[-3000:]
    message = f"error: {busy} is in use by another training run (pid 4242 on elsewhere; lock"
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert os.listdir(busy) == [".train.lock"]


@pytest.mark.slow
def test_train_ends_a_diverging_run_in_one_line(tmp_path):
    """A loss gone NaN ends train.py with `error: ...` (it was a traceback), saying that no
    checkpoint was written (it said "the last good checkpoint is kept")."""
    result = run_script(
        "train.py", "--config=configs/shapes_r18.py", f"--workdir={tmp_path / 'w'}",
        f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.shapes_num_train=8",
        "--config.data.shapes_num_val=8", "--config.data.image_size=(64, 64)",
        "--config.train.batch_size=8", "--config.train.num_steps=6",
        "--config.train.log_every=1", "--config.train.base_lr=1e9",
        "--config.train.grad_clip_norm=0",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: non-finite training metrics at step " in result.stderr, result.stderr[-3000:]
    assert "no checkpoint was written; start again with a lower train.base_lr" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("name", ["eval.py", "predict.py"])
def test_a_workdir_without_checkpoints_is_refused(name, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for workdir, message in (
        (empty, "is neither a workdir with checkpoints/ nor a checkpoints/<step>"),
        (tmp_path / "missing", "does not exist (a workdir holding checkpoints/)"),
    ):
        inputs = [__file__] if name == "predict.py" else []  # an existing file, never read
        result = run_script(name, f"--workdir={workdir}", *inputs)
        assert_usage_error(result, f"{workdir} {message}")


@pytest.mark.parametrize(
    "name, flags, message",
    [
        (
            "train.py",
            [f"--config={REPO}/configs/shapes_r18.py", "--workdir=ram://runs/a"],
            "--workdir: ram://runs/a: ram:// URLs are not supported; give a local path or a "
            "gs://, s3://, az://, hf:// URL",
        ),
        (
            "predict.py",
            ["--workdir=gs:/bucket/runs/a", __file__],
            "--workdir: gs:/bucket/runs/a: a URL takes two slashes (gs://...)",
        ),
        (
            "eval.py",
            ["--workdir=file:///tmp/runs/a"],
            "--workdir: file:///tmp/runs/a: file:// URLs are not supported",
        ),
        (
            "export.py",
            ["--workdir=/nowhere", "--out=file:///tmp/exported"],
            "--out: file:///tmp/exported: file:// URLs are not supported",
        ),
        (
            "convert_torchvision.py",
            ["--out=s3:/bucket/converted", "--state_dict=/nowhere.pth"],
            "--out: s3:/bucket/converted: a URL takes two slashes (s3://...)",
        ),
    ],
)
@pytest.mark.slow  # five script starts; `paths.absolute`'s refusals are unit-tested
def test_a_url_etils_cannot_open_is_a_usage_error_before_any_work(name, flags, message, tmp_path):
    """A URL of another scheme than etils.epath's (a KeyError deep in etils), or one with a
    single slash (a local folder `gs:` in the current one): one line naming it."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", name), *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert_usage_error(result, message)
    assert not os.listdir(tmp_path)


def test_eval_refuses_json_without_images_or_with_a_split_before_the_workdir(tmp_path):
    for flags, message in (
        (["--json=test.json"], "--json and --images go together"),
        (["--images=images/"], "--json and --images go together"),
        (["--json=t.json", "--images=i/", "--split=train"], "--split=train picks a split of"),
    ):
        result = run_script("eval.py", f"--workdir={tmp_path}", *flags)
        assert_usage_error(result, message)


def test_predict_refuses_a_batch_size_of_0(tmp_path):
    """0 is refused as any size that is not a positive multiple of the local device count is,
    not taken as the default; before the workdir is looked at."""
    result = run_script("predict.py", f"--workdir={tmp_path}", "--batch_size=0", __file__)
    assert_usage_error(result, "--batch_size=0 must be a positive multiple of the")


def test_train_with_a_torchvision_release_does_not_crash_importing_torchvision(tmp_path):
    """`model.backbone_weights` naming a release (the COCO recipes): torchvision is imported
    after TensorFlow otherwise, which killed the process (segmentation fault, exit -11). There is
    no release V9, so the run stops at the weights (no download) with the message that says so."""
    result = run_script(
        "train.py", "--config=configs/shapes_r18.py", f"--workdir={tmp_path / 'run'}",
        "--config.model.backbone_weights=IMAGENET1K_V9", "--config.train.num_steps=0",
        "--config.data.shapes_num_train=4", "--config.data.shapes_num_val=2",
        f"--config.data.data_dir={tmp_path / 'data'}",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "model.backbone_weights='IMAGENET1K_V9': torchvision's ResNet18_Weights has" in (
        result.stderr
    )


def test_reading_a_release_after_tensorflow_is_an_error_not_a_crash():
    code = (
        "import tensorflow\n"
        "from mrcnn_jax.convert import imagenet\n"
        "imagenet.download_backbone_state_dict('IMAGENET1K_V1', 50)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "RuntimeError: reading torchvision's ImageNet releases needs torchvision" in (
        result.stderr
    )


@pytest.mark.parametrize(
    "name",
    ["train.py", "eval.py", "predict.py", "export.py", "benchmark.py", "convert_torchvision.py"],
)
def test_help_describes_the_script_and_makes_no_cache_folder(name, tmp_path):
    """`--help` prints the script's docstring and its flags; it makes no compilation cache
    folder (`launch.set_up_process` does nothing for a help request)."""
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    del env["JAX_COMPILATION_CACHE_DIR"]  # the conftest's "" (no cache): the default's folder
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", name), "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{name}:" in result.stdout + result.stderr  # absl's list of the script's flags
    assert not os.listdir(tmp_path)


def test_the_converter_without_the_torch_extra_says_what_to_install(tmp_path):
    """Installed without `[torch]` (here a `torch` that cannot be imported, first on the path),
    convert_torchvision.py was a 17-frame ImportError traceback."""
    for name in ("torch", "torchvision"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "convert_torchvision.py"), "--out=o"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"},
    )  # fmt: skip
    assert_usage_error(
        result, "reading torchvision weights needs PyTorch: pip install 'mrcnn_jax[torch]'"
    )
    assert sorted(os.listdir(tmp_path)) == ["torch", "torchvision"]


@pytest.mark.slow
def test_train_interrupted_before_its_first_checkpoint_says_none_is_kept(tmp_path):
    """Ctrl-C while the first step compiles: train.py said "the complete checkpoints in ... are
    kept" where none was written yet; it says so now, and that the command starts again."""
    workdir = tmp_path / "w"
    log = tmp_path / "log"
    with log.open("w") as out:
        run = subprocess.Popen(
            [
                sys.executable, os.path.join(REPO, "scripts", "train.py"),
                "--config=configs/shapes_r18.py", f"--workdir={workdir}",
                f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.shapes_num_train=8",
                "--config.data.shapes_num_val=8", "--config.data.image_size=(64, 64)",
                "--config.train.num_steps=20",
            ],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        deadline = time.time() + 300
        while "Model: " not in log.read_text() and run.poll() is None:
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        run.send_signal(signal.SIGINT)  # the first step compiles: no checkpoint yet
        run.wait(timeout=300)
    finally:
        run.kill()
    output = log.read_text()
    assert run.returncode == 128 + signal.SIGINT, output[-3000:]
    assert (
        f"interrupted (Ctrl-C). No checkpoint in {workdir / 'checkpoints'} was complete yet: the "
        "same command starts again from step 0." in output
    ), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
