"""The model's own preprocessing, asked of its library (fxfeat/extraction/preprocess.py and
library_preprocessing.py): fxfeat's uint8 path (decode, resize and crop in the workers, normalise on the device)
against each library's own transform on PIL images, and the library's callable where the transform is not resize +
crop + normalise. No network; the references are built here with each library's own calls."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import fxfeat
from fxfeat.extraction.decode import decode
from fxfeat.extraction.preprocess import LibraryTransform, Preprocessing, resolve_preprocessing
from fxfeat.models import build_model

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

# Photo-like JPEGs of odd sizes, (height, width): landscape, portrait, and one smaller than every crop (upsampled).
SIZES = [(233, 347), (401, 263), (97, 131)]


def _jpegs() -> list[bytes]:
    encoded = []
    for seed, (height, width) in enumerate(SIZES):
        coarse = np.random.default_rng(seed).random((height // 8 + 1, width // 8 + 1, 3))
        picture = Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG", quality=95)
        encoded.append(buffer.getvalue())
    return encoded


def difference_in_levels(steps: Preprocessing, reference) -> tuple[float, float]:
    """Largest and mean difference, in intensity levels (1/255 before normalising), between fxfeat's path on the
    decoded JPEGs and ``reference`` (the library's transform) on the same JPEGs opened by PIL."""
    std = torch.tensor(steps.std).view(-1, 1, 1) * 255
    differences = []
    for encoded in _jpegs():
        ours = steps.normalize(steps(decode(torch.frombuffer(bytearray(encoded), dtype=torch.uint8)))[None])[0]
        theirs = reference(Image.open(io.BytesIO(encoded)).convert("RGB"))
        assert ours.shape == theirs.shape
        differences.append(((ours - theirs).abs() * std).flatten())
    levels = torch.cat(differences)
    return levels.max().item(), levels.mean().item()


def assert_as_the_library(steps, reference, source: str) -> None:
    """fxfeat's path runs the library's transform, up to the rounding of torchvision's antialiased uint8 resize
    against PIL's (measured: at most 2 levels; 0.01 on average, 0.17 for a portrait squashed to a square; a misread
    size or kernel is 4+ and 0.8+)."""
    assert isinstance(steps, Preprocessing), getattr(steps, "reason", steps)
    assert steps.source.startswith(source), steps.source
    largest, mean = difference_in_levels(steps, reference)
    assert largest <= 2 + 1e-4 and mean <= 0.2, (steps.source, largest, mean)


@pytest.mark.parametrize("name, overlay", [
    ("resnet18", {}),                                  # crop_pct 0.95, bicubic
    ("vit_tiny_patch16_224.augreg_in21k", {}),         # crop_pct 0.9, mean and std 0.5
    ("convnext_atto", {}),                             # crop_pct 0.875
    ("resnet18", {"crop_mode": "squash"}),             # resize to a square, then crop
    ("resnet18", {"crop_mode": "border"}),             # longest edge, padded with the mean colour
])
def test_timm(name, overlay):
    model = timm.create_model(name, pretrained=False, pretrained_cfg_overlay=overlay)
    reference = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    assert_as_the_library(resolve_preprocessing(model), reference, "timm resolve_model_data_config")
    config = dict(timm.data.resolve_data_config(model=model), input_size=(3, 160, 200))  # asked of timm at a size
    steps = resolve_preprocessing(model, (3, 160, 200))
    assert steps.size == (160, 200)
    assert_as_the_library(steps, timm.data.create_transform(**config), "timm")


@pytest.mark.parametrize("name", ["efficientnet_b3", "resnet50", "vit_b_16"])
def test_torchvision(name):
    weights = torchvision.models.get_model_weights(name).DEFAULT
    steps = resolve_preprocessing(torch.nn.Identity(), spec=f"torchvision:{name}")
    assert steps.size == (weights.transforms().crop_size[0],) * 2
    assert_as_the_library(steps, weights.transforms(), f"torchvision {weights} transforms()")


@pytest.mark.parametrize("spec, override", [
    ("open_clip:ViT-S-32", {}),                        # shorter edge to the size, centre crop
    ("open_clip:RN50/yfcc15m", {}),                    # a tag's mean and std
    ("open_clip:ViT-S-32", {"resize_mode": "squash"}),
])
def test_open_clip(spec, override):
    tower = build_model(spec, force_preprocess_cfg=override)
    reference = open_clip.transform.image_transform_v2(open_clip.transform.PreprocessCfg(**tower.preprocess_cfg),
                                                       is_train=False)
    assert_as_the_library(resolve_preprocessing(tower), reference, "open_clip image_transform")


@pytest.mark.parametrize("processor", [
    transformers.CLIPImageProcessor(),                                 # shortest edge 224, centre crop
    transformers.SiglipImageProcessor(),                               # exactly 224 x 224
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}),  # to 224 / crop_pct, then crop 224
    transformers.ConvNextImageProcessor(),                             # 384: exactly 384 x 384, no crop
    transformers.ViTImageProcessor(),                                  # bilinear
])
def test_hugging_face_image_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reference = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    steps = resolve_preprocessing(torch.nn.Identity(), spec=f"hf:{tmp_path}")
    assert_as_the_library(steps, lambda image: reference(images=image, return_tensors="pt")["pixel_values"][0],
                          f"transformers AutoImageProcessor: {type(reference).__name__}")


def test_a_library_transform_fxfeat_cannot_resize_refuses_another_size(tmp_path):
    transformers.CLIPImageProcessor(do_rescale=False).save_pretrained(tmp_path)  # values in 0..255, normalised
    steps = resolve_preprocessing(torch.nn.Identity(), spec=f"hf:{tmp_path}")
    assert isinstance(steps, LibraryTransform) and steps.size == (224, 224)
    with pytest.raises(fxfeat.InvalidRequestError, match="runs as the library's own transform"):
        resolve_preprocessing(torch.nn.Identity(), (3, 160, 160), spec=f"hf:{tmp_path}")


def test_a_hugging_face_model_without_an_image_processor_gets_imagenet_defaults_at_its_size(tmp_path):
    config = transformers.ViTConfig(image_size=48, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64)
    transformers.ViTModel(config).save_pretrained(tmp_path)
    steps = resolve_preprocessing(build_model(f"hf:{tmp_path}"), spec=f"hf:{tmp_path}")
    assert (steps.size, steps.resize, steps.mean) == ((48, 48), (54,), fxfeat.extraction.preprocess.IMAGENET_MEAN)
    assert steps.source.startswith("ImageNet defaults")


def test_a_transform_that_does_not_read_as_resize_crop_normalise_runs_as_the_librarys_own(tmp_path):
    """open_clip's "longest" mode pads with black (fxfeat's padding is the mean colour): the check finds the
    reading off, and the extraction runs open_clip's transform on PIL images, as the manifest says."""
    tower = build_model("open_clip:ViT-S-32", force_preprocess_cfg={"resize_mode": "longest"})
    steps = resolve_preprocessing(tower)
    assert isinstance(steps, LibraryTransform) and steps.size == (224, 224)
    assert "differs from the transform by up to" in steps.reason
    reference = open_clip.transform.image_transform_v2(open_clip.transform.PreprocessCfg(**tower.preprocess_cfg),
                                                       is_train=False)
    image = Image.open(io.BytesIO(_jpegs()[1])).convert("RGB")
    assert torch.equal(steps(image), reference(image))
    gray = image.convert("L")  # given to the library in the model's mode, as fxfeat's own decoding converts it
    assert torch.equal(steps(gray), reference(gray.convert("RGB")))
    assert resolve_preprocessing(tower, (3, 160, 160)).size == (160, 160)  # asked of open_clip at that size
    folder = tmp_path / "images"
    folder.mkdir()
    for index, encoded in enumerate(_jpegs()):
        (folder / f"{index}.jpg").write_bytes(encoded)
    fxfeat.extract(tower, folder, tmp_path / "out", progress=False, num_workers=0, dtype=torch.float32,
                   optimize=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["preprocessing"]["applied"].startswith("the library's own transform")
    arrays, metadata = fxfeat.load_features(tmp_path / "out")
    batch = torch.stack([reference(Image.open(path).convert("RGB")) for path in metadata["path"]])
    with torch.no_grad():
        expected = fxfeat.compile(tower, mode="pooled").eval()(batch)
    assert torch.equal(torch.from_numpy(np.array(arrays["pooled"])), expected)
