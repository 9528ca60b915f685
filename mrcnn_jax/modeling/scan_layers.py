"""Identical layers applied in sequence under one `lax.scan`, with the variables left per layer.

A ResNet stage repeats one block 2-22 times and the mask head one 3×3 conv 4 times. Unrolled,
each repetition (forward and backward) is traced and becomes its own kernels in the program
(R50's train step: 4376 kernels, 3056 with the scan; R101's: 7912, 3653); under `lax.scan`
over the layers' stacked variables there is one copy, which shortens tracing, the first step
and, for deep stages, every step (docs/performance.md). The variables stay where the unrolled
layers keep them (`res4_1/conv1/kernel`, `conv2/bias`, ...), so checkpoints, converted
torchvision weights and the optimizer's parameter groups see the same tree either way; the
stacking is a copy inside the program.
"""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Layer = Sequence[nn.Module]  # One repetition: sibling modules of the parent, in call order.


def scan_layers(
    parent: nn.Module,
    layers: Sequence[Layer],
    step: Callable[[Sequence[Callable[..., jnp.ndarray]], jnp.ndarray], jnp.ndarray],
    x: jnp.ndarray,
) -> jnp.ndarray:
    """`for layer in layers: x = step(layer, x)`, as one `lax.scan` over the layers.

    Args:
      parent: the compact module whose children the layers are (call it from its method).
      layers: the repetitions, each a sequence of child modules (not yet called) with the same
        classes and attributes (names aside) and variables of the same shapes in layer after
        layer.
      step: applies one layer, given its modules as callables, to `x`; it must keep `x`'s shape
        and dtype and not depend on which layer it applies.
      x: the input of the first layer.

    Returns:
      The output of the last layer. While the variables are being created (`init`), or for
      fewer than two layers, the layers are simply called in turn. Otherwise the result
      equals that of the loop up to float rounding, gradients included, and the updates of
      mutable collections (BatchNorm's running statistics in training) land in each layer's
      own variables as the loop would leave them. Variables the layers only read are not
      written back (under `nn.scan(variable_broadcast=True)`, as the chunked mask head runs,
      writing them would be an error).
    """
    if parent.is_initializing() or len(layers) < 2:
        for layer in layers:
            x = step(layer, x)
        return x
    per_layer = [[module.variables for module in layer] for layer in layers]
    first_shapes = jax.tree.map(jnp.shape, per_layer[0])
    for layer, variables in zip(layers[1:], per_layer[1:]):
        if jax.tree.map(jnp.shape, variables) != first_shapes:  # names, nesting and shapes
            names = [module.name for module in layer]
            raise ValueError(
                f"scan_layers: the variables of {names} differ in structure or shape from those "
                f"of {[module.name for module in layers[0]]}"
            )
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)
    templates = [module.clone(parent=None) for module in layers[0]]
    mutable = sorted(
        {c for v in per_layer[0] for c in v if c != "params" and parent.is_mutable_collection(c)}
    )

    written = []  # (module index, collection, path) of each leaf the layer writes, in order

    def body(x, variables):
        bound = [t.bind(v, mutable=mutable) for t, v in zip(templates, variables)]
        x = step(bound, x)
        written.clear()
        leaves = []
        for j, (module, before) in enumerate(zip(bound, variables)):
            for collection in mutable:
                old = dict(jax.tree_util.tree_leaves_with_path(before.get(collection, {})))
                new = module.variables.get(collection, {})
                for path, leaf in jax.tree_util.tree_leaves_with_path(new):
                    if leaf is not old.get(path):  # only what was written: reading stays a read
                        written.append((j, collection, path))
                        leaves.append(leaf)
        return x, leaves

    x, updates = jax.lax.scan(body, x, stacked)
    for (j, collection, path), values in zip(written, updates):
        for i, layer in enumerate(layers):
            scope = layer[j].scope
            for key in path[:-1]:
                scope = scope.push(key.key, reuse=True)
            scope.put_variable(collection, path[-1].key, values[i])
    return x
