"""`launch.use_fast_cpu_codegen()`: the scripts have XLA:CPU compile without LLVM's loop
unrolling, unless the user's `XLA_FLAGS` set backend options of their own."""

import glob
import json
import os
import subprocess
import sys

import numpy as np

from mrcnn_jax.programs import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Calls it before importing JAX (as the scripts do), compiles a small reduction (a kernel with
# loops) and reports the flags XLA started with and the result.
SCRIPT = """
import json, os
from mrcnn_jax.programs import launch
launch.use_fast_cpu_codegen()
import jax, jax.numpy as jnp
x = jnp.arange(64 * 37, dtype=jnp.float32).reshape(64, 37) / 1000
total = jax.jit(lambda x: jnp.tanh(x).sum(axis=1), backend="cpu")(x)
print(json.dumps({"xla_flags": os.environ["XLA_FLAGS"], "total": total.tolist()}))
"""


def run(tmp_path, name: str, xla_flags: str) -> tuple[dict, str, dict[str, bytes]]:
    """The script's report, the DebugOptions XLA compiled the reduction with (text proto) and
    the reduction's object files by name."""
    script, dump = tmp_path / "script.py", tmp_path / name
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=ROOT, XLA_FLAGS=f"--xla_dump_to={dump} {xla_flags}".strip())
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
    )
    (options,) = glob.glob(str(dump / "*jit__lambda.debug_options"))
    objects = {
        os.path.basename(path).split(".obj-file.")[1]: open(path, "rb").read()
        for path in glob.glob(str(dump / "*jit__lambda.obj-file.*.o"))
    }
    return json.loads(out.stdout.splitlines()[-1]), open(options).read(), objects


def expected_total() -> np.ndarray:
    x = np.arange(64 * 37, dtype=np.float64).reshape(64, 37) / 1000
    return np.tanh(x).sum(axis=1)


def test_the_option_reaches_xla_and_changes_the_code_not_the_result(tmp_path):
    fast, fast_options, fast_objects = run(tmp_path, "fast", "")
    assert fast["xla_flags"].endswith(" --xla_backend_extra_options=xla_cpu_disable_loop_unrolling")
    assert 'key: "xla_cpu_disable_loop_unrolling"' in fast_options
    # The user's own backend options are left alone (an `xla_` name XLA does not read: the
    # defaults, i.e. an opt-out).
    mine = "--xla_backend_extra_options=xla_keep_defaults"
    default, default_options, default_objects = run(tmp_path, "default", mine)
    assert default["xla_flags"].endswith(mine) and launch.CPU_CODEGEN_OPTIONS not in default_options
    assert sorted(fast_objects) == sorted(default_objects) and fast_objects
    assert any(fast_objects[name] != default_objects[name] for name in fast_objects)
    for result in (fast, default):
        np.testing.assert_allclose(result["total"], expected_total(), rtol=1e-6)


def test_other_xla_flags_are_kept(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    launch.use_fast_cpu_codegen()
    assert os.environ["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=8"
        " --xla_backend_extra_options=xla_cpu_disable_loop_unrolling"
    )
    launch.use_fast_cpu_codegen()  # once only
    assert os.environ["XLA_FLAGS"].count("xla_backend_extra_options") == 1
    monkeypatch.delenv("XLA_FLAGS")
    launch.use_fast_cpu_codegen()
    assert os.environ["XLA_FLAGS"] == "--xla_backend_extra_options=xla_cpu_disable_loop_unrolling"
