"""The CLIP_ASSETS_* variables a user's shell would set for a Settings, for the command line and subprocesses."""

from __future__ import annotations

from clip_assets.config.settings import Settings


def settings_environment(settings: Settings) -> dict[str, str]:
    """The variables that point the command line (or the code location) at `settings`'s collection and model."""
    return {
        "CLIP_ASSETS_IMAGE_ROOT": str(settings.image_root),
        "CLIP_ASSETS_DATA_DIR": str(settings.data_dir),
        "CLIP_ASSETS_PROMPTS_DIR": str(settings.prompts_dir),
        "CLIP_ASSETS_MODEL": settings.model,
        "CLIP_ASSETS_PRETRAINED": str(settings.pretrained),
        "CLIP_ASSETS_DEVICE": settings.device or "cpu",
    }
