"""A saved text encoder for search queries, so `clip-assets search "..."` starts without open_clip.

Most of a text search's wall time is start-up, not search: open_clip imports torchvision, whose
operators import torch's compiler stack (torch._dynamo), about 5 of the 8.5 seconds the imports took
on a quiet 2-core machine, while torch alone took 3.4. A text query needs none of that: only the
model's text tower and its tokenizer. So the first text search with a model traces the text tower
(TorchScript: loads with plain torch) into the data directory, named by the model's identity, and
later searches load that file and open_clip's tokenizer module on its own, never importing open_clip
or torchvision.

It is saved only where it is exactly the model's own encoder: on the CPU, for open_clip's
SimpleTokenizer (the CLIP BPE tokenizer most architectures use), and after the traced encoder and the
standalone tokenizer have been checked against the loaded model on texts of several lengths. Anything
else (a Hugging Face or SigLIP tokenizer, a GPU device, a torch without TorchScript) just keeps the
full path. A saved file names the model identity it was traced from; a different identity is a miss.

The traced tower is serialised into memory and written through the project's atomic writer: written
straight to a file, TorchScript's writer aborts the whole process on a full disk. A file that cannot
be written (no space, no permission) is a warning, not a failed search: the search goes on with the
model it loaded, and the next one loads it again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from clip_assets.storage.atomic_files import write_bytes_atomically
from clip_assets.storage.damaged_files import TEXT_ENCODER

if TYPE_CHECKING:
    from clip_assets.model.clip_model import ClipModel

log = logging.getLogger(__name__)

FORMAT = 1
META_NAME = "clip_assets_text_encoder.json"
CLEAN_CHOICES = ("lower", "whitespace", "canonicalize")
# Texts the saved encoder and tokenizer must reproduce: end-of-text at different places, and one
# longer than any context (truncated), so a traced shape or a tokenizer option that differs shows.
PROBE_TEXTS = [
    "a photo",
    "A RED square, drawn on white!",
    "café crème brûlée, naïve résumé",
    " ".join(["a very long query that goes on"] * 20),
]


def encoder_path(directory: Path, identity: str) -> Path:
    return directory / f"{hashlib.sha256(identity.encode()).hexdigest()[:20]}.pt"


def _standalone_tokenizer_module():
    """open_clip's tokenizer.py loaded as a module of its own: `import open_clip` runs its whole
    package (torchvision included), the tokenizer file imports only ftfy, regex, numpy and torch."""
    name = "clip_assets._open_clip_tokenizer"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("open_clip")  # finds the package without importing it
    if package is None or not package.submodule_search_locations:
        return None
    path = Path(list(package.submodule_search_locations)[0]) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def _standalone_tokenizer(context_length: int, clean: str) -> Callable:
    return _standalone_tokenizer_module().SimpleTokenizer(context_length=context_length, clean=clean)


class _NormalisedTextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)


@dataclass
class TextQueryEncoder:
    """The saved text tower and its tokenizer: encodes queries as `ClipModel.encode_texts` does."""

    module: torch.jit.ScriptModule
    tokenizer: Callable
    identity: str

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        # One text at a time: the tower was traced with a batch of one.
        return torch.cat([self.module(self.tokenizer([text])) for text in texts])


def _matching_clean(clip: "ClipModel") -> str | None:
    """The `clean` option with which the standalone SimpleTokenizer reproduces the model's tokenizer."""
    reference = clip.tokenizer(PROBE_TEXTS)
    for clean in CLEAN_CHOICES:
        if torch.equal(_standalone_tokenizer(clip.tokenizer.context_length, clean)(PROBE_TEXTS), reference):
            return clean
    return None


def save_text_query_encoder(clip: "ClipModel", directory: Path) -> Path | None:
    """Trace `clip`'s text tower into `directory` when it can be reproduced exactly; the path, or None."""
    if clip.device.type != "cpu" or type(clip.tokenizer).__name__ != "SimpleTokenizer":
        return None
    if getattr(clip.tokenizer, "reduction_fn", None) is not None or not hasattr(torch.jit, "trace"):
        return None
    try:
        clean = _matching_clean(clip)
        if clean is None:
            return None
        tower = _NormalisedTextTower(clip.model).eval()
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer notes
            traced = torch.jit.trace(tower, clip.tokenizer(PROBE_TEXTS[:1]), check_trace=False)
            for text in PROBE_TEXTS:
                tokens = clip.tokenizer([text])
                if not torch.allclose(traced(tokens), tower(tokens), atol=1e-5):
                    log.info("traced text tower differs from the model's; searches keep loading open_clip")
                    return None
        meta = {"format": FORMAT, "identity": clip.identity, "context_length": clip.tokenizer.context_length,
                "clean": clean, "torch": torch.__version__}
        path = encoder_path(directory, clip.identity)
        serialised = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(traced, serialised, _extra_files={META_NAME: json.dumps(meta)})
        write_bytes_atomically(serialised.getbuffer(), path)
        return path
    except OSError as exc:  # no space, no permission: this search goes on, the next loads the model again
        log.warning(
            "text encoder not saved for fast search start-up (%s); this search goes on with the model it loaded", exc
        )
        return None
    except Exception as exc:  # an optimisation only: whatever fails, searches keep the full path
        log.info("text tower not saved for fast search start-up: %s", exc)
        return None


def load_text_query_encoder(directory: Path, identity: str) -> TextQueryEncoder | None:
    """The saved encoder for the model `identity`, or None (never saved, or saved for other weights). One
    that cannot be loaded is moved aside with a warning (clip_assets.storage.damaged_files); the search
    then loads the model and saves the encoder again."""
    path = encoder_path(directory, identity)
    if not path.is_file():
        return None
    try:
        extra = {META_NAME: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = json.loads(extra[META_NAME])
        if meta.get("format") != FORMAT or meta.get("identity") != identity:
            return None
        tokenizer = _standalone_tokenizer(int(meta["context_length"]), meta["clean"])
    except Exception as exc:  # damaged, or written by another torch: set aside, and saved again by this search
        TEXT_ENCODER.set_aside(path, exc)
        return None
    return TextQueryEncoder(module=module.eval(), tokenizer=tokenizer, identity=identity)
