"""Weight import from other frameworks (`torchvision`: torchvision's Mask R-CNN state dicts)."""
