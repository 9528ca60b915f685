"""Training library: the summed loss, train state/optimizer, the jitted data-parallel step and
checkpoints (the training program that drives them is `mrcnn_jax.programs.trainer`)."""
