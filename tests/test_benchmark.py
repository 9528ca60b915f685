"""scripts/benchmark.py: the op benchmarks at tiny sizes print one JSON line; bad subcommands are
refused; `OurProgram` (the train/infer/breakdown timing) on a toy program. (The train/infer
benchmarks compile an R50 and are not run here.)"""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from helpers import imported_script

from mrcnn_jax.programs import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "benchmark.py")


RUNS = {  # name: arguments; run concurrently (each mostly waits on imports and compiles)
    "nms": ["nms", "--num_boxes=200", "--repeats=1"],
    "roi_align": ["roi_align", "--image_size=64", "--rois=8", "--channels=8", "--batch_size=1",
                  "--output_sizes=7", "--repeats=1"],
    "conv": ["conv", "--image_size=64", "--batch_size=1", "--rois=2", "--repeats=1"],
    "paste": ["paste", "--sizes=48x64,30x20", "--detections=7", "--repeats=1"],
}  # fmt: skip


@pytest.fixture(scope="module")
def outputs() -> dict[str, dict]:
    """The JSON line (the last stdout line) of each of RUNS, run from the repo root."""
    # Without tests/conftest.py's codegen option, which the script must add itself.
    own = f"{launch.BACKEND_EXTRA_OPTIONS}={launch.CPU_CODEGEN_OPTIONS}"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": os.environ["XLA_FLAGS"].replace(own, ""),
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, SCRIPT, *args], cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for name, args in RUNS.items()
    }  # fmt: skip
    results = {}
    try:
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, f"{name}: {stderr[-3000:]}"
            results[name] = json.loads(stdout.strip().splitlines()[-1])
    finally:  # none left running (on the cores of the tests after these) when one fails
        for process in processes.values():
            process.kill()
            process.wait()
    return results


def test_paste_reports_each_method_against_torchvision(outputs):
    output = outputs["paste"]
    assert output["config"]["detections"] == 7 and "rois" not in output["config"]
    results = output["results"]
    assert [(r["size"], r["method"]) for r in results] == [
        ("48x64", "detectron2"), ("48x64", "torchvision"),
        ("30x20", "detectron2"), ("30x20", "torchvision"),
    ]  # fmt: skip
    for result in results:
        assert result["detections"] == 7
        assert result["ratio"] > 0 and result["torchvision_seconds"] > 0
    assert [r["same_as_torchvision"] for r in results if r["method"] == "torchvision"] == [True] * 2


def test_nms_reports_kept_boxes_and_ratio(outputs):
    output = outputs["nms"]
    assert output["benchmark"] == "nms"
    assert output["compilation_cache"] is None  # cold compiles (tests/conftest.py sets none)
    assert launch.CPU_CODEGEN_OPTIONS in output["xla_flags"]  # compiled as the other scripts do
    assert output["config"]["num_boxes"] == ["200"] and "rois" not in output["config"]
    (result,) = output["results"]
    assert result["num_boxes"] == 200 and 0 < result["kept"] <= 200
    assert result["same_as_torchvision"] is True
    assert result["ratio"] > 0 and result["seconds"] >= 0


def test_roi_align_reports_a_ratio_per_method(outputs):
    results = outputs["roi_align"]["results"]
    assert [r["method"] for r in results] == ["gather", "einsum"]
    for result in results:
        assert result["output_size"] == 7
        assert result["ratio"] > 0 and result["torchvision_seconds"] > 0


def test_conv_reports_each_layer_against_xla_and_torch(outputs):
    results = outputs["conv"]["results"]
    assert len(results) == 10 and results[0]["layer"].startswith("stem")
    assert results[-1]["input"] == [2, 14, 14, 256]  # --rois x --batch_size mask-head RoIs
    for result in results:
        assert result["ratio_to_xla"] > 0 and result["xla_seconds"] > 0
        assert result["winograd"] is False  # this test's maps are below its pixel threshold
        assert result["ratio"] > 0 and result["torchvision_seconds"] > 0


@pytest.fixture(scope="module")
def benchmark_module():
    """scripts/benchmark.py imported (it defines its flags; nothing runs)."""
    with imported_script("benchmark.py") as module:
        yield module


def test_our_program_splits_the_first_call_and_carries_the_state(benchmark_module):
    traces = []

    @jax.jit
    def step(state, x):
        traces.append(1)
        return state + x, {"total": jnp.sum(state + x)}

    x = np.arange(6, dtype=np.float32)
    program = benchmark_module.OurProgram(step, jnp.zeros(6), x, carry=True)
    assert program.first_call is None
    assert float(program()["total"]) == 15.0  # the first call: state 0 + x
    first = program.first_call
    assert set(first) == {
        "trace_seconds", "lower_seconds", "compile_seconds", "run_seconds", "run_system_seconds",
    }  # fmt: skip
    assert all(v >= 0 for v in first.values())
    report = program.first_call_report()  # the buffer's size asked after the timed call
    assert report == {**first, "temp_gib": report["temp_gib"]} and report["temp_gib"] >= 0
    assert float(program()["total"]) == 30.0  # the new state carried over: 2x
    assert float(program()["total"]) == 45.0
    assert len(traces) == 1 and program.first_call == first  # compiled once, recorded once
    assert np.array_equal(program.args[1], x)

    plain = benchmark_module.OurProgram(jax.jit(lambda a: a * 2), x)  # no carry: the outputs
    np.testing.assert_array_equal(plain(), 2 * x)
    np.testing.assert_array_equal(plain(), 2 * x)


def test_alternating_calls_time_each_function_after_one_of_its_own(benchmark_module, monkeypatch):
    """Functions measured together take turns, and each timed call follows an untimed call of
    the same function, so that what one leaves behind (memory the VM took back after a
    torchvision step cost our next step seconds of page faults) is not timed on the other."""
    flags = types.SimpleNamespace(warmup=1, repeats=3)
    monkeypatch.setattr(benchmark_module, "FLAGS", flags)
    calls, clock = [], {"now": 0.0}
    monkeypatch.setattr(benchmark_module.time, "perf_counter", lambda: clock["now"])

    def function(name):
        def call():  # 10 s right after the other function's call, else 1 s
            clock["now"] += 10.0 if calls and calls[-1] != name else 1.0
            calls.append(name)
            return name

        return call

    cpu = []
    timed = benchmark_module.measure_alternating([function("a"), function("b")], cpu)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # the warm-up call alone, then pairs
    assert [(first, seconds, out) for first, seconds, out in timed] == [
        (1.0, 1.0, "a"), (10.0, 1.0, "b"),
    ]  # fmt: skip
    assert len(cpu) == 2
    calls.clear()  # one function: back-to-back calls already, none added
    assert benchmark_module.measure(function("c"))[1] == 1.0 and calls == ["c"] * 4


def test_torchvision_runs_as_the_recipes_do_and_infers_without_pasting(
    benchmark_module, monkeypatch
):
    """torchvision's side is its training recipe's model (frozen BatchNorm, stem and layer1
    frozen for our `freeze_at=2`; it trained all with batch statistics, about twice the
    backbone work of ours), its inference runs without autograd and returns the 28×28 mask
    probabilities, as ours (it pasted them into the image, in the timed call)."""
    torch = pytest.importorskip("torch")
    from torchvision.ops import FrozenBatchNorm2d

    config = benchmark_module.model_config("coco_r50_fpn_1x", 3)
    config.data.image_size, config.train.batch_size = (64, 96), 1
    model = benchmark_module.torchvision_maskrcnn(config, num_classes=4, min_size=64, max_size=96)
    body = model.backbone.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    batch = benchmark_module.synthetic_detection_batch(np.random.default_rng(0), config, 2)
    monkeypatch.setattr(benchmark_module, "FLAGS", types.SimpleNamespace(matched=False, seed=0))
    infer, work = benchmark_module.torchvision_model(config, batch, train=False)
    (out,) = infer()
    assert out["masks"].shape[1:] == (1, 28, 28) and torch.is_inference(out["masks"])
    assert work()["box_head_rois"] > 0


def test_unknown_subcommand_is_a_usage_error(benchmark_module):
    module = benchmark_module  # main() refuses before reading its flags
    with pytest.raises(
        app.UsageError, match=r"unknown subcommand 'bogus'; expected one of: roi_al"
    ):
        module.main(["benchmark.py", "bogus"])
    with pytest.raises(app.UsageError, match="no subcommand"):
        module.main(["benchmark.py"])
    with pytest.raises(app.UsageError, match=r"unexpected arguments after 'nms': \['extra'\]"):
        module.main(["benchmark.py", "nms", "extra"])


def test_a_config_that_takes_the_datasets_classes_gets_cocos_80(benchmark_module):
    """configs/coco_format.py leaves model.num_classes 0 (the dataset's count): the benchmark,
    which has no dataset, times it with 80 classes (it crashed drawing labels in [0, 0))."""
    assert benchmark_module.model_config("coco_format").model.num_classes == 80
    assert benchmark_module.model_config("coco_format", 3).model.num_classes == 3
    assert benchmark_module.model_config("shapes_r18").model.num_classes == 3  # its own


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--sizes=0x10", "--sizes must be a comma-separated list of HxW sizes (positive)"),
        ("--model_config=nope", "--model_config must name a module of configs/: coco_format,"),
        ("--iou_threshold=-1", "--iou_threshold=-1: -1.0 is not a number in the range [0.0, 1.0]"),
        (  # timed at 100x100 before, which training refuses
            "--sizes=512x512,100x96",
            "--sizes: 100x96 is not a multiple of model.size_divisibility=32 of "
            "--model_config=coco_r50_fpn_1x: use 128x96",
        ),
    ],
)
def test_bad_flags_are_refused_before_any_work(flag, message):
    result = subprocess.run(
        [sys.executable, SCRIPT, "infer", flag], cwd=REPO, text=True, capture_output=True
    )
    assert result.returncode == 1 and message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_without_torchvision_it_says_so_and_times_ours_alone(tmp_path):
    """A missing torch (the `torch` extra not installed) is said on stderr, not only as nulls
    in the JSON (it looked like a finished comparison)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('No module named torch')")
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, SCRIPT, "nms", "--num_boxes=50", "--repeats=1"],
        cwd=REPO, text=True, capture_output=True, env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "benchmark.py: torchvision is not available (No module named torch): timing ours alone "
        "(pip install -e '.[torch]' for the comparison)"
    ) in result.stderr
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["torchvision"] is None and output["results"][0]["ratio"] is None
