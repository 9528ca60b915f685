"""mrcnn_jax: Mask R-CNN in pure-functional JAX/Flax.

`load_checkpoint(workdir)` returns a predictor for notebooks; the rest lives in the subpackages
(`ops`, `modeling`, `data`, `train`, `evaluation`, `convert`, `sharding`) and the programs that
compose them (`programs`).
"""

__version__ = "0.1.0"


def load_checkpoint(path, step=None):
    """See `mrcnn_jax.programs.predictor.load_checkpoint` (imported lazily: it needs TF, JAX)."""
    from mrcnn_jax.programs.predictor import load_checkpoint as _load

    return _load(path, step)
