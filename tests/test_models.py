"""Models by name (fxfeat/models.py, fxfeat/dual_encoders.py): open_clip's image towers, the image side of Hugging
Face dual encoders, and checkpoints of a whole dual encoder loaded into its image side. Random weights, no network:
the expected values are the library's own (``encode_image``, ``get_image_features``, ``CLIPModel.forward``)."""

from __future__ import annotations

import pytest
import torch

import fxfeat
from fxfeat.dual_encoders import ImageSide, is_dual_encoder
from fxfeat.models import build_model, split_spec

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TOWER = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=64)
TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def test_spec_names_open_clip_with_or_without_a_tag():
    assert split_spec("open_clip:ViT-B-32") == ("open_clip", "ViT-B-32")
    assert split_spec("open_clip:ViT-B-32/laion2b_s34b_b79k") == ("open_clip", "ViT-B-32/laion2b_s34b_b79k")
    with pytest.raises(fxfeat.InvalidModelError, match="names a library but no model"):
        split_spec("open_clip:")


@pytest.mark.parametrize("arch", ["ViT-S-32", "RN50", "convnext_tiny"])
def test_open_clip_tower_is_encode_image(arch, tmp_path):
    torch.manual_seed(0)
    whole = open_clip.create_model(arch).eval()
    with torch.no_grad():  # weights of its own, not the seed's: the checkpoint is what makes the tower equal
        for parameter in whole.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in whole.state_dict().items()}},
               tmp_path / "whole.pt")  # as open_clip's training saves it: DDP names, text tower and all
    tower = build_model(f"open_clip:{arch}", weights=str(tmp_path / "whole.pt"))
    assert tower.preprocess_cfg["size"] in (224, (224, 224))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(tower(x), whole.encode_image(x))
        assert not torch.equal(tower(x), torch.nn.functional.normalize(whole.encode_image(x), dim=-1))
    torch.save(whole.visual.state_dict(), tmp_path / "tower.pt")  # the tower's own names load too
    alone = build_model(f"open_clip:{arch}", weights=str(tmp_path / "tower.pt"))
    with torch.no_grad():
        assert torch.equal(alone(x), whole.encode_image(x))


def test_open_clip_names_tags_and_checkpoints_that_do_not_fit(tmp_path, monkeypatch):
    with pytest.raises(fxfeat.InvalidModelError, match="no model named 'ViT-B-3'.*ViT-B-32"):
        build_model("open_clip:ViT-B-3")
    with pytest.raises(fxfeat.InvalidModelError, match="no pretrained tag for ViT-B-32 named 'laion2b'"):
        build_model("open_clip:ViT-B-32/laion2b")
    with pytest.raises(fxfeat.InvalidModelError, match="(?s)names no pretrained tag.*laion2b_s34b_b79k"):
        build_model("open_clip:ViT-B-32", weights="pretrained")
    # offline, as HF_HUB_OFFLINE=1 makes it (read once, when huggingface_hub is imported): no retries over the network
    monkeypatch.setattr(pytest.importorskip("huggingface_hub").constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(fxfeat.WeightsUnavailableError, match="--weights PATH"):
        build_model("open_clip:RN50/openai", weights="pretrained")
    tagged = build_model("open_clip:RN50/yfcc15m", weights="random")  # the tag's preprocessing, no download
    assert tagged.preprocess_cfg["mean"] == open_clip.get_pretrained_cfg("RN50", "yfcc15m")["mean"]
    torch.manual_seed(0)
    whole = open_clip.create_model("ViT-S-32")
    torch.save(whole.state_dict(), tmp_path / "vit.pt")
    with pytest.raises(fxfeat.WeightsUnavailableError, match="does not fit open_clip:RN50: [1-9][0-9]* missing keys"):
        build_model("open_clip:RN50", weights=str(tmp_path / "vit.pt"))
    state = whole.state_dict()
    state["visual.proj"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "wrong_shape.pt")
    with pytest.raises(fxfeat.WeightsUnavailableError, match=r"1 of another shape \(proj: \(3, 3\) in the checkpoint"):
        build_model("open_clip:ViT-S-32", weights=str(tmp_path / "wrong_shape.pt"))
    (tmp_path / "not_a_checkpoint.pt").write_bytes(b"plain text")
    with pytest.raises(fxfeat.WeightsUnavailableError, match="cannot read the checkpoint"):
        build_model("open_clip:ViT-S-32", weights=str(tmp_path / "not_a_checkpoint.pt"))


def _dual_encoder(kind: str, path) -> torch.nn.Module:
    """A small random-weight dual encoder saved with its image processor, as from_pretrained finds one."""
    torch.manual_seed(0)
    if kind == "clip":
        config = transformers.CLIPConfig(vision_config=TOWER, text_config=TEXT, projection_dim=24)
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    else:
        config = transformers.SiglipConfig(vision_config=TOWER, text_config=TEXT)
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    model = transformers.AutoModel.from_config(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_image_side_of_a_dual_encoder_is_its_unnormalised_image_embeds(kind, tmp_path):
    whole = _dual_encoder(kind, tmp_path / kind)
    side = build_model(f"hf:{tmp_path / kind}", weights="pretrained")
    assert isinstance(side, ImageSide) and is_dual_encoder(whole)
    assert side.projection == (("visual_projection",) if kind == "clip" else ())
    assert not any(name.startswith("text") for name in side.state_dict())
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = side(pixels)
        features = whole.get_image_features(pixel_values=pixels)
        tower = whole.vision_model(pixel_values=pixels)
        both = whole(pixel_values=pixels, input_ids=torch.tensor([[0, 5, 7, 2]]))
    assert torch.equal(ours["image_embeds"], features.pooler_output)  # transformers 5: the projected vector here
    assert torch.equal(ours["pooler_output"], tower.pooler_output)
    assert torch.equal(ours["last_hidden_state"], tower.last_hidden_state)
    # forward L2-normalises image_embeds; the image side keeps the vector before that
    torch.testing.assert_close(torch.nn.functional.normalize(ours["image_embeds"], dim=-1), both.image_embeds)
    assert not torch.allclose(ours["image_embeds"], both.image_embeds)
    extractor = fxfeat.compile(side, mode="features")
    pooled = fxfeat.compile(side, mode="pooled")
    with torch.no_grad():
        levels = extractor.eval()(pixels)
        assert [tuple(level.shape) for level in levels][-1] == (3, 32, 4, 4)
        assert torch.equal(pooled.eval()(pixels), ours["pooler_output"])  # the projection's input


def test_a_whole_dual_encoder_checkpoint_loads_into_the_image_side(tmp_path):
    whole = _dual_encoder("clip", tmp_path / "clip")
    with torch.no_grad():
        for parameter in whole.parameters():
            parameter.add_(0.5)
    torch.save(whole.state_dict(), tmp_path / "whole.pt")  # text tower, logit_scale and all
    side = build_model(f"hf:{tmp_path / 'clip'}", weights=str(tmp_path / "whole.pt"))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(side(pixels)["image_embeds"], whole.get_image_features(pixel_values=pixels).pooler_output)
    text_only = {key: value for key, value in whole.state_dict().items() if not key.startswith("vision_model")}
    torch.save(text_only, tmp_path / "text_only.pt")
    with pytest.raises(fxfeat.WeightsUnavailableError, match="(?s)missing keys .*vision_model"):
        build_model(f"hf:{tmp_path / 'clip'}", weights=str(tmp_path / "text_only.pt"))


def test_models_that_are_not_dual_encoders_and_one_that_cannot_be_split(tmp_path):
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**TOWER)).save_pretrained(tmp_path / "vit")
    assert type(build_model(f"hf:{tmp_path / 'vit'}")).__name__ == "ViTModel"
    config = transformers.Siglip2Config(vision_config=dict(TOWER, num_patches=16), text_config=TEXT)
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path / "siglip2")  # takes patches, not images
    with pytest.raises(fxfeat.InvalidModelError, match="does not run on an image batch"):
        build_model(f"hf:{tmp_path / 'siglip2'}")


def test_timm_names_with_a_pretrained_tag():
    # timm's NAME.TAG (the form its hub and docs use: vit_small_patch14_dinov2.lvd142m) builds the tag's model, with
    # the tag's config (a CLIP tower's 512-way projection head); a misspelt tag gets the tags there are.
    model = build_model("timm:vit_base_patch32_clip_224.openai", depth=1)
    assert model.pretrained_cfg["tag"] == "openai" and model.num_classes == 512
    with pytest.raises(fxfeat.InvalidModelError, match="no pretrained tag named") as error:
        build_model("timm:vit_base_patch32_clip_224.opnai")
    assert "vit_base_patch32_clip_224.openai" in str(error.value) and "timm.list_pretrained" in str(error.value)
    with pytest.raises(fxfeat.InvalidModelError, match="no model named 'vit_base_patch32_clp_224'"):
        build_model("timm:vit_base_patch32_clp_224.openai")
