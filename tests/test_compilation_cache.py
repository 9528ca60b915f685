"""`launch.use_compilation_cache()`: scripts keep compiled programs on disk between runs."""

import json
import os
import subprocess
import sys

from mrcnn_jax.programs import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Calls it before importing JAX (as the scripts do), compiles one small program (every compile
# is stored: no minimum compile time) and reports what JAX was configured with.
SCRIPT = """
import json, os
from mrcnn_jax.programs import launch
launch.use_compilation_cache()
import jax, jax.numpy as jnp
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((16, 16))).block_until_ready()
print(json.dumps({"dir": jax.config.jax_compilation_cache_dir,
                  "max_size": jax.config.jax_compilation_cache_max_size}))
"""


def run(tmp_path, stderr=None, **env_overrides) -> dict:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(PYTHONPATH=ROOT, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env_overrides)
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=True
    )
    if stderr is not None:
        stderr.append(out.stderr)
    return json.loads(out.stdout.splitlines()[-1])


def cache_entries(path) -> list[str]:
    return [name for name in os.listdir(path) if name.endswith("-cache")]


def test_default_cache_is_used_and_bounded(tmp_path):
    result = run(tmp_path)
    expected = tmp_path / "xdg" / "mrcnn_jax" / "xla"
    assert os.path.dirname(result["dir"]) == str(expected)
    assert result["max_size"] == launch.DEFAULT_COMPILATION_CACHE_BYTES
    entries = cache_entries(result["dir"])
    assert entries, os.listdir(result["dir"])
    run(tmp_path)  # the same program again: loaded, not stored a second time
    assert cache_entries(result["dir"]) == entries


def test_a_folder_of_ones_own_is_kept(tmp_path):
    mine = tmp_path / "mine"
    result = run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(mine))
    assert result["dir"] == str(mine) and result["max_size"] == -1  # JAX's defaults untouched
    assert cache_entries(mine)
    assert not (tmp_path / "xdg").exists()


def test_empty_folder_turns_it_off(tmp_path):
    result = run(tmp_path, JAX_COMPILATION_CACHE_DIR="")
    assert not result["dir"]
    assert not (tmp_path / "xdg").exists()


def test_unwritable_default_folder_runs_without_cache(tmp_path):
    (tmp_path / "file").write_text("")  # XDG_CACHE_HOME under a file: no folder can be made
    stderr = []
    result = run(tmp_path, stderr, XDG_CACHE_HOME=str(tmp_path / "file" / "cache"))
    assert result["dir"] is None
    assert "compilation cache off" in stderr[0] and "JAX_COMPILATION_CACHE_DIR" in stderr[0]
    assert "persistent compilation cache" not in stderr[0]  # no warning per compile from JAX


def test_the_cache_folders_are_private_and_others_folders_are_not_used(tmp_path):
    """The cache holds code that runs: its folders are made 0700 whatever the umask, and a
    folder others may write to (or a link to one) turns it off with one line."""
    stderr = []
    result = run(tmp_path, stderr)
    machine = result["dir"]
    for folder in (machine, os.path.dirname(machine), os.path.dirname(os.path.dirname(machine))):
        assert os.stat(folder).st_mode & 0o777 == 0o700, folder
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    os.makedirs(tmp_path / "other")
    os.symlink(shared, tmp_path / "other" / "mrcnn_jax")
    result = run(tmp_path, stderr, XDG_CACHE_HOME=str(tmp_path / "other"))
    assert result["dir"] is None
    assert (
        f"compilation cache off ({tmp_path}/other/mrcnn_jax is writable by other users"
        in (stderr[-1])
    )
    assert not os.listdir(shared)


def test_default_folder_names_the_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = launch.default_compilation_cache_dir()
    parent, machine = os.path.split(path)
    assert parent == str(tmp_path / "mrcnn_jax" / "xla")
    arch, digest = machine.rsplit("-", 1)
    assert arch and len(digest) == 8 and int(digest, 16) >= 0
    assert launch.default_compilation_cache_dir() == path  # stable
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert launch.default_compilation_cache_dir().startswith(os.path.expanduser("~/.cache/"))
