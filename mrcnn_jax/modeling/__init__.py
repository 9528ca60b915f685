"""Flax modules of Mask R-CNN: ResNet, FPN, RPN, RoI heads and their composition."""
