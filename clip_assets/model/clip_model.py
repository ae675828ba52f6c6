"""Loading an OpenCLIP model with its own preprocessing and tokenizer, and naming it.

Weights come from an open_clip pretrained tag, an `hf-hub:` id, or a local checkpoint file. When
they cannot be had, loading fails with `WeightsUnavailableError`, which says what was tried and how
to point at a local checkpoint: never a silent fallback to random weights.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from clip_assets.model import architectures
from clip_assets.model.architectures import MODEL_CONFIG_DIR, has_timm_tower
from clip_assets.model.fine_tuned_weights import check_fine_tuned_checkpoint
from clip_assets.model.quantizable_attention import swap_self_attention
from clip_assets.storage.file_hashes import current_content_digest

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
    channels_last: bool = False  # feed the image tower channels_last tensors (see tuned_for_inference)
    # How the image tower computes (see with_precision): "auto" as loaded is the device's own default,
    # autocast on CUDA and MPS and float32 on the CPU.
    precision: str = "auto"

    @property
    def computed_precision(self) -> str:
        """What the image tower computes in, by name (float32, bfloat16, float16 or int8): recorded with
        every embedding it makes, so a batch never mixes them unawares."""
        if self.precision in ("float32", "int8"):
            return self.precision
        if self.device.type == "cuda":
            return "bfloat16" if self.precision == "bfloat16" or torch.cuda.is_bf16_supported() else "float16"
        if self.device.type == "mps":
            return "float16"
        return "bfloat16" if self.precision == "bfloat16" else "float32"

    def autocast(self, precision: str | None = None):
        """Mixed precision on GPU (unless `float32` was asked for); on the CPU only for `bfloat16`.
        `precision`: the image tower's (None) or another, e.g. "auto" for the text tower."""
        precision = self.precision if precision is None else precision
        if self.device.type == "cuda" and precision != "float32":
            bf16 = precision == "bfloat16" or torch.cuda.is_bf16_supported()
            return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)
        if self.device.type == "mps" and precision != "float32":
            return torch.autocast("mps", dtype=torch.float16)
        if self.device.type == "cpu" and precision == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised float32 text embeddings, on the CPU."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start : start + batch_size]).to(self.device)
            with self.autocast("auto"):  # CLIP_ASSETS_PRECISION is the image tower's: text stays as loaded
                feats = self.model.encode_text(tokens)
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.inference_mode()
    def encode_image_tensors(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings of preprocessed pixels, on the CPU."""
        pixels = pixels.to(self.device, non_blocking=True)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            feats = self.model.encode_image(pixels)
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu()


def import_open_clip(model_name: str | None = None, skip_unused_timm: bool = False):
    """open_clip; with `skip_unused_timm`, imported without timm when `model_name` has no timm tower.

    open_clip imports timm as it is imported, though only timm image towers use it, and timm is
    about an eighth of a search command's start-up. Hidden during that import, timm looks not
    installed to open_clip, which works as usual for every other architecture. For processes that
    load one model (the search command, the search page): afterwards, only `load_clip_model` can
    load a timm architecture in that process (it makes the skipped import), not open_clip directly.
    """
    if (skip_unused_timm and model_name and "open_clip" not in sys.modules and "timm" not in sys.modules
            and has_timm_tower(model_name) is False):
        sys.modules["timm"] = None  # `import timm` raises ImportError while this is here
        try:
            import open_clip
        finally:
            del sys.modules["timm"]
    import open_clip  # deferred: open_clip and torchvision load only to build a model, never for a saved text tower

    if model_name and has_timm_tower(model_name) is not False and open_clip.timm_model.timm is None:
        if importlib.util.find_spec("timm") is not None:
            importlib.reload(open_clip.timm_model)  # same module namespace: TimmModel now sees timm
    return open_clip


DEFAULT_BATCH_SIZE = 64
AUTO_BATCH_RANGE = (16, 512)
# Share of the free GPU memory the forward passes may take; the rest is for decoding and copies.
AUTO_BATCH_MEMORY_SHARE = 0.5


def tuned_for_inference(clip: ClipModel, channels_last: bool = False, compile_model: bool = False,
                        precision: str | None = None) -> ClipModel:
    """The image tower at `precision` (see with_precision; None: as it is), with channels_last memory format and/or
    torch.compile (off unless asked for: `benchmarks/embed_throughput.py` measures whether they help)."""
    if precision is not None:
        clip = with_precision(clip, precision)
    if channels_last:
        clip.model.to(memory_format=torch.channels_last)
    if compile_model:
        clip.model.visual = torch.compile(clip.model.visual)
    return dataclasses.replace(clip, channels_last=channels_last)


# How the image tower computes (CLIP_ASSETS_PRECISION). The text tower always stays as loaded.
# On a 2-core avx512_bf16 CPU without AMX (benchmarks/embed_throughput.py, ViT-S-32, one thread):
# int8 dynamic quantisation of the Linear layers costs about 0.7x the float32 CPU time, bfloat16
# autocast about 1.9x; embeddings agree with float32 to cosine 0.999 or better (the tests hold 0.995).
PRECISIONS = ("auto", "float32", "bfloat16", "int8")


def resolved_precision(precision: str, device: torch.device) -> str:
    """What `auto` means on `device`: the device's own default, float32 on the CPU and autocast on CUDA
    and MPS. int8 is asked for by name (CLIP_ASSETS_PRECISION=int8) and exists on the CPU only: it
    changes decisions, so it is never chosen for a user (benchmarks/precision_agreement.py measures
    how many, on the demo's collection with a trained model)."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision '{precision}' (CLIP_ASSETS_PRECISION): one of {', '.join(PRECISIONS)}")
    if precision == "auto" and device.type == "cpu":
        return "float32"
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"CLIP_ASSETS_PRECISION=int8 runs on the CPU only, not on {device}: use auto or bfloat16")
    return precision


def with_precision(clip: ClipModel, precision: str) -> ClipModel:
    """`clip` computing its image tower at `precision` (see resolved_precision). int8 swaps the image
    tower's MLP Linear layers, and the projections of open_clip's self-attention blocks (see
    quantizable_attention), for dynamically quantised ones, in place; the others only choose autocast."""
    chosen = resolved_precision(precision, clip.device)
    if clip.precision == "int8" and chosen != "int8":
        raise ValueError(f"This model's image tower was quantised to int8 in place: load it again for {chosen}")
    if chosen == "int8" and clip.precision != "int8":
        layers = mlp_linear_layers(clip.model.visual)
        if layers:  # the attention projections too: the other third of a block's matrix work
            layers |= swap_self_attention(clip.model.visual)
        if not layers:
            raise ValueError("CLIP_ASSETS_PRECISION=int8: this image tower has no MLP Linear layers to quantise "
                             "(a ResNet tower); use auto or float32")
        with warnings.catch_warnings():  # torch.ao's eager quantisation announces its successor, torchao
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.ao.quantization.quantize_dynamic(clip.model.visual, layers, dtype=torch.qint8, inplace=True)
    return dataclasses.replace(clip, precision=chosen)


def mlp_linear_layers(tower: torch.nn.Module) -> set[str]:
    """The names of the Linear layers in a tower's MLP blocks (open_clip's and timm's transformers
    call them `mlp`): two thirds of a transformer block's matrix work, and only ever called. Other
    Linear layers may have their weights read directly (a ResNet's attention pooling, for one),
    which a quantised layer does not allow."""
    return {name for name, m in tower.named_modules() if type(m) is torch.nn.Linear and ".mlp." in f".{name}"}


_auto_batch_sizes: dict[tuple[str, str], int] = {}


def batch_size_for(clip: ClipModel, requested: int) -> int:
    """`requested`, or for 0 the largest power of two whose forward pass fits in half the free GPU
    memory (measured once per model and device), within AUTO_BATCH_RANGE; 64 off CUDA."""
    if requested > 0:
        return requested
    if clip.device.type != "cuda":
        return DEFAULT_BATCH_SIZE
    key = (clip.identity, str(clip.device))
    if key not in _auto_batch_sizes:
        probe = AUTO_BATCH_RANGE[0]
        width, height = clip.input_size or (224, 224)
        torch.cuda.synchronize(clip.device)
        torch.cuda.reset_peak_memory_stats(clip.device)
        before = torch.cuda.memory_allocated(clip.device)
        clip.encode_image_tensors(torch.zeros(probe, 3, height, width, device=clip.device))
        per_image = max(1, (torch.cuda.max_memory_allocated(clip.device) - before) / probe)
        free, _ = torch.cuda.mem_get_info(clip.device)
        fits = int(free * AUTO_BATCH_MEMORY_SHARE / per_image)
        size = 1 << max(0, fits.bit_length() - 1)
        _auto_batch_sizes[key] = min(AUTO_BATCH_RANGE[1], max(AUTO_BATCH_RANGE[0], size))
    return _auto_batch_sizes[key]


def register_model_configs(config_dir: Path | None = None, model_name: str | None = None) -> None:
    """Make this project's architectures (and any under CLIP_ASSETS_MODEL_CONFIG_DIR) known to open_clip."""
    open_clip = import_open_clip(model_name)
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    extra = config_dir or architectures.extra_config_dir
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


def model_identity(model_name: str, pretrained: str) -> str:
    """A name for the weights that changes whenever the weights do.

    Tags and hub ids name their weights already; a local checkpoint is named by its content hash, so
    retraining a checkpoint in place is a different model.
    """
    if pretrained.startswith(HF_HUB_PREFIX):
        return pretrained
    path = Path(pretrained).expanduser()
    if path.is_file():
        return f"{model_name}/file:{path.name}@{current_content_digest(path)}"
    return f"{model_name}/{pretrained}"


def _input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    size = getattr(getattr(model, "visual", None), "preprocess_cfg", {}).get("size")
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    return (int(size[1]), int(size[0]))  # preprocess sizes are (height, width)


def _embed_dim(model: torch.nn.Module, tokenizer: Callable, device: torch.device) -> int:
    """The embedding width: the image tower's output width, else from one text forward pass."""
    width = getattr(getattr(model, "visual", None), "output_dim", None)
    if isinstance(width, int):
        return width
    with torch.inference_mode():
        return int(model.encode_text(tokenizer(["a photo"]).to(device)).shape[-1])


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def load_clip_model(model_name: str, pretrained: str, device: str | None = None) -> ClipModel:
    """Load model, preprocessing and tokenizer, or fail saying how to point at local weights."""
    open_clip = import_open_clip(model_name)
    register_model_configs(model_name=model_name)
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
            check_fine_tuned_checkpoint(path)  # a fine-tuned one changed since written: named, with its rebuild
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
    embed_dim = _embed_dim(model, tokenizer, torch_device)
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
