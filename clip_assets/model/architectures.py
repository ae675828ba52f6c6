"""Where open_clip architecture configs are found (this project's, CLIP_ASSETS_MODEL_CONFIG_DIR's, open_clip's
own), read without importing torch or open_clip: the code location configures them at load, and only a step
that loads a model imports either (clip_assets.model.clip_model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

# Extra architecture configs (CLIP_ASSETS_MODEL_CONFIG_DIR), set once by the process's edge
# (clip_assets.process.configure_process), never read from the environment here.
extra_config_dir: Path | None = None


def configure_model_config_dir(folder: Path | None) -> None:
    """Where extra open_clip architecture JSON configs are: registered when a model is loaded (no import now)."""
    global extra_config_dir
    extra_config_dir = Path(folder) if folder else None


def config_dirs() -> list[Path]:
    """Where an architecture's JSON config may be: CLIP_ASSETS_MODEL_CONFIG_DIR, ours, open_clip's own."""
    extra = extra_config_dir
    spec = importlib.util.find_spec("open_clip")  # finds the package without importing it
    builtin = [Path(spec.origin).parent / "model_configs"] if spec and spec.origin else []
    return ([Path(extra)] if extra else []) + [MODEL_CONFIG_DIR] + builtin


def has_timm_tower(model_name: str) -> bool | None:
    """Whether the architecture's image tower comes from timm; None when its config is not on disk
    (an hf-hub: id, an unknown name)."""
    for folder in config_dirs():
        config = folder / f"{model_name}.json"
        if config.is_file():
            return "timm_model_name" in json.loads(config.read_text()).get("vision_cfg", {})
    return None
