"""Loading an OpenCLIP model with its own preprocessing and tokenizer, and naming it.

Weights come from an open_clip pretrained tag, an `hf-hub:` id, or a local checkpoint file. When
they cannot be had, loading fails with `WeightsUnavailableError`, which says what was tried and how
to point at a local checkpoint: never a silent fallback to random weights.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
HF_HUB_PREFIX = "hf-hub:"


class WeightsUnavailableError(RuntimeError):
    """The requested weights could not be loaded (no network, unknown tag, missing file)."""


@dataclass(frozen=True)
class ClipModel:
    """A loaded model together with everything that must travel with it."""

    model: torch.nn.Module
    preprocess: Callable  # the model's own eval transform: PIL image -> tensor
    tokenizer: Callable  # list[str] -> LongTensor
    identity: str  # stored with every row this model produces
    device: torch.device
    embed_dim: int
    logit_scale: float  # the learned temperature: softmax(logit_scale * cosine) for zero-shot
    input_size: tuple[int, int] | None = None  # (width, height) the model's preprocessing produces

    def autocast(self):
        """Mixed precision on GPU, plain float32 on CPU."""
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        if self.device.type == "mps":
            return torch.autocast("mps", dtype=torch.float16)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised float32 text embeddings, on the CPU."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
            with self.autocast():
                feats = self.model.encode_text(tokens)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.inference_mode()
    def encode_image_tensors(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings of preprocessed pixels, on the CPU."""
        pixels = pixels.to(self.device, non_blocking=True)
        with self.autocast():
            feats = self.model.encode_image(pixels)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()


def register_model_configs(config_dir: Path | None = None) -> None:
    """Make this project's architectures (and any under CLIP_ASSETS_MODEL_CONFIG_DIR) known to open_clip."""
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    extra = config_dir or os.environ.get("CLIP_ASSETS_MODEL_CONFIG_DIR")
    if extra:
        open_clip.add_model_config(Path(extra))


def pick_device(override: str | None = None) -> torch.device:
    """cuda, then mps, else cpu, unless the user named one."""
    if override:
        return torch.device(override)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def model_identity(model_name: str, pretrained: str) -> str:
    """A name for the weights that changes whenever the weights do.

    Tags and hub ids name their weights already; a local checkpoint is named by its content hash, so
    retraining a checkpoint in place is a different model.
    """
    if pretrained.startswith(HF_HUB_PREFIX):
        return pretrained
    path = Path(pretrained).expanduser()
    if path.is_file():
        st = path.stat()
        return f"{model_name}/file:{path.name}@{_file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)}"
    return f"{model_name}/{pretrained}"


def _input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    size = getattr(getattr(model, "visual", None), "preprocess_cfg", {}).get("size")
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[1]), int(size[0]))  # preprocess sizes are (height, width)


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def load_clip_model(model_name: str, pretrained: str, device: str | None = None) -> ClipModel:
    """Load model, preprocessing and tokenizer, or fail saying how to point at local weights."""
    register_model_configs()
    if not pretrained:
        raise WeightsUnavailableError(
            f"No weights named for model '{model_name}'. Set CLIP_ASSETS_PRETRAINED to an open_clip "
            "pretrained tag, an hf-hub: id, or the path of a local checkpoint file."
        )
    torch_device = pick_device(device)
    if pretrained.startswith(HF_HUB_PREFIX):
        name_for_open_clip, pretrained_arg, what = pretrained, None, f"the Hugging Face hub repo '{pretrained}'"
    else:
        name_for_open_clip, pretrained_arg = model_name, pretrained
        if _looks_like_path(pretrained) or Path(pretrained).expanduser().exists():
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise WeightsUnavailableError(
                    f"Checkpoint file not found: {path} (CLIP_ASSETS_PRETRAINED). Point it at an "
                    "existing open_clip checkpoint (.pt/.bin/.safetensors) for architecture "
                    f"'{model_name}'."
                )
            pretrained_arg = str(path)
            what = f"the local checkpoint {path}"
        else:
            what = f"open_clip pretrained tag '{pretrained}' for '{model_name}'"
    if model_name not in open_clip.list_models() and not pretrained.startswith(HF_HUB_PREFIX):
        raise WeightsUnavailableError(
            f"Unknown open_clip architecture '{model_name}' (CLIP_ASSETS_MODEL). Known ones include "
            f"{', '.join(open_clip.list_models()[:8])}, ...; a custom architecture needs its JSON config "
            "in CLIP_ASSETS_MODEL_CONFIG_DIR."
        )
    try:
        model, preprocess = open_clip.create_model_from_pretrained(
            name_for_open_clip, pretrained=pretrained_arg, device=torch_device
        )
    except Exception as exc:  # open_clip raises RuntimeError, OSError, hub errors...
        tags = open_clip.list_pretrained_tags_by_model(model_name) if model_name in open_clip.list_models() else []
        raise WeightsUnavailableError(
            f"Could not load weights from {what}: {exc}\n"
            "No model was loaded: this pipeline never falls back to random weights.\n"
            "To use a local checkpoint instead (for a machine without access to the model hub): "
            "download it where the hub is reachable, copy it here, and set "
            "CLIP_ASSETS_PRETRAINED=/path/to/open_clip_model.safetensors with CLIP_ASSETS_MODEL naming "
            "its architecture; or pre-fill the Hugging Face cache (HF_HOME) of this machine."
            + (f"\nKnown pretrained tags for {model_name}: {', '.join(tags)}" if tags else "")
        ) from exc
    model.eval()
    tokenizer = open_clip.get_tokenizer(name_for_open_clip)
    with torch.inference_mode():
        embed_dim = int(model.encode_text(tokenizer(["a photo"]).to(torch_device)).shape[-1])
    return ClipModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        identity=model_identity(model_name, pretrained),
        device=torch_device,
        embed_dim=embed_dim,
        input_size=_input_size(model),
        logit_scale=float(model.logit_scale.detach().exp()) if getattr(model, "logit_scale", None) is not None else 100.0,
    )
