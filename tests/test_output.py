"""`output.write_file`: what it writes, and a failed write that names the file and leaves
nothing behind."""

import errno
import json
import os
import re

import pytest

from mrcnn_jax.evaluation import output


def test_write_file_writes_text_and_bytes(tmp_path):
    output.write_file(tmp_path / "a.json", lambda f: json.dump({"a": [1, 2]}, f))
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1, 2]}
    output.write_file(str(tmp_path / "b.bin"), lambda f: f.write(b"\x00\xff"), binary=True)
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_write_to_a_full_disk_names_the_file_and_leaves_nothing(tmp_path):
    """/dev/full's writes fail as a full disk's (ENOSPC, no file name): the error names the
    path, and the file is removed."""
    path = tmp_path / "results.json"
    path.symlink_to("/dev/full")
    with pytest.raises(OSError, match=re.escape(f"No space left on device: '{path}'")) as failure:
        output.write_file(path, lambda f: f.write("x" * 100_000))
    assert failure.value.errno == errno.ENOSPC
    assert not os.path.lexists(path)


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
    assert not path.exists()


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
