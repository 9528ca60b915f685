"""`launch.use_huge_pages()`: the scripts restart once with glibc's malloc on huge pages."""

import json
import os
import platform
import subprocess
import sys

import pytest

from mrcnn_jax.programs import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints a line before and after the call: the first comes out twice when it re-executes. Then
# it touches a fresh 256 MiB block from malloc (as XLA's buffers; not numpy, which asks for huge
# pages itself) and reports the page faults that took.
SCRIPT = """
import json, os, resource, sys
print(json.dumps({"before": os.environ.get("GLIBC_TUNABLES")}), flush=True)
from mrcnn_jax.programs import launch
if __name__ == "__main__":
    launch.use_huge_pages()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(2**28)
ctypes.memset(block, 1, 2**28)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
libc.free(block)
print(json.dumps({"after": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:],
                  "faults": faults}))
"""


def run(tmp_path, tunables=None) -> list[dict]:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = ROOT
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run(
        [sys.executable, "-u", str(script), "--flag=1", "x y"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


needs_huge_pages = pytest.mark.skipif(
    not launch._huge_pages_available(), reason="no glibc or transparent huge pages are off"
)


@needs_huge_pages
def test_restarts_once_with_the_tunable_and_the_same_arguments(tmp_path):
    plain, restarted, result = run(tmp_path)
    assert plain == {"before": None}
    assert restarted == {"before": "glibc.malloc.hugetlb=1"}
    assert result["after"] == "glibc.malloc.hugetlb=1"
    assert result["argv"] == ["--flag=1", "x y"]


@needs_huge_pages
def test_other_tunables_are_kept_and_an_explicit_setting_is_left_alone(tmp_path):
    lines = run(tmp_path, "glibc.malloc.trim_threshold=1000000")
    assert [line.get("before") for line in lines[:2]] == [
        "glibc.malloc.trim_threshold=1000000",
        "glibc.malloc.trim_threshold=1000000:glibc.malloc.hugetlb=1",
    ]
    opted_out = run(tmp_path, "glibc.malloc.hugetlb=0")
    assert len(opted_out) == 2  # no restart
    assert opted_out[1]["after"] == "glibc.malloc.hugetlb=0"


def _thp_mode() -> str:
    with open(launch._THP_SETTING) as setting:
        return setting.read()


def _glibc_version() -> tuple[int, ...]:
    return tuple(int(part) for part in platform.libc_ver()[1].split(".") if part.isdigit())


@needs_huge_pages
@pytest.mark.skipif(
    not launch._huge_pages_available()
    or "[madvise]" not in _thp_mode()
    or _glibc_version() < (2, 35),
    reason="transparent huge pages not in madvise mode (with [always] every block gets them) "
    "or glibc before 2.35 (no glibc.malloc.hugetlb)",
)
def test_huge_pages_take_far_fewer_page_faults(tmp_path):
    """Touching a fresh 256 MiB malloc block: 65 536 faults of 4 KiB pages without the tunable,
    about 640 with it (2 MiB pages; the reason for `use_huge_pages`)."""
    with_huge_pages = run(tmp_path)[-1]["faults"]
    without = run(tmp_path, "glibc.malloc.hugetlb=0")[-1]["faults"]
    assert without > 60_000
    assert with_huge_pages < without / 10
