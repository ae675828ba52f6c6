import json
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clip_assets.model.clip_model import WeightsUnavailableError, load_clip_model, model_identity
from clip_assets_tests.support.models import TINY, save_random_checkpoint


def test_missing_checkpoint_file_says_how_to_fix(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="Checkpoint file not found.*CLIP_ASSETS_PRETRAINED"):
        load_clip_model(TINY, str(tmp_path / "nope.pt"), "cpu")


def test_unknown_tag_lists_what_was_tried_and_never_falls_back():
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip_model("ViT-B-32", "no_such_tag", "cpu")
    text = str(info.value)
    assert "no_such_tag" in text and "never falls back to random weights" in text
    assert "CLIP_ASSETS_PRETRAINED=/path/to/" in text and "laion2b_s34b_b79k" in text


def test_known_tag_without_hub_access_fails_clearly(monkeypatch, tmp_path):
    import huggingface_hub.constants

    # Offline mode is read when huggingface_hub is imported, so patch the constant itself: the hub
    # is then never asked (without it, this machine's closed network gives the same error after retries).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(WeightsUnavailableError, match="(?s)open_clip pretrained tag 'laion2b_s34b_b79k'.*local checkpoint"):
        load_clip_model("ViT-B-32", "laion2b_s34b_b79k", "cpu")


def test_unknown_architecture_is_named():
    with pytest.raises(WeightsUnavailableError, match="Unknown open_clip architecture 'ViT-Nope'"):
        load_clip_model("ViT-Nope", "whatever", "cpu")


def test_checkpoint_weights_are_the_ones_loaded(clip, checkpoint):
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    for name, tensor in clip.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_identity_follows_the_checkpoint_content(tmp_path, checkpoint):
    ident = model_identity(TINY, str(checkpoint))
    assert ident.startswith(f"{TINY}/file:{checkpoint.name}@")
    copy = tmp_path / checkpoint.name
    copy.write_bytes(checkpoint.read_bytes())
    assert model_identity(TINY, str(copy)) == ident
    save_random_checkpoint(copy, seed=5)
    assert model_identity(TINY, str(copy)) != ident
    assert model_identity("ViT-B-32", "openai") == "ViT-B-32/openai"


def test_preprocessing_is_the_models_own(clip):
    # clip-assets-tiny takes 64 px input: a 4:3 image is resized on its short side and centre-cropped.
    pixels = clip.preprocess(Image.new("RGB", (400, 300), (255, 0, 0)))
    assert pixels.shape == (3, 64, 64)


def test_embeddings_are_unit_norm(clip):
    texts = clip.encode_texts(["a red circle", "a blue star", "a picture"])
    images = clip.encode_image_tensors(torch.rand(3, 3, 64, 64))
    assert texts.shape == (3, clip.embed_dim) == images.shape
    np.testing.assert_allclose(texts.norm(dim=-1).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(images.norm(dim=-1).numpy(), 1.0, atol=1e-5)


def test_the_search_commands_skip_timm_for_an_architecture_without_it(tmp_path, checkpoint):
    # A timm architecture, and a checkpoint of it made here (where open_clip has timm).
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny-timm.json").write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "test_resnet", "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "linear", "image_size": 64},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(configs)
    torch.save({"state_dict": open_clip.create_model("tiny-timm").state_dict()}, tmp_path / "timm.pt")
    # A fresh interpreter, started as the search command starts: the tiny architecture loads without
    # timm; a timm architecture loaded after it in the same process still works.
    script = f"""
import sys
import torch
from clip_assets.model.architectures import configure_model_config_dir, has_timm_tower
from clip_assets.model.clip_model import import_open_clip, load_clip_model

configure_model_config_dir({str(configs)!r})  # what the CLI and the code location do with CLIP_ASSETS_MODEL_CONFIG_DIR
assert has_timm_tower({TINY!r}) is False and has_timm_tower("tiny-timm") is True
import_open_clip({TINY!r}, skip_unused_timm=True)
clip = load_clip_model({TINY!r}, {str(checkpoint)!r}, "cpu")
assert "timm" not in sys.modules, "timm was imported for an architecture without a timm tower"
assert clip.encode_texts(["a red circle"]).shape == (1, clip.embed_dim)
timm_clip = load_clip_model("tiny-timm", {str(tmp_path / "timm.pt")!r}, "cpu")
assert "timm" in sys.modules
assert timm_clip.encode_image_tensors(torch.rand(1, 3, 64, 64)).shape == (1, 32)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
