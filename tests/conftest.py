"""Shared pytest setup.

Forces 8 host-platform (CPU) devices before jax is imported anywhere, so data-parallel tests can
build an 8-device mesh on a CPU-only machine. Single-device tests simply use ``jax.devices()[:1]``.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# torchvision segfaults when it is imported after tensorflow in one process (torch 2.14.1,
# torchvision 0.29.1, tensorflow-cpu 2.21); importing it first is safe. Reference tests only.
try:
    import torchvision  # noqa: F401
except ImportError:
    pass
