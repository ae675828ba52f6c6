"""The text tower saved for fast search start-up: it encodes as the model does, only for its own
model, and a search that finds it never imports open_clip or torchvision."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from clip_assets.model.clip_model import model_identity
from clip_assets.search.text_query_encoder import encoder_path, load_text_query_encoder, save_text_query_encoder

TEXTS = ["a red circle", "A BLUE Triangle!", "naïve café résumé", " ".join(["a long query"] * 40), "x"]

SEARCH_IN_A_FRESH_PROCESS = """
import json, sys
from clip_assets.cli import main
code = main(["search", "a green star", "-k", "5", "--json"])
print(json.dumps({"code": code, "imported": sorted(m for m in ("open_clip", "torchvision") if m in sys.modules)}),
      file=sys.stderr)
"""


def test_the_saved_text_tower_encodes_as_the_model_does(clip, tmp_path):
    path = save_text_query_encoder(clip, tmp_path)
    assert path is not None and path.is_file()
    saved = load_text_query_encoder(tmp_path, clip.identity)
    np.testing.assert_allclose(saved.encode_texts(TEXTS).numpy(), clip.encode_texts(TEXTS).numpy(), atol=1e-5)


def test_a_saved_text_tower_serves_only_the_model_it_was_traced_from(clip, other_checkpoint, tmp_path):
    save_text_query_encoder(clip, tmp_path)
    other = model_identity(clip.identity.split("/")[0], str(other_checkpoint))
    assert other != clip.identity
    assert load_text_query_encoder(tmp_path, other) is None  # nothing saved under the other name
    shutil.copy(encoder_path(tmp_path, clip.identity), encoder_path(tmp_path, other))
    assert load_text_query_encoder(tmp_path, other) is None  # a file whose note names other weights


def search_in_a_fresh_process(settings) -> tuple[list[dict], list[str]]:
    env = dict(os.environ)
    env.update({
        "CLIP_ASSETS_IMAGE_ROOT": str(settings.image_root), "CLIP_ASSETS_DATA_DIR": str(settings.data_dir),
        "CLIP_ASSETS_PROMPTS_DIR": str(settings.prompts_dir), "CLIP_ASSETS_MODEL": settings.model,
        "CLIP_ASSETS_PRETRAINED": str(settings.pretrained), "CLIP_ASSETS_DEVICE": "cpu",
    })
    done = subprocess.run([sys.executable, "-c", SEARCH_IN_A_FRESH_PROCESS], env=env, capture_output=True,
                          text=True, timeout=300)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()], report["imported"]


def test_the_second_text_search_finds_the_same_images_without_importing_open_clip(settings, classified):
    first, imported_first = search_in_a_fresh_process(settings)
    assert imported_first == ["open_clip", "torchvision"]  # the model loaded, and its text tower was saved
    assert list(classified.text_query_encoder_dir.glob("*.pt"))
    second, imported_second = search_in_a_fresh_process(settings)
    assert imported_second == []
    assert [hit["image_id"] for hit in second] == [hit["image_id"] for hit in first]
    np.testing.assert_allclose([h["score"] for h in second], [h["score"] for h in first], atol=1e-5)
