"""`model.init_from`: a run that starts from another run's checkpoint takes every variable, and
the class predictors class by class by name (`train.transfer`), against a reference written
here slice by slice; architectures that differ otherwise are refused, naming the variables."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import traverse_util

from configs import coco_format_torchvision, torchvision_r50_fpn_v1, torchvision_r50_fpn_v2
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.programs import trainer
from mrcnn_jax.train import checkpoint as ckpt_lib
from mrcnn_jax.train import transfer

SOURCE_NAMES = ("fig", "N/A", "pear", "apple", "N/A")  # torchvision's COCO list repeats "N/A"


def random_like(config, seed: int) -> dict:
    """Numpy variables of `config`'s model, every entry distinct (so a slice from the wrong
    place cannot pass); BatchNorm variances positive, as a checkpoint's must be."""
    shapes = MaskRCNN.from_config(config.model).variable_shapes((64, 64))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        values = rng.normal(size=s.shape).astype(s.dtype)
        return np.abs(values) if path[-1].key == "var" else values

    return jax.tree_util.tree_map_with_path(fill, jax.device_get(shapes))


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def expected_class_layers(fresh: dict, source: dict, names, source_names) -> dict:
    """The reference: column by column, a class found once by name among the source's takes
    that class's columns; the background logit comes from the source."""
    where = {n: source_names.index(n) for n in names if source_names.count(n) == 1}
    out = {}
    for module, leaf, background, width in (
        ("box_head", ("cls_score", "kernel"), True, 1),
        ("box_head", ("cls_score", "bias"), True, 1),
        ("box_head", ("bbox_pred", "kernel"), False, 4),
        ("box_head", ("bbox_pred", "bias"), False, 4),
        ("mask_head", ("predictor_kernel",), False, 1),
        ("mask_head", ("predictor_bias",), False, 1),
    ):
        path = ("params", module, *leaf)
        new, old = fresh[path], source[path]
        columns = [old[..., :1]] if background else []
        offset = 1 if background else 0
        for j, name in enumerate(names):
            take = old if name in where else new
            k = where[name] if name in where else j
            columns.append(take[..., offset + width * k : offset + width * (k + 1)])
        out[path] = np.concatenate(columns, axis=-1)
    return out


def test_class_sources_match_by_unique_name_or_by_position_without_names():
    names = ("apple", "kiwi", "fig", "N/A")
    assert transfer.class_sources(names, SOURCE_NAMES, 4, 5) == [3, None, 0, None]
    assert transfer.class_sources((), (), 3, 3) == [0, 1, 2]
    assert transfer.class_sources((), SOURCE_NAMES, 5, 5) == [0, 1, 2, 3, 4]
    assert transfer.class_sources(names, (), 4, 3) == [None] * 4
    exported = ("Apple", "KIWI", "wild_fig")  # case, '_' and spaces aside, as the evaluator
    assert transfer.class_sources(exported, ("apple", "wild  fig", "kiwi"), 3, 3) == [0, 2, 1]


@pytest.mark.parametrize(
    "names",
    [("apple", "kiwi", "fig"), ("kiwi", "plum"), SOURCE_NAMES, ("pear",) * 1],
    ids=["some-shared", "none-shared", "same", "one"],
)
def test_every_variable_is_taken_and_the_classes_by_name(names):
    source_config = tiny_config(**{"model.num_classes": len(SOURCE_NAMES)})
    config = tiny_config(**{"model.num_classes": len(names)})
    source, fresh = random_like(source_config, 1), random_like(config, 2)
    sources = transfer.class_sources(names, SOURCE_NAMES, len(names), len(SOURCE_NAMES))
    got = flat(transfer.transfer_variables(fresh, source, sources))
    class_layers = expected_class_layers(flat(fresh), flat(source), names, SOURCE_NAMES)
    assert set(got) == set(flat(fresh)) and set(class_layers) == set(transfer.CLASS_LAYERS)
    for path, value in flat(source).items():
        want = class_layers.get(path, value)
        np.testing.assert_array_equal(got[path], want, err_msg="/".join(path))
        assert got[path].dtype == want.dtype
    if names == ("kiwi", "plum"):  # nothing shared: the class columns stay fresh
        kernel = ("params", "mask_head", "predictor_kernel")
        np.testing.assert_array_equal(got[kernel], flat(fresh)[kernel])


def test_another_architecture_is_refused_naming_the_variables():
    config = tiny_config()
    fresh = random_like(config, 2)
    narrower = random_like(tiny_config(**{"model.fpn_dim": 8}), 1)
    with pytest.raises(ValueError) as error:
        transfer.transfer_variables(fresh, narrower, [0, 1, 2])
    message = str(error.value)
    assert (
        "params/fpn/lateral2/kernel has shape (1, 1, 64, 8) there, (1, 1, 64, 16) here" in message
    )
    assert message.startswith(f"{message.split()[0]} variables do not fit: ")
    assert "more" in message  # more than the listed ones
    source = flat(random_like(config, 1))
    extra = ("params", "box_head", "conv1", "kernel")
    source[extra] = np.zeros((3, 3, 16, 8), np.float32)
    del source[("params", "rpn_head", "conv", "bias")]
    with pytest.raises(ValueError) as error:
        transfer.transfer_variables(fresh, traverse_util.unflatten_dict(source), [0, 1, 2])
    assert str(error.value) == (
        "2 variables do not fit: params/box_head/conv1/kernel (3, 3, 16, 8) is only in the "
        "checkpoint; params/rpn_head/conv/bias is not in the checkpoint"
    )


def test_init_from_maps_the_classes_of_a_saved_checkpoint_and_checks_the_config(tmp_path):
    """The trainer's path: a checkpoint written by `save_variables`, read back and mapped by the
    class names of the run's config; another architecture names the config fields."""
    source_config = tiny_config(**{"model.num_classes": len(SOURCE_NAMES)})
    source_config.data.class_names = SOURCE_NAMES
    source_config.data.label_to_category_id = tuple(range(1, len(SOURCE_NAMES) + 1))
    source = random_like(source_config, 1)
    ckpt_lib.save_variables(tmp_path / "source", source_config, source)
    names = ("apple", "kiwi", "fig")
    config = tiny_config(**{"model.init_from": str(tmp_path / "source")})
    config.data.class_names = names
    trainer.check_backbone_init(config.model)
    fresh = random_like(config, 2)
    got = flat(trainer.init_from_checkpoint(config, fresh))
    class_layers = expected_class_layers(flat(fresh), flat(source), names, SOURCE_NAMES)
    for path, value in flat(source).items():
        np.testing.assert_array_equal(got[path], class_layers.get(path, value))

    other = tiny_config(**{"model.init_from": str(tmp_path / "source"), "model.fpn_dim": 8})
    with pytest.raises(ValueError) as error:
        trainer.init_from_checkpoint(other, random_like(other, 2))
    message = str(error.value)
    assert message.startswith(
        f"config.model.init_from='{tmp_path / 'source'}' (step 0) has another architecture than "
        "this config's (only the classes may differ): its model config differs: model.fpn_dim: "
        "checkpoint 16 vs config 8. 22 variables do not fit: "
    )
    assert message.endswith(". Train with its model fields")
    v2 = {"model.roi_heads.mask_paste": "torchvision", "model.roi_heads.box_head_convs": 1}
    ckpt_lib.save_variables(tmp_path / "v2", tiny_config(**v2), random_like(tiny_config(**v2), 1))
    config.model.init_from = str(tmp_path / "v2")  # converted torchvision v2 weights, say
    with pytest.raises(ValueError) as error:
        trainer.init_from_checkpoint(config, fresh)
    assert str(error.value).endswith(
        "Train with its model fields (on COCO-format data: configs/coco_format_torchvision.py:v2)"
    )


def test_init_from_is_checked_before_any_work_and_lifts_the_frozen_backbone_refusal(tmp_path):
    missing = tiny_config(**{"model.init_from": str(tmp_path / "nowhere")})
    with pytest.raises(
        FileNotFoundError, match=r"^config\.model\.init_from: .*nowhere does not exist"
    ):
        trainer.check_backbone_init(missing.model)
    torch_file = tiny_config(**{"model.init_from": str(tmp_path / "resnet50.pth")})
    with pytest.raises(ValueError, match=r"is a PyTorch file, not a checkpoint: an ImageNet Res"):
        trainer.check_backbone_init(torch_file.model)
    both = tiny_config(**{"model.init_from": "x", "model.backbone_weights": "IMAGENET1K_V1"})
    with pytest.raises(ValueError, match=r"brings the backbone too: leave config\.model\.backbone"):
        trainer.check_backbone_init(both.model)
    config = coco_format_torchvision.get_config()
    with pytest.raises(ValueError, match=r"--config\.model\.init_from=WORKDIR"):
        trainer.check_backbone_init(config.model)  # frozen BatchNorm and stages, no weights
    ckpt_lib.save_variables(tmp_path / "tv", tiny_config(), random_like(tiny_config(), 1))
    config.model.init_from = str(tmp_path / "tv")
    trainer.check_backbone_init(config.model)


@pytest.mark.parametrize(
    "release, module", [("v1", torchvision_r50_fpn_v1), ("v2", torchvision_r50_fpn_v2)]
)
def test_the_fine_tuning_config_has_the_release_model_and_the_json_classes(release, module):
    config = coco_format_torchvision.get_config(release)
    model = module.get_config().model
    model.num_classes, model.backbone_weights = 0, ""
    assert config.model.to_dict() == model.to_dict()
    assert config.data.dataset == "coco_format" and not config.data.class_names
    with pytest.raises(ValueError, match=r"release 'v3' must be one of \['v1', 'v2'\]"):
        coco_format_torchvision.get_config("v3")
