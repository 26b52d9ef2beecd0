"""The pictures of docs/pictures.md: four models of different kinds drawn by ``fxfeat.plot``, and one with its feature
maps on a generated image. Random weights (no download): the boxes' numbers are the pretrained models' numbers, the
feature maps are those of untrained networks.

Usage: ``python -m benchmarks.pictures --out docs/pictures`` (``make pictures``).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import fxfeat
from fxfeat.extraction.preprocess import resolve_preprocessing
from fxfeat.models import build_model

# (file name, model, fxfeat.plot arguments): a deep CNN, a 24-block ViT, an HRNet, a Swin
PICTURES = [
    ("resnet152.svg", "torchvision:resnet152", {}),
    ("vit_large.svg", "timm:vit_large_patch16_224", {"out_indices": (5, 11, 17, 23)}),
    ("hrnet_w18.svg", "timm:hrnet_w18", {}),
    ("swin_tiny.svg", "timm:swin_tiny_patch4_window7_224", {}),
    ("resnet50_dilated.svg", "torchvision:resnet50", {"out_indices": (2, 3, 4), "output_stride": 8}),
]
MAPS = ("resnet50_maps.png", "torchvision:resnet50", {})


def generated_image(height: int = 360, width: int = 480) -> Image.Image:
    """A picture with regions a network tells apart: a sky gradient, a striped field, a disc and a square."""
    rows = np.linspace(0, 1, height)[:, None, None]
    sky = np.concatenate([0.3 + 0.4 * rows, 0.5 + 0.3 * rows, np.ones_like(rows)], axis=2) * np.ones((1, width, 1))
    image = Image.fromarray((sky * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for stripe in range(0, width, 24):
        draw.rectangle((stripe, height * 2 // 3, stripe + 11, height), fill=(40, 140, 50))
        draw.rectangle((stripe + 12, height * 2 // 3, stripe + 23, height), fill=(90, 180, 60))
    draw.ellipse((60, 50, 180, 170), fill=(250, 200, 40))
    draw.rectangle((280, 120, 420, 260), fill=(180, 40, 40), outline=(20, 20, 20), width=6)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/pictures", help="the folder of the pictures")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore", fxfeat.FxFeatWarning)  # HRNet's declared modules, placed by reduction
    for name, spec, arguments in PICTURES:
        start = time.perf_counter()
        fxfeat.plot(build_model(spec), out / name, **arguments)
        print(f"{out / name}: {spec} {arguments or ''} in {time.perf_counter() - start:.1f} s")
    name, spec, arguments = MAPS
    start = time.perf_counter()
    model = build_model(spec)
    image = generated_image()
    image.save(out / "generated_image.png")
    preprocessing = resolve_preprocessing(model, (3, 224, 224), spec=spec)
    fxfeat.plot(model, out / name, image=image, preprocessing=preprocessing, **arguments)
    print(f"{out / name}: {spec} on a generated image in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
