"""`output.write_file`: what it writes, and a failed or killed write that names the file and
leaves the one that was there."""

import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys

import pytest

from mrcnn_jax.evaluation import output


def test_write_file_writes_text_and_bytes(tmp_path):
    output.write_file(tmp_path / "a.json", lambda f: json.dump({"a": [1, 2]}, f))
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2]}
    output.write_file(str(tmp_path / "b.bin"), lambda f: f.write(b"\x00\xff"), binary=True)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"


def test_a_write_to_a_full_disk_names_the_file_and_leaves_the_old_one(tmp_path):
    """A full disk's write error (ENOSPC) carries no file name: the error names the path; the
    file that was there stays, and no partial file is left."""
    path = tmp_path / "results.json"
    path.write_text("old")

    def write(f):
        f.write("x" * 100_000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as f.write on a full disk

    with pytest.raises(OSError, match=re.escape(f"No space left on device: '{path}'")) as failure:
        output.write_file(path, write)
    assert failure.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == ["results.json"] and path.read_text() == "old"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_link_to_a_device_is_written_through_and_a_full_ones_error_names_it(tmp_path):
    """A link to a device (`detections.json -> /dev/null`, a pipe) is written through, not
    replaced by a file; /dev/full's writes fail as a full disk's (ENOSPC, no file name): the
    error names the path, and the link is removed. A regular file keeps its permissions."""
    null = tmp_path / "null.json"
    null.symlink_to("/dev/null")
    output.write_file(null, lambda f: f.write("[]"))
    assert null.is_symlink() and os.readlink(null) == "/dev/null"
    path = tmp_path / "results.json"
    path.symlink_to("/dev/full")
    with pytest.raises(OSError, match=re.escape(f"No space left on device: '{path}'")) as failure:
        output.write_file(path, lambda f: f.write("x" * 100_000))
    assert failure.value.errno == errno.ENOSPC
    assert not os.path.lexists(path)
    path.write_text("old")
    path.chmod(0o600)
    output.write_file(path, lambda f: f.write("new"))
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_process_killed_while_writing_leaves_the_old_file_not_a_truncated_one(tmp_path):
    """SIGTERM/SIGKILL in the middle of `json.dump` left a truncated detections file under its
    final name (eval.py, predict.py): the file is now renamed into place once whole."""
    path = tmp_path / "detections.json"
    path.write_text("[1]")
    script = (
        "import json, os, signal\n"
        "from mrcnn_jax.evaluation import output\n"
        "def write(f):\n"
        "    f.write('[' + '1, ' * 100_000)\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        f"output.write_file({str(path)!r}, write)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert path.read_text() == "[1]"
    (partial,) = set(os.listdir(tmp_path)) - {"detections.json"}
    assert partial.startswith(".detections.json.partial-")  # hidden, and says what it is
    output.write_file(path, lambda f: json.dump([2], f))
    assert json.loads(path.read_text()) == [2]


def test_a_link_to_a_file_is_not_written_through(tmp_path):
    """A downloaded workdir may hold `predictions/detections.json -> ~/.bashrc`: refused, the
    file it points to untouched; a link in a folder above the file is followed as usual."""
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    link = tmp_path / "detections.json"
    link.symlink_to(victim)
    message = f"it is a symbolic link to the file {victim}, not written through (remove the link)"
    with pytest.raises(OSError, match=re.escape(message)) as failure:
        output.write_file(link, lambda f: f.write("[]"))
    assert failure.value.filename == str(link)
    assert victim.read_text() == "mine\n" and link.is_symlink()
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    output.write_file(tmp_path / "linked" / "a.json", lambda f: f.write("[]"))
    assert (tmp_path / "real" / "a.json").read_text() == "[]"


def test_a_missing_folder_is_named_and_a_failed_write_callback_leaves_nothing(tmp_path):
    missing = tmp_path / "no" / "results.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        output.write_file(missing, lambda f: f.write("{}"))
    path = tmp_path / "results.json"
    with pytest.raises(TypeError, match="not JSON serializable"):  # half written, then fails
        output.write_file(path, lambda f: json.dump([1] * 10_000 + [object()], f))
    assert os.listdir(tmp_path) == []


def test_a_gs_path_is_written_through_epaths_storage_backend(tmp_path, monkeypatch):
    """`gs://` (a TPU pod's workdir) goes to epath's storage backend (TensorFlow's gfile where
    TF is installed, as here), mocked onto a local folder; Python's own `open` would fail."""
    from etils.epath import backend

    def local_open(path, mode):  # a bucket has no folders to make first
        local = str(path).replace("gs://", f"{tmp_path}/")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        return open(local, mode)

    monkeypatch.setattr(backend.tf_backend, "open", local_open)
    output.write_file("gs://bucket/results.json", lambda f: json.dump([1], f))
    assert json.loads((tmp_path / "bucket" / "results.json").read_text()) == [1]
