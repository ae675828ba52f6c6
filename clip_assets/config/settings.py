"""Settings: every `CLIP_ASSETS_*` environment variable, its type, its default and its meaning.

This is the only module that reads the environment. `Settings.from_env()` reads it (the Dagster code
location, the CLI); `Settings(...)` takes only the values it is given and the defaults below (the
demo, the tests). The configuration table in docs/configuration.md is generated from this class
(`python -m clip_assets.config.settings`) and a test keeps the two equal.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]

ENV_PREFIX = "CLIP_ASSETS_"


class SettingsError(ValueError):
    """An environment variable holds a value the pipeline cannot use; the message names it."""


class Settings(BaseSettings):
    """What the pipeline needs to know about its surroundings."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", validate_by_name=True
    )

    image_root: Path | str = Field(
        default=REPO_ROOT / "images",
        description="folder whose direct sub-folders are the batches, or an object-store URL (`s3://bucket/prefix`) "
        "whose direct \"folders\" are: see [Images in a bucket](operations.md#images-in-a-bucket)",
    )
    data_dir: Path | str = Field(
        default=REPO_ROOT / "data", description="where the parquet files and `clip_assets.duckdb` go (git-ignored), "
        "or an object-store URL (`s3://bucket/prefix`) that every output but the DuckDB file and the review labels is "
        "kept in: see [The data directory in a bucket](object_storage.md)",
    )
    cache_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "clip-assets-cache", description="machine-local folder of the working "
        "copies of data directories kept in an object store (one folder per URL)",
    )
    store_recheck_s: float = Field(
        default=2.0, ge=0, description="a file of a data directory in an object store that this process looked at "
        "(or wrote) this many seconds ago is read without asking the store again",
    )
    prompts_dir: Path = Field(default=REPO_ROOT / "prompts", description="folder of prompt files (`*.toml`)")
    model: str = Field(default="ViT-B-32", description="open_clip architecture name")
    pretrained: str = Field(
        default="laion2b_s34b_b79k",
        description="open_clip pretrained tag, `hf-hub:org/repo`, or a checkpoint path",
    )
    model_config_dir: Path | None = Field(
        default=None, description="extra open_clip architecture JSON configs to register"
    )
    device: str | None = Field(default=None, description="torch device; unset: `cuda`, then `mps`, else `cpu`")
    batch_size: int = Field(default=0, ge=0, description="images per forward pass; `0`: from free GPU memory (64 off CUDA)")
    num_workers: int = Field(
        default=-1, ge=-1, description="image decode worker processes; `-1`: min(16, cores), `0`: none"
    )
    file_timeout_s: float = Field(default=60.0, gt=0, description="longest one file may take to read and decode")
    chunk_rows: int = Field(
        default=4096, ge=1, description="images per part file of an embedding run: the most a killed run re-encodes"
    )
    flush_interval_s: float = Field(
        default=60.0, gt=0, description="seconds of encoding after which finished rows are written even short of "
        "a chunk: the most work a killed run loses, whatever the model's speed"
    )
    max_failure_share: float = Field(
        default=0.05, ge=0, le=1, description="share of unusable files above which a batch's check warns"
    )
    labels_path: Path | None = Field(
        default=None,
        validation_alias=f"{ENV_PREFIX}LABELS",
        description="labelled sample (CSV or parquet) for `image_evaluation`, `threshold_calibration` and `category_adapters`",
    )
    adapter_shots: int = Field(
        default=0, ge=0,
        description="`category_adapters` learn from at most this many labelled images per category of the tuning half; `0`: all",
    )
    fine_tune_captions: Path | None = Field(
        default=None,
        description="captions file (`path`,`caption`) that `fine_tuned_model` tunes the model on; unset: no "
        "fine-tuning in the pipeline",
    )
    use_fine_tuned: bool = Field(
        default=False,
        description="`image_embeddings` and `prompt_centroids` use `fine_tuned_model`'s checkpoint instead of "
        "`CLIP_ASSETS_PRETRAINED` (needs `CLIP_ASSETS_FINE_TUNE_CAPTIONS`): a new checkpoint re-embeds every batch",
    )
    fine_tune_epochs: int = Field(default=5, ge=1, description="passes of `fine_tuned_model` over the training pairs")
    fine_tune_lr: float | None = Field(
        default=None, gt=0, description="peak learning rate of `fine_tuned_model`; unset: `1e-4` with the image tower "
        "locked, else `1e-5`",
    )
    fine_tune_lock_image: bool = Field(
        default=False, description="`fine_tuned_model` locks the image tower and tunes the text side only (LiT)"
    )
    fine_tune_wise_alpha: float | None = Field(
        default=None, gt=0, le=1, description="share of the tuned weights in `fine_tuned_model`'s checkpoint, the rest "
        "the base model's (WiSE-FT): less forgetting of what the base model knew; `1`: the tuned weights alone; unset "
        "or `auto`: the one of 0.25, 0.5, 0.75, 1 that does best on a validation split of the "
        "training images",
    )
    warehouse: Literal["duckdb", "parquet"] = Field(
        default="duckdb",
        description="where prompt centroids, classifications and near-duplicate groups are stored: `duckdb` (one "
        "file, `clip_assets.duckdb`, one writer at a time: one machine), `parquet` (a parquet file per batch under "
        "`warehouse/`, read through DuckDB views: writers on several machines at once); see "
        "[Writers on several machines](operations.md#writers-on-several-machines)",
    )
    duckdb_wait_s: float = Field(
        default=120.0,
        ge=0,
        description="longest a DuckDB reader or writer waits for another process's lock before it fails",
    )
    rescan_cron: str = Field(
        default="0 * * * *", description="when the `rescan_image_batches` schedule looks for changed batches"
    )
    content_check_cron: str = Field(
        default="*/15 * * * *",
        description="when the `content_check` schedule (stopped until you start it) re-hashes files whose size and "
        "mtime did not change, to find content replaced under them",
    )
    content_check_budget_s: float = Field(
        default=20.0, gt=0,
        description="the most seconds one `content_check` tick reads files for; the next tick goes on from there",
    )
    sensor_interval_s: int | None = Field(
        default=None, ge=1, description="the fewest seconds between two ticks of every sensor of the code location "
        "(the discovery of new batches, the observation of the prompt, labels and captions files, the automation "
        "that re-runs what they feed); unset: each sensor's own, 30 s",
    )
    decode: Literal["auto", "pillow", "tensor"] = Field(
        default="auto",
        description="`pillow` (CPU workers decode), `tensor` (JPEGs batch-decoded on the model's device), "
        "`auto` (tensor on CUDA where it measures faster): see [On a GPU](performance.md#on-a-gpu)",
    )
    precision: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        default="auto",
        description="how the image tower computes: `auto` (float32 on the CPU, bfloat16 or float16 autocast on "
        "CUDA), `float32`, `bfloat16` (autocast), `int8` (CPU only: the Linear layers of its MLP blocks and "
        "attention projections dynamically quantised; faster, but some decisions change, see "
        "[Encoding speed on the CPU](performance.md#encoding-speed-on-the-cpu)). Recorded with every "
        "embedding; a batch's rows of another precision are encoded again",
    )
    channels_last: bool = Field(default=False, description="feed the image tower `channels_last` tensors")
    compile_model: bool = Field(
        default=False, validation_alias=f"{ENV_PREFIX}COMPILE", description="`torch.compile` the image tower"
    )
    gpu_lock_dir: Path = Field(default=Path(tempfile.gettempdir()) / "clip-assets-gpu-locks", description="machine-local folder of the per-GPU claim locks")
    k8s_max_concurrent_steps: int = Field(
        default=8, ge=1, description="steps of one run at once on Kubernetes (`clip_assets.definitions_k8s`)"
    )
    exact_search_below: int = Field(
        default=2_000_000, ge=0,
        description="search scores every stored embedding (no index) while the batches searched hold fewer than this",
    )
    ann_nprobe: int = Field(default=128, ge=1, description="inverted lists of the index codec a search probes")
    duplicate_threshold: float = Field(
        default=0.95, gt=0, le=1, description="cosine similarity at or above which two images are look-alikes "
        "(similar pictures, the near-duplicate groups' last tier, not shown unless asked for)",
    )
    copy_threshold: float | None = Field(
        default=None, gt=0, le=1, description="cosine similarity at or above which two images whose perceptual "
        "hashes agree are copies of one picture (re-encoded, resized, slightly cropped or recoloured); unset: learnt "
        "for the model from the collection's own images by the `copy_threshold` asset",
    )
    copy_precision: float = Field(
        default=0.99, gt=0, lt=1, description="the precision the learnt copy threshold keeps on copies made of a "
        "sample of the collection's images, against each image's nearest other images",
    )
    copy_hash_distance: int = Field(
        default=16, ge=0, le=64, description="the most bits (of 64) in which the perceptual hashes of two copies "
        "may differ; two different pictures differ in about 32",
    )

    @field_validator("image_root", "data_dir", mode="before")
    @classmethod
    def _path_or_store_url(cls, value: Any) -> Any:
        """A plain path or file:// URL is a local folder (a Path); any other URL is kept as text, once its
        store's package is known to be installed."""
        from clip_assets.storage.store_urls import path_or_store_url

        return path_or_store_url(value)

    @field_validator("fine_tune_wise_alpha", mode="before")
    @classmethod
    def _auto_wise_alpha(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() == "auto" else value

    @field_validator("use_fine_tuned")
    @classmethod
    def _fine_tuned_needs_captions(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("fine_tune_captions") is None:
            raise ValueError(f"there is no fine-tuned model without captions: set {ENV_PREFIX}FINE_TUNE_CAPTIONS too")
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Settings(...) takes only what it is given; the environment is read through from_env only.
        return (init_settings, env_settings) if settings_cls.reads_environment else (init_settings,)

    reads_environment: ClassVar[bool] = False

    @classmethod
    def from_env(cls) -> Settings:
        """The settings this process's `CLIP_ASSETS_*` variables give, read by pydantic-settings' own
        environment source (an empty value leaves the setting at its default)."""
        try:
            found = _FromEnvironment()
        except ValidationError as exc:
            problems = "; ".join(
                f"{env_var(str(e['loc'][0]))}={e.get('input')!r}: {e['msg']}" for e in exc.errors()
            )
            raise SettingsError(f"Invalid setting: {problems}. See the configuration table in docs/configuration.md.") from None
        return cls(**{name: getattr(found, name) for name in cls.model_fields})


class _FromEnvironment(Settings):
    """Settings that also read the environment: what from_env reads through."""

    reads_environment: ClassVar[bool] = True


def env_var(field_name: str) -> str:
    """The environment variable of a settings field (or of its alias)."""
    if field_name.startswith(ENV_PREFIX):
        return field_name
    field = Settings.model_fields[field_name]
    return field.validation_alias if isinstance(field.validation_alias, str) else ENV_PREFIX + field_name.upper()


def default(field_name: str) -> Any:
    """A setting's default, for functions whose parameters default to it."""
    return Settings.model_fields[field_name].default


def _shown_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, Path) and value.is_relative_to(REPO_ROOT):
        return f"`./{value.relative_to(REPO_ROOT).as_posix()}`"
    if isinstance(value, Path) and value.is_relative_to(tempfile.gettempdir()):  # differs between machines
        return f"`<temp dir>/{value.relative_to(tempfile.gettempdir()).as_posix()}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    return f"`{value}`"


def configuration_table() -> str:
    """The configuration table of docs/configuration.md (Markdown), one row per variable, from the fields above."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    lines += [
        f"| `{env_var(name)}` | {_shown_default(field.default)} | {field.description} |"
        for name, field in Settings.model_fields.items()
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(configuration_table())
