"""Pure jnp/numpy detection ops (no Flax): boxes, anchors, NMS, RoIAlign, targets (with mask
targets), the valid extent and the CPU convolution.

Boxes are `(x1, y1, x2, y2)` float32 in input-image pixels everywhere (see docs/CONTRACTS.md).
"""
