"""torchvision ImageNet ResNets imported by `mrcnn_jax.convert.imagenet` as our backbone give
torchvision's C2-C5 features; every problem of a state dict is listed in one error.

The torchvision classifiers get seeded random weights (and BatchNorm statistics, so that folding
and the affine are exercised), are saved with `torch.save` and read back through
`config.model.backbone_weights`, as training reads them.
"""

import urllib.error

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from helpers import from_torch_nchw

from mrcnn_jax.convert import imagenet
from mrcnn_jax.convert import torchvision as tv_convert
from mrcnn_jax.modeling.resnet import BN_EPSILON, ResNet
from mrcnn_jax.train import state as state_lib

torch = pytest.importorskip("torch")
torchvision_models = pytest.importorskip("torchvision.models")

FEATURE_RTOL = 1e-5  # max |ours - torchvision| / max |torchvision| per stage.


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def random_resnet(depth: int, seed: int = 0):
    """torchvision's `resnet{depth}(weights=None)` with seeded random BatchNorm affine and
    statistics, in eval mode."""
    torch.manual_seed(seed)
    model = getattr(torchvision_models, f"resnet{depth}")(weights=None)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model.eval()


def torchvision_features(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """C2-C5 (layer1..layer4 outputs) of a torchvision ResNet on NHWC `images`, as NHWC."""
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        out = {}
        for stage in range(1, 5):
            x = getattr(model, f"layer{stage}")(x)
            out[f"C{stage + 1}"] = from_torch_nchw(x)
    return out


def saved_state_dict(model, tmp_path, name="resnet.pth") -> str:
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("depth", [18, 50])
def test_imported_backbone_matches_torchvision_features(depth, tmp_path):
    model = random_resnet(depth)
    config = tiny_config(
        **{
            "model.backbone_depth": depth,
            "model.backbone_weights": saved_state_dict(model, tmp_path),
        }
    )
    variables = imagenet.backbone_variables(config.model)
    assert set(variables) == {"params", "batch_stats"}
    assert all(set(tree) == {"backbone"} for tree in variables.values())

    images = np.random.default_rng(depth).normal(size=(2, 64, 96, 3)).astype(np.float32)
    expected = torchvision_features(model, images)
    ours = ResNet(depth=depth, norm="frozen").apply(
        {name: tree["backbone"] for name, tree in variables.items()}, jnp.asarray(images)
    )
    errors = {}
    for name, reference in expected.items():
        assert ours[name].shape == reference.shape, name
        errors[name] = relative_error(ours[name], reference)
    print(f"ResNet-{depth} relative errors: {errors}")
    assert max(errors.values()) <= FEATURE_RTOL, errors


def test_imported_backbone_fits_the_initialised_model(tmp_path):
    """`with_backbone` swaps exactly the backbone subtree of a whole model's init; the BN
    variances are folded with the source's eps (1e-5 for torchvision, a no-op here)."""
    model = random_resnet(18)
    state = tv_convert.load_state_dict(saved_state_dict(model, tmp_path))
    config = tiny_config()
    converted = imagenet.convert_backbone_state_dict(state, config.model)
    np.testing.assert_array_equal(
        converted["batch_stats"]["backbone"]["stem_bn"]["var"], state["bn1.running_var"]
    )
    no_eps = imagenet.convert_backbone_state_dict(state, config.model, bn_epsilon=0.0)
    np.testing.assert_allclose(
        no_eps["batch_stats"]["backbone"]["res3_0"]["bn2"]["var"],
        state["layer2.0.bn2.running_var"] - BN_EPSILON,
        rtol=1e-6,
    )
    np.testing.assert_array_equal(
        converted["params"]["backbone"]["res2_1"]["conv2"]["kernel"],
        state["layer1.1.conv2.weight"].transpose(2, 3, 1, 0),
    )

    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN

    init = state_lib.init_variables(MaskRCNN.from_config(config.model), jax.random.key(0), (64, 64))
    merged = imagenet.with_backbone(init, converted)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(init)
    assert merged["params"]["fpn"] is init["params"]["fpn"]
    assert merged["params"]["backbone"] is converted["params"]["backbone"]
    wrong = imagenet.convert_backbone_state_dict(
        tv_convert.load_state_dict(saved_state_dict(random_resnet(34), tmp_path, "r34.pth")),
        tiny_config(**{"model.backbone_depth": 34}).model,
    )
    with pytest.raises(
        ValueError, match=r"(params|batch_stats)/backbone: the variables do not fit at \[.res2_2/"
    ):
        imagenet.with_backbone(init, wrong)


def test_every_problem_of_a_state_dict_is_listed_in_one_error(tmp_path):
    state = tv_convert.load_state_dict(saved_state_dict(random_resnet(18), tmp_path))
    del state["layer1.0.conv1.weight"]
    state["layer5.0.conv1.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    state["bn1.weight"] = np.ones(65, np.float32)
    with pytest.raises(ValueError) as error:
        imagenet.convert_backbone_state_dict(state, tiny_config().model)
    message = str(error.value)
    assert message.startswith("the state dict does not fit the ResNet-18 backbone")
    assert "1 missing keys:\n  layer1.0.conv1.weight (for params/backbone/res2_0/conv1/kernel)" in (
        message
    )
    assert "1 unmatched keys:\n  layer5.0.conv1.weight" in message
    assert "1 mismatched keys:\n  bn1.weight: float32[65], expected float32[64]" in message
    assert "fc." not in message  # the ImageNet classifier is expected and ignored


def test_a_state_dict_of_another_depth_or_network_is_one_line_naming_it(tmp_path):
    """A ResNet-18's weights for a ResNet-50 backbone (was a list of 188 keys), or another
    network's: the file, what it holds and the field to change."""
    path = saved_state_dict(random_resnet(18), tmp_path)
    config = tiny_config(**{"model.backbone_depth": 50, "model.backbone_weights": path})
    with pytest.raises(ValueError) as error:
        imagenet.backbone_variables(config.model)
    assert str(error.value) == (
        f"model.backbone_weights={path!r}: the state dict is a ResNet-18's, the config's "
        "backbone a ResNet-50 (model.backbone_depth): give a ResNet-50's weights, or set "
        "--config.model.backbone_depth=18"
    )
    other = {"features.0.weight": np.zeros((8, 3, 3, 3), np.float32)}
    with pytest.raises(ValueError) as error:
        imagenet.convert_backbone_state_dict(other, config.model)
    assert str(error.value) == (
        "the state dict is not a torchvision classification ResNet's (no layer1-layer4 blocks "
        "among its 1 tensors, e.g. features.0.weight); give a torchvision ResNet-50 state dict"
    )
    # A whole torchvision detector's (its ResNet under backbone.body.*): named, with the way on.
    detector = {f"backbone.body.{k}": v for k, v in random_resnet(18).state_dict().items()}
    detector["rpn.head.conv.0.0.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    with pytest.raises(ValueError) as error:
        imagenet.convert_backbone_state_dict(detector, config.model)
    assert str(error.value).endswith(
        "(a whole detector's: its ResNet-18 is under backbone.body.*; to start from such a Mask "
        "R-CNN, convert it with scripts/convert_torchvision.py and pass the result as "
        "--config.model.init_from); give a torchvision ResNet-50 state dict"
    )


def test_resnet_depth_tells_every_torchvision_resnet():
    models = pytest.importorskip("torchvision.models")
    for depth in (18, 34, 50, 101, 152):
        keys = dict.fromkeys(getattr(models, f"resnet{depth}")(weights=None).state_dict())
        assert imagenet.resnet_depth(keys) == depth
    assert imagenet.resnet_depth({"conv1.weight": None}) is None


def test_release_names_download_and_name_the_url_when_offline(monkeypatch):
    from torchvision.models import _api

    calls = []

    def offline(url, *args, **kwargs):
        calls.append((url, kwargs))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(_api, "load_state_dict_from_url", offline)
    config = tiny_config(**{"model.backbone_weights": "IMAGENET1K_V1"})
    with pytest.raises(
        ConnectionError,
        match=r"could not download https://download\.pytorch\.org/models/resnet18-f37072fd\.pth"
        r" .*--config\.model\.backbone_weights=FILE\.pth",
    ):
        imagenet.backbone_variables(config.model)
    ((_url, kwargs),) = calls
    assert kwargs["weights_only"] is True and kwargs["check_hash"] is True

    with pytest.raises(ValueError, match=r"ResNet18_Weights has releases \['IMAGENET1K_V1'\]"):
        imagenet.read_backbone_state_dict("IMAGENET1K_V2", 18)


def test_a_missing_file_is_named(tmp_path):
    missing = str(tmp_path / "resnet50.pth")
    with pytest.raises(FileNotFoundError, match=r"model\.backbone_weights='.*resnet50\.pth' is no"):
        imagenet.read_backbone_state_dict(missing, 50)
    assert imagenet.is_release_name("IMAGENET1K_V1") and not imagenet.is_release_name(missing)
