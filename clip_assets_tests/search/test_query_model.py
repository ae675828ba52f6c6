"""The model the app holds (clip_assets.search.query.QueryModel): the text tower alone until an image
query needs the image tower; it answers as the whole model does. Real tiny model, real embeddings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from clip_assets.search.query import QueryModel, search
from clip_assets_tests.support.shell_environment import settings_environment

TEXTS = ["a red circle", "A BLUE Triangle!", "a green star"]

# The app as `clip-assets serve` opens it, in a fresh process: what it imported once ready, then once an
# image was uploaded (the image tower's first query).
OPEN_THE_APP = """
import json, sys
from PIL import Image
from clip_assets.app.app import open_app
from clip_assets.config.settings import Settings
from clip_assets.search.query import search

sock, app = open_app(Settings.from_env(), "127.0.0.1", 0)
model = app.state.clip_assets.clip
heavy = lambda: sorted(m for m in ("open_clip", "torchvision") if m in sys.modules)
ready = {"imported": heavy(), "image_tower": model.image_tower_loaded}
search(Settings.from_env(), text="a red circle", k=3, clip=model)
texted = {"imported": heavy(), "image_tower": model.image_tower_loaded}
search(Settings.from_env(), image=Image.new("RGB", (64, 64), "red"), k=3, clip=model)
print(json.dumps([ready, texted, {"imported": heavy(), "image_tower": model.image_tower_loaded}]))
sock.close()
"""


def test_the_query_model_answers_as_the_whole_model_and_loads_the_image_tower_when_asked(settings, classified, clip):
    model = QueryModel(settings, clip.identity)  # no tower saved yet: the model loads, saves it, and goes
    assert list(classified.text_query_encoder_dir.glob("*.pt")) and not model.image_tower_loaded
    np.testing.assert_allclose(model.encode_texts(TEXTS).numpy(), clip.encode_texts(TEXTS).numpy(), atol=1e-5)
    assert search(settings, text="a red circle", k=5, clip=model) == search(
        settings, text="a red circle", k=5, clip=clip
    )
    assert not model.image_tower_loaded
    image = settings.image_root / "batch-001" / "img-0001.jpg"
    assert search(settings, image=image, k=5, clip=model) == search(settings, image=image, k=5, clip=clip)
    assert model.image_tower_loaded


def test_the_app_holds_the_text_tower_only_until_an_image_is_uploaded(settings, classified, clip):
    QueryModel(settings, clip.identity)  # a first search saved the text tower
    env = {**os.environ, **settings_environment(settings)}
    done = subprocess.run(
        [sys.executable, "-c", OPEN_THE_APP], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    ready, texted, imaged = json.loads(done.stdout.strip().splitlines()[-1])
    assert ready == texted == {"imported": [], "image_tower": False}
    assert imaged == {"imported": ["open_clip", "torchvision"], "image_tower": True}
