"""Embeddings of a dataset: ``fxfeat extract`` on the models people extract at scale (DINOv2 with its default
options, an open_clip tower with ``--features embedding``), against the loop each library's user writes (the
library's own transform on PIL images, the library's own forward), and head features beside a level from one
pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fxfeat
from fxfeat.cli import main
from fxfeat.models import build_model
from tests.test_extract import FAST, make_folder, preprocessed, small_model


def _rows_match(rows: np.ndarray, expected: torch.Tensor, minimum: float = 0.9999) -> float:
    """Each row's cosine to the hand loop's, at least ``minimum`` (the uint8 decode and resize of the workers round
    a level apart from PIL's now and then, and the rows are stored as float16); returns the lowest."""
    rows = torch.from_numpy(np.asarray(rows, dtype=np.float32))
    assert rows.shape == expected.shape
    cosine = torch.nn.functional.cosine_similarity(rows, expected.float(), dim=1)
    assert float(cosine.min()) >= minimum, cosine
    return float(cosine.min())


def _pil_batch(transform, paths) -> torch.Tensor:
    return torch.stack([transform(Image.open(path).convert("RGB")) for path in paths])


def test_dinov2_with_default_options_matches_the_timm_loop(tmp_path):
    timm = pytest.importorskip("timm")
    data = make_folder(tmp_path / "images", count=3)
    main(["extract", "timm:vit_small_patch14_dinov2", str(data), "--out", str(tmp_path / "out"), "--weights",
          "random", "--quiet"])
    arrays, metadata = fxfeat.load_features(tmp_path / "out")
    assert list(arrays) == ["pooled"]
    model = build_model("timm:vit_small_patch14_dinov2")  # the CLI's random weights: the same seed
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        batch = _pil_batch(transform, metadata["path"])
        assert batch.shape[-2:] == (518, 518)
        expected = model.forward_head(model.forward_features(batch), pre_logits=True)
    _rows_match(arrays["pooled"], expected)


def test_an_open_clip_tower_embedding_matches_the_open_clip_loop(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    data = make_folder(tmp_path / "images", count=4)
    torch.manual_seed(0)
    whole, _, transform = open_clip.create_model_and_transforms("ViT-S-32")
    whole.eval()
    torch.save(whole.state_dict(), tmp_path / "whole.pt")  # a whole dual encoder's checkpoint, text tower too
    main(["extract", "open_clip:ViT-S-32", str(data), "--out", str(tmp_path / "out"), "--weights",
          str(tmp_path / "whole.pt"), "--features", "embedding,pooled", "--quiet"])
    arrays, metadata = fxfeat.load_features(tmp_path / "out")
    with torch.no_grad():
        batch = _pil_batch(transform, metadata["path"])
        expected = whole.encode_image(batch)  # unnormalised, as fxfeat writes it
    _rows_match(arrays["embedding"], expected)
    assert arrays["pooled"].shape == (4, whole.visual.proj.shape[0])


def test_head_features_beside_a_level_from_one_pass(tmp_path):
    data = make_folder(tmp_path / "images", count=4)
    model = small_model()
    summary = fxfeat.extract(model, data, tmp_path / "out", features=["pooled", "logits", "layer3"],
                             dtype=torch.float32, **FAST)
    assert summary.features == {"pooled": (512,), "logits": (1000,), "layer3": (256, 4, 4)}
    arrays, metadata = fxfeat.load_features(tmp_path / "out")
    x = preprocessed(model, list(metadata["path"]))
    with torch.no_grad():
        for feature, extractor in (("pooled", fxfeat.compile(model, mode="pooled")),
                                   ("logits", fxfeat.compile(model, mode="logits")),
                                   ("layer3", fxfeat.compile(model, levels=["layer3"]))):
            expected = extractor.eval()(x)
            expected = expected[0] if isinstance(expected, list) else expected
            torch.testing.assert_close(torch.from_numpy(np.array(arrays[feature])), expected, rtol=1e-4,
                                       atol=1e-4)


def test_an_embedding_extractor_given_as_the_model_names_its_rows(tmp_path):
    data = make_folder(tmp_path / "images", count=2)
    extractor = fxfeat.compile(small_model(), mode="embedding", input_size=(3, 64, 64))
    summary = fxfeat.extract(extractor, data, tmp_path / "out", **FAST)
    assert summary.features == {"embedding": (1000,)}


def test_a_segmenter_has_no_embedding_to_extract(tmp_path):
    import torchvision

    data = make_folder(tmp_path / "images", count=2)
    segmenter = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    with pytest.raises(fxfeat.HeadNotFoundError, match="not one vector per image"):
        fxfeat.extract(segmenter.eval(), data, tmp_path / "out", features="embedding", **FAST)
