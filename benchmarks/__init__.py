"""Benchmarks of fxfeat against timm, torchvision and the physical limit. Not tests: see docs/benchmarks.md."""
