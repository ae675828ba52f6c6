"""Loading the code location imports neither torch nor open_clip (clip_assets.defs): the code server, the
daemon and every sensor tick hold only what Dagster needs, and a step imports the model when it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from clip_assets.config.settings import REPO_ROOT

HEAVY = ("torch", "open_clip", "torchvision", "faiss")

# What `dagster dev`'s code server does with workspace.yaml: import the module, then resolve everything
# it sends to the webserver and the daemon. The fine-tuning variant (more assets, the opt-in) as well.
LOAD = f"""
import json, sys
import clip_assets.definitions as location
from clip_assets.config.settings import Settings

location.defs.get_repository_def().get_all_jobs()
tuned = Settings(fine_tune_captions=sys.argv[1], use_fine_tuned=True, data_dir=sys.argv[2])
location.build_definitions(tuned).get_repository_def().get_all_jobs()
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""


def test_loading_the_code_location_imports_no_torch_or_open_clip(tmp_path):
    env = {**os.environ, "CLIP_ASSETS_DATA_DIR": str(tmp_path / "data"), "CLIP_ASSETS_IMAGE_ROOT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(tmp_path / "captions.csv"), str(tmp_path / "data")],
        check=False,
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
