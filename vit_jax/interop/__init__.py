"""Weights to and from HF, torchvision and timm; the checkpoint CLI."""
