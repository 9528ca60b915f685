"""Weight import from other frameworks: `torchvision` (torchvision's Mask R-CNN state dicts) and
`imagenet` (torchvision's ImageNet classification ResNets as the backbone of a fresh model)."""
