"""How the embedding engine encodes a batch: one typed object, built once from the settings and passed down."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from clip_assets.config.settings import Settings, default


@dataclass(frozen=True)
class EncodeOptions:
    """The encoding settings (their meaning: clip_assets.config.settings). Each default is the setting's."""

    batch_size: int = default("batch_size")  # images per forward pass; 0: from free GPU memory (64 off CUDA)
    num_workers: int = default("num_workers")  # decode worker processes; -1: min(16, cores), 0: none
    file_timeout_s: float | None = default("file_timeout_s")  # longest one file may take to read and decode
    chunk_rows: int = default("chunk_rows")  # images per part file: the most a killed run re-encodes
    flush_interval_s: float = default("flush_interval_s")  # ... or this many seconds of work, if sooner
    decode: Literal["auto", "pillow", "tensor"] = default("decode")  # who decodes: CPU workers or the model's device

    @classmethod
    def from_settings(cls, settings: Settings | object) -> "EncodeOptions":
        """The options `settings` holds under their own names: the Settings, or the model resource built
        from them (clip_assets.defs.resources.ClipModelResource)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})
