"""Settings read from the environment: where images are, where outputs go, which model encodes.

Every entry point (the Dagster code location, the demo, the tests) builds a `Settings` here, so the
environment variables documented in the README are read in one place only.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"


class Settings(BaseModel):
    """What the pipeline needs to know about its surroundings."""

    image_root: Path = Field(description="Folder whose direct sub-folders are the image batches.")
    data_dir: Path = Field(description="Where the per-batch parquet files and the DuckDB file live.")
    prompts_dir: Path = Field(description="Folder of prompt files (*.toml).")
    model: str = Field(description="open_clip architecture name, e.g. ViT-B-32.")
    pretrained: str = Field(
        description="open_clip pretrained tag, an hf-hub: id, or a path to a local checkpoint."
    )
    device: str | None = Field(default=None, description="torch device override (cuda, mps, cpu).")
    batch_size: int = Field(default=64, ge=1, description="Images per forward pass.")
    num_workers: int = Field(default=-1, description="Decode workers; -1 picks from the core count.")
    file_timeout_s: float = Field(default=60.0, gt=0, description="Longest a single file may take to read and decode.")
    max_failure_share: float = Field(
        default=0.05, ge=0, le=1, description="Share of unreadable images above which the batch check warns."
    )
    labels_path: Path | None = Field(
        default=None, description="Labelled sample (CSV or parquet) for evaluation and calibration."
    )
    rescan_cron: str = Field(default="0 * * * *", description="When the re-scan schedule looks for changed batches.")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        return cls(
            image_root=Path(env.get("CLIP_ASSETS_IMAGE_ROOT", str(REPO_ROOT / "images"))),
            data_dir=Path(env.get("CLIP_ASSETS_DATA_DIR", str(REPO_ROOT / "data"))),
            prompts_dir=Path(env.get("CLIP_ASSETS_PROMPTS_DIR", str(REPO_ROOT / "prompts"))),
            model=env.get("CLIP_ASSETS_MODEL", DEFAULT_MODEL),
            pretrained=env.get("CLIP_ASSETS_PRETRAINED", DEFAULT_PRETRAINED),
            device=env.get("CLIP_ASSETS_DEVICE") or None,
            batch_size=int(env.get("CLIP_ASSETS_BATCH_SIZE", "64")),
            num_workers=int(env.get("CLIP_ASSETS_NUM_WORKERS", "-1")),
            file_timeout_s=float(env.get("CLIP_ASSETS_FILE_TIMEOUT_S", "60")),
            max_failure_share=float(env.get("CLIP_ASSETS_MAX_FAILURE_SHARE", "0.05")),
            labels_path=Path(env["CLIP_ASSETS_LABELS"]) if env.get("CLIP_ASSETS_LABELS") else None,
            rescan_cron=env.get("CLIP_ASSETS_RESCAN_CRON", "0 * * * *"),
        )
