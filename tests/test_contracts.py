"""The import rules of docs/CONTRACTS.md, checked on the source (no module is imported)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mrcnn_jax"


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported by the file at `path` (module-level or in functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def layer_of(path: Path) -> str:
    """`ops`, `modeling`, ..., `sharding`, or `top` for mrcnn_jax/__init__.py."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0].removesuffix(".py") if len(parts) > 1 or parts[0] != "__init__.py" else "top"


def library_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def uses(names: set[str], prefix: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for name in names)


# Layer -> library modules (prefixes) it must not import.
FORBIDDEN = {
    "ops": ["flax", "mrcnn_jax.modeling", "mrcnn_jax.data", "mrcnn_jax.train",
            "mrcnn_jax.evaluation", "mrcnn_jax.convert", "mrcnn_jax.programs",
            "mrcnn_jax.sharding"],
    "modeling": ["mrcnn_jax.data", "mrcnn_jax.train", "mrcnn_jax.evaluation",
                 "mrcnn_jax.convert", "mrcnn_jax.programs", "mrcnn_jax.sharding"],
    "train": ["mrcnn_jax.evaluation", "mrcnn_jax.data", "mrcnn_jax.programs",
              "mrcnn_jax.convert"],
    "evaluation": ["jax", "flax", "mrcnn_jax.train", "mrcnn_jax.data", "mrcnn_jax.programs",
                   "mrcnn_jax.modeling", "mrcnn_jax.sharding"],
    "data": ["mrcnn_jax.train", "mrcnn_jax.evaluation", "mrcnn_jax.programs",
             "mrcnn_jax.modeling", "mrcnn_jax.convert"],
    "convert": ["mrcnn_jax.data", "mrcnn_jax.evaluation", "mrcnn_jax.programs",
                "mrcnn_jax.train"],
    "sharding": ["mrcnn_jax.modeling", "mrcnn_jax.data", "mrcnn_jax.train",
                 "mrcnn_jax.evaluation", "mrcnn_jax.programs"],
}  # fmt: skip


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_library_layers_import_only_below_them(path):
    names = imports_of(path)
    assert not uses(names, "scripts"), f"{path} imports scripts/"
    assert not uses(names, "configs"), f"{path} imports configs/"
    bad = [p for p in FORBIDDEN.get(layer_of(path), []) if uses(names, p)]
    assert not bad, f"{path.relative_to(REPO)} ({layer_of(path)}/) imports {bad}"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.name)
def test_configs_import_no_library_code(path):
    allowed = {"ml_collections", "configs"}
    names = {name.split(".")[0] for name in imports_of(path)}
    assert names <= allowed, f"{path.name} imports {sorted(names - allowed)}"


def test_the_model_is_built_one_way():
    """`MaskRCNN(...)` is constructed only by `MaskRCNN.from_config`."""
    offenders = []
    for path in [*library_files(), *(REPO / "scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "MaskRCNN"
            ):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_the_checker_sees_a_violation(tmp_path):
    """The rules can fail: a synthetic ops file importing flax is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("import flax.linen as nn\nfrom mrcnn_jax.train import step\n")
    names = imports_of(bad)
    assert uses(names, "flax") and uses(names, "mrcnn_jax.train")
    assert not uses(names, "mrcnn_jax.data")
