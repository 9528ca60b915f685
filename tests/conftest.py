"""Shared pytest setup.

Forces 8 host-platform (CPU) devices before jax is imported anywhere, so data-parallel tests can
build an 8-device mesh on a CPU-only machine. Single-device tests simply use ``jax.devices()[:1]``.
"""

import os
import sys
import time

import pytest

from mrcnn_jax.programs import launch

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
# Compile as the scripts do (no LLVM loop unrolling), so that a test may compare a script's
# result with one computed here bit for bit; scripts that tests start inherit it.
launch.use_fast_cpu_codegen()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The scripts keep compiled programs in ~/.cache (launch.use_compilation_cache); the scripts that
# tests start do not, unless a test gives them a folder of its own.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

# torchvision segfaults when it is imported after tensorflow in one process (torch 2.14.1,
# torchvision 0.29.1, tensorflow-cpu 2.21); importing it first is safe. Reference tests only.
try:
    import torchvision  # noqa: F401
except ImportError:
    pass


def pytest_configure(config):
    """The default run (`-m "not slow"`: small programs, compile-bound) has LLVM optimise them at
    level 0 (`--xla_backend_optimization_level=0`; same float semantics, ~30 % less wall time
    for a compile-bound module such as tests/test_canvas.py); the slow run (long training loops)
    and a flag set by the caller keep theirs. Subprocesses that tests start inherit it."""
    flags = os.environ["XLA_FLAGS"]
    if config.getoption("markexpr") == "not slow" and "optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = flags + " --xla_backend_optimization_level=0"


def pytest_runtest_setup(item):
    """Skips the test if it starts after `MRCNN_TEST_DEADLINE` (seconds since the epoch), which
    `.ci/run` sets for the slow tests so that CI ends within its time limit on a slow day."""
    deadline = os.environ.get("MRCNN_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip(f"started after MRCNN_TEST_DEADLINE={deadline} (set by .ci/run)")


def tiny_config(**overrides):
    """The shapes config shrunk so that a train step compiles in seconds (64² images, narrow
    heads, small RoI budgets). `overrides` are dotted paths, e.g. `{"model.norm": "sync"}`."""
    from configs import shapes_r18

    config = shapes_r18.get_config()
    config.data.image_size = (64, 64)
    config.data.max_instances = 4
    config.data.mask_size = 16
    config.model.fpn_dim = 16
    config.model.rpn.pre_nms_topk_train = config.model.rpn.pre_nms_topk_test = 100
    config.model.rpn.post_nms_topk_train = config.model.rpn.post_nms_topk_test = 50
    config.model.rpn.batch_size_per_image = 64
    config.model.roi_heads.batch_size_per_image = 16
    config.model.roi_heads.box_head_dim = 32
    config.model.roi_heads.mask_head_dim = 16
    config.model.roi_heads.detections_per_image = 10
    config.model.roi_heads.detections_pre_nms_topk = 100
    config.train.batch_size = 2
    config.train.warmup_steps = 1
    # SGD, as the tolerances and step budgets of the tests were measured with (the main job's
    # AdamW is covered by test_optimizer and test_train_loop).
    config.train.optimizer = "sgd"
    config.train.base_lr = 0.01
    for path, value in overrides.items():
        node = config
        *parents, leaf = path.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Turns on JAX's persistent compilation cache in a fresh directory for the requesting
    module (scripts it runs in subprocesses can point at the same directory)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = tmp_path_factory.mktemp("xla_cache")
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(path))
    compilation_cache.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()
