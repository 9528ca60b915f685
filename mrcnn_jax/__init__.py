"""mrcnn_jax: Mask R-CNN in pure-functional JAX/Flax.

`load_checkpoint(workdir)` returns a predictor for notebooks; the rest lives in the subpackages
(`ops`, `modeling`, `data`, `train`, `evaluation`, `convert`, `sharding`) and the programs that
compose them (`programs`).
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the import needs TF and JAX: done lazily below
    import os

    from mrcnn_jax.programs.predictor import Predictor


def load_checkpoint(path: "str | os.PathLike", step: int | None = None) -> "Predictor":
    """See `mrcnn_jax.programs.predictor.load_checkpoint` (imported lazily: it needs TF, JAX;
    a Ctrl-C during those imports is raised after them, `interrupts.handled_interrupts`)."""
    from mrcnn_jax import interrupts

    with interrupts.handled_interrupts():
        from mrcnn_jax.programs.predictor import load_checkpoint as _load

        return _load(path, step)
