"""Contrastive fine-tuning of the configured open_clip model on a company's own image-caption pairs.

A captions file (CSV: `path`, relative to the image root as manifests store it, and `caption`; an
image may have several rows) is split by a stable hash of the path, calibration's `is_heldout`, so
an image and all its captions are on one side whatever else the file holds. The model is tuned on
the training pairs with open_clip's own contrastive loss (`open_clip.ClipLoss`) and its training
preprocessing, either

- with the image tower locked, tuning the text side only (LiT, Zhai et al. 2022): the image
  embeddings already stored stay meaningful to the tuned image tower, which is the base one; or
- tuning both towers with a small learning rate.

The checkpoint holds the tuned weights interpolated with the base ones (`wise_alpha`; WiSE-FT,
Wortsman et al. 2022): less of the new domain's gain, less forgetting of what the base model knew;
`wise_alpha=1` keeps the tuned weights alone. By default (`wise_alpha=None`, "auto") the share is
chosen after training among `WISE_ALPHAS`: a fifth of the training images (by another hash of the
path) is set aside as a validation split, never trained on, and the share with the best validation
image-to-text retrieval accuracy is kept, ties broken by the lower validation contrastive loss
(WiSE-FT's own recipe: the share chosen on validation data of the new domain). The held-out split
is never used for the choice.

Held-out contrastive loss and image-to-text retrieval accuracy are measured before and after. The
checkpoint (`{"state_dict": ...}`, loadable by `open_clip.create_model_from_pretrained(arch,
pretrained=path)`) is named by its content hash, so its model identity
(`clip_model.model_identity`) differs from the base model's and from every other tuning's.

The module stays whole (about 400 lines): the caption reading, the training loop (whose contrastive
step already lives in contrastive_training.py) and the checkpoint writing are one run's steps.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import random
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import torch

from clip_assets.config.layout import DataLayout
from clip_assets.embedding.decode import decode_image
from clip_assets.model.clip_model import ClipModel, import_open_clip, load_clip_model, model_identity
from clip_assets.model.fine_tuned_weights import checkpoint_name
from clip_assets.storage.atomic_files import write_named_by_content
from clip_assets.storage.file_hashes import SOURCE_VERSION_CHARS, content_digest
from clip_assets.storage.store_root import StoreRoot, image_root_from, read_file_bytes
from clip_assets.storage.store_urls import StoreError
from clip_assets.tuning.calibration import is_heldout
from clip_assets.tuning.contrastive_training import adamw, contrastive_step, warmup_cosine

REQUIRED_COLUMNS = ("path", "caption")
DEFAULT_HELDOUT_FRACTION = 0.25
# Small steps for a pretrained model, in the range open_clip's fine-tuning recipes use; the text side
# alone (LiT) takes a larger one. A small model trained from scratch takes more: the demo's tiny model
# is tuned at 2e-3 (clip_assets.demo.second_domain).
DEFAULT_LR_LOCKED = 1e-4
DEFAULT_LR_BOTH = 1e-5
DEFAULT_WISE_ALPHA: float | None = None  # chosen on the validation split among WISE_ALPHAS
WISE_ALPHAS = (0.25, 0.5, 0.75, 1.0)
VALIDATION_FRACTION = 0.2  # of the training images, set aside to choose the WiSE-FT share


class CaptionsFileError(ValueError):
    """A captions file that cannot be used; the message names the file, and the line and field."""


@dataclass(frozen=True)
class CaptionPair:
    path: str  # relative to the image root, '/'-separated
    caption: str
    line: int  # in the captions file, for error messages


def read_captions_file(path: Path) -> list[CaptionPair]:
    """Every (path, caption) row of a CSV file with a header naming `path` and `caption`."""
    path = Path(path)
    if not path.is_file():
        raise CaptionsFileError(f"No captions file at {path} (--captions).")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CaptionsFileError(f"{path}, line {line}: not UTF-8 text (byte {raw[exc.start:exc.start + 1]!r}); "
                                "captions are a CSV file with columns path,caption.") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise CaptionsFileError(f"{path}, line 1: no '{missing[0]}' column; the header needs path,caption "
                                    f"and has {header}.")
        pairs = [_pair(path, reader.line_num, row) for row in reader]
    except csv.Error as exc:  # NUL bytes, an unclosed quote: not a CSV file
        raise CaptionsFileError(f"{path}, line {reader.line_num}: not a CSV file ({exc}).") from exc
    if not pairs:
        raise CaptionsFileError(f"{path}: no caption rows after the header.")
    return pairs


def _pair(file: Path, line: int, row: dict) -> CaptionPair:
    if None in row:
        raise CaptionsFileError(f"{file}, line {line}: more fields than the header's {len(row) - 1} "
                                "(quote a caption that holds a comma).")
    for field in REQUIRED_COLUMNS:
        if not (row[field] or "").strip():
            raise CaptionsFileError(f"{file}, line {line}, field '{field}': empty.")
    image = PurePosixPath(row["path"].strip().replace("\\", "/"))
    if image.is_absolute() or ".." in image.parts:
        raise CaptionsFileError(f"{file}, line {line}, field 'path': {row['path']!r} is not inside the image "
                                "root; give it relative to the image root, as the manifests store it.")
    return CaptionPair(path=str(image), caption=" ".join(row["caption"].split()), line=line)


def split_pairs(pairs: list[CaptionPair], heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
                ) -> tuple[list[CaptionPair], list[CaptionPair]]:
    """(training, held-out) by a hash of the image path: all of an image's captions fall on one side."""
    heldout = [p for p in pairs if is_heldout(p.path, heldout_fraction)]
    training = [p for p in pairs if not is_heldout(p.path, heldout_fraction)]
    return training, heldout


@dataclass(frozen=True)
class FineTuneOptions:
    lock_image: bool = False  # LiT: tune the text side only
    epochs: int = 5
    lr: float | None = None  # None: DEFAULT_LR_LOCKED or DEFAULT_LR_BOTH
    batch_size: int = 64
    weight_decay: float = 0.1
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION
    seed: int = 0
    # the tuned weights' share in the checkpoint; below 1, WiSE-FT; None: chosen on a validation split
    wise_alpha: float | None = DEFAULT_WISE_ALPHA

    def __post_init__(self):
        if self.wise_alpha is not None and not 0 < self.wise_alpha <= 1:
            raise ValueError(f"wise_alpha {self.wise_alpha}: the tuned weights' share must be in (0, 1]")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR_LOCKED if self.lock_image else DEFAULT_LR_BOTH


@dataclass(frozen=True)
class HeldoutFigures:
    loss: float  # open_clip's contrastive loss over all held-out pairs at once
    retrieval_accuracy: float  # share of held-out images whose best-matching held-out caption is one of theirs


@dataclass(frozen=True)
class WiseChoice:
    alpha: float  # the tuned weights' share in the checkpoint
    validation: tuple[tuple[float, float, float], ...] = ()  # (share, retrieval accuracy, loss) on validation, when chosen
    validation_images: int = 0

    @property
    def mix(self) -> str:
        return f"weights {self.alpha:g} tuned + {1 - self.alpha:g} base"

    def line(self) -> str:
        if not self.validation:
            return f"{self.mix} (set)"
        tried = ", ".join(f"{a:g}: {acc:.3f} / {loss:.3f}" for a, acc, loss in self.validation)
        return (f"{self.mix}, chosen on {self.validation_images} validation "
                f"images (retrieval accuracy / contrastive loss by share: {tried})")


@dataclass(frozen=True)
class FineTuneReport:
    checkpoint: Path | None
    base_identity: str
    training_pairs: int
    training_images: int
    heldout_pairs: int
    heldout_images: int
    before: HeldoutFigures
    after: HeldoutFigures
    options: FineTuneOptions
    cpu_s: float
    wall_s: float
    wise: WiseChoice = WiseChoice(1.0)

    def table(self) -> str:
        mode = "image tower locked, text side tuned (LiT)" if self.options.lock_image else "both towers tuned"
        if self.wise.alpha < 1:
            mode += f", {self.wise.mix} (WiSE-FT)"
        return "\n".join([
            f"{mode}: {self.options.epochs} epochs, lr {self.options.learning_rate:g}, batch {self.options.batch_size}, "
            f"on {self.training_pairs} pairs ({self.training_images} images); "
            f"held out by path hash: {self.heldout_pairs} pairs ({self.heldout_images} images)",
            f"{'held-out':<28} {'before':>8} {'after':>8}",
            f"{'contrastive loss':<28} {self.before.loss:>8.3f} {self.after.loss:>8.3f}",
            f"{'image->text retrieval acc.':<28} {self.before.retrieval_accuracy:>8.3f} "
            f"{self.after.retrieval_accuracy:>8.3f}",
            f"WiSE-FT: {self.wise.line()}",
            f"took {self.wall_s:.0f} s ({self.cpu_s:.0f} CPU s)",
        ])


class _Images:
    """The captioned images, decoded once each; a missing or unreadable one names its captions line."""

    def __init__(self, image_root: Path | StoreRoot, captions_file: Path | None = None):
        self.root = image_root_from(image_root)
        self.captions_file = captions_file
        self._decoded: dict[str, object] = {}

    def get(self, pair: CaptionPair):
        if pair.path not in self._decoded:
            try:
                self._decoded[pair.path] = decode_image(read_file_bytes(self.root, pair.path))
            except (OSError, ValueError, StoreError) as exc:  # missing file, not an image (PIL raises OSError)
                where = f"{self.captions_file}, line {pair.line}" if self.captions_file else f"line {pair.line}"
                raise CaptionsFileError(f"{where}, field 'path': cannot read image {self.root}/{pair.path} "
                                        f"({' '.join(str(exc).split())}).") from exc
        return self._decoded[pair.path]


def train_preprocess(model: torch.nn.Module):
    """open_clip's training transform for this model (random resized crop, as open_clip trains)."""
    transform = import_open_clip().transform
    return transform.image_transform_v2(transform.PreprocessCfg(**model.visual.preprocess_cfg), is_train=True)


@torch.no_grad()
def heldout_figures(clip: ClipModel, model: torch.nn.Module, pairs: list[CaptionPair], images: _Images,
                    loss_fn, batch_size: int = 64) -> HeldoutFigures:
    """Loss over every held-out pair at once, and image->text retrieval among the distinct held-out captions."""
    was_training = model.training
    model.eval()
    try:
        first_pair = {}
        for p in pairs:
            first_pair.setdefault(p.path, p)
        paths = sorted(first_pair)
        texts = sorted({p.caption for p in pairs})
        image_emb = torch.cat([
            model.encode_image(torch.stack([clip.preprocess(images.get(p)) for p in chunk]).to(clip.device),
                               normalize=True)
            for chunk in _chunks([first_pair[path] for path in paths], batch_size)
        ])
        text_emb = torch.cat([model.encode_text(clip.tokenizer(chunk).to(clip.device), normalize=True)
                              for chunk in _chunks(texts, batch_size)])
        row_of_path = {path: i for i, path in enumerate(paths)}
        row_of_text = {text: i for i, text in enumerate(texts)}
        loss = float(loss_fn(image_emb[[row_of_path[p.path] for p in pairs]],
                             text_emb[[row_of_text[p.caption] for p in pairs]], model.logit_scale.exp()))
        own: dict[str, set[str]] = {}
        for p in pairs:
            own.setdefault(p.path, set()).add(p.caption)
        best = (image_emb @ text_emb.T).argmax(dim=1).tolist()
        hits = sum(texts[b] in own[path] for path, b in zip(paths, best))
        return HeldoutFigures(loss=loss, retrieval_accuracy=hits / len(paths))
    finally:
        model.train(was_training)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def lock_image_tower(model: torch.nn.Module) -> None:
    """LiT: no gradient to the image tower (open_clip's `lock_image_tower` where the model has it)."""
    if hasattr(model, "lock_image_tower"):
        model.lock_image_tower()
    else:
        for param in model.visual.parameters():
            param.requires_grad = False


def interpolate_weights(model: torch.nn.Module, base_state: dict[str, torch.Tensor], alpha: float) -> None:
    """WiSE-FT (Wortsman et al. 2022): every floating-point weight and buffer becomes
    alpha * tuned + (1 - alpha) * base, in place; integer buffers (counters) stay as tuned."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.lerp(base_state[name].to(tensor.device), tensor, alpha))


def validation_split(training: list[CaptionPair]) -> tuple[list[CaptionPair], list[CaptionPair]]:
    """(pairs trained on, validation pairs) of the training pairs, by another hash of the path than the held-out split's."""
    def validates(p: CaptionPair) -> bool:
        return is_heldout(f"wise-validation/{p.path}", VALIDATION_FRACTION)

    return [p for p in training if not validates(p)], [p for p in training if validates(p)]


def choose_wise_alpha(clip: ClipModel, model: torch.nn.Module, base_state: dict[str, torch.Tensor],
                      validation: list[CaptionPair], images, loss_fn) -> WiseChoice:
    """Leave `model` at the share of WISE_ALPHAS with the best validation retrieval accuracy, ties
    broken by the lower validation loss (its tuned weights are the share 1)."""
    tuned_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scored = []
    for alpha in WISE_ALPHAS:
        model.load_state_dict(tuned_state)
        interpolate_weights(model, base_state, alpha)
        figures = heldout_figures(clip, model, validation, images, loss_fn)
        scored.append((alpha, figures.retrieval_accuracy, figures.loss))
    chosen = max(scored, key=lambda s: (s[1], -s[2]))[0]
    model.load_state_dict(tuned_state)
    interpolate_weights(model, base_state, chosen)
    return WiseChoice(chosen, tuple(scored), len({p.path for p in validation}))


def fine_tune(clip: ClipModel, pairs: list[CaptionPair], image_root: Path | StoreRoot, options: FineTuneOptions,
              captions_file: Path | None = None, log: Callable[[str], None] = print
              ) -> tuple[torch.nn.Module, HeldoutFigures, HeldoutFigures, list[CaptionPair], list[CaptionPair], WiseChoice]:
    """Tune `clip.model` in place on the training pairs; (model, before, after, training, held-out, WiSE-FT share)."""
    training, heldout = split_pairs(pairs, options.heldout_fraction)
    validation: list[CaptionPair] = []
    if options.wise_alpha is None:
        training, validation = validation_split(training)
    if not training or not heldout or (options.wise_alpha is None and not validation):
        raise CaptionsFileError(
            f"{len({p.path for p in pairs})} captioned images cannot be split into training, held-out"
            f"{' and validation' if options.wise_alpha is None else ''} parts (held-out fraction "
            f"{options.heldout_fraction}); caption more images, or set the WiSE-FT share (wise_alpha) instead of choosing it.")
    started = time.monotonic()
    torch.manual_seed(options.seed)
    rng = random.Random(options.seed)
    model = clip.model
    images = _Images(image_root, captions_file)
    loss_fn = import_open_clip().ClipLoss()
    augment = train_preprocess(model)
    before = heldout_figures(clip, model, heldout, images, loss_fn)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if options.wise_alpha != 1 else None
    if options.lock_image:
        lock_image_tower(model)
    optimizer = adamw(model, options.learning_rate, options.weight_decay)
    steps_per_epoch = max(1, len(training) // options.batch_size)
    schedule = warmup_cosine(optimizer, steps_per_epoch * options.epochs)
    model.train()
    if options.lock_image:
        model.visual.eval()  # the locked tower's batch-norm statistics stay as they were too
    for epoch in range(options.epochs):
        order = list(range(len(training)))
        rng.shuffle(order)
        running = 0.0
        for step in range(steps_per_epoch):
            batch = [training[i] for i in order[step * options.batch_size:(step + 1) * options.batch_size]]
            pixels = torch.stack([augment(images.get(p)) for p in batch]).to(clip.device)
            tokens = clip.tokenizer([p.caption for p in batch]).to(clip.device)
            running += contrastive_step(model, pixels, tokens, loss_fn, optimizer, schedule)
        log(f"epoch {epoch + 1}/{options.epochs}: training contrastive loss {running / steps_per_epoch:.3f} "
            f"({time.monotonic() - started:.0f} s)")
    model.eval()
    if options.wise_alpha is None:
        wise = choose_wise_alpha(clip, model, base_state, validation, images, loss_fn)
        log(f"WiSE-FT: {wise.line()}")
    else:
        wise = WiseChoice(options.wise_alpha)
        if base_state is not None:
            interpolate_weights(model, base_state, options.wise_alpha)
    after = heldout_figures(clip, model, heldout, images, loss_fn)
    return model, before, after, training, heldout, wise


def write_checkpoint(model: torch.nn.Module, directory: Path, model_name: str, provenance: dict) -> Path:
    """`{"state_dict", "fine_tuning"}` under a name holding its content hash, written atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # serialised in memory, then written by Python: torch's own file writer fails on a full disk with
    # "unexpected pos" (TorchScript's aborts the process), see clip_assets.storage.atomic_files
    serialised = io.BytesIO()
    torch.save({"state_dict": state, "fine_tuning": provenance}, serialised)
    return write_named_by_content(
        directory, lambda digest: checkpoint_name(model_name, digest),
        lambda tmp: tmp.write_bytes(serialised.getbuffer()),
    )


def fine_tune_to_checkpoint(model_name: str, pretrained: str, captions_file: Path, image_root: Path | StoreRoot,
                            data_dir: Path, options: FineTuneOptions, device: str | None = None,
                            log: Callable[[str], None] = print) -> FineTuneReport:
    """Read the captions, tune the configured model, write the checkpoint under the data directory."""
    pairs = read_captions_file(captions_file)
    started, cpu_started = time.monotonic(), time.process_time()
    clip = load_clip_model(model_name, pretrained, device)
    model, before, after, training, heldout, wise = fine_tune(clip, pairs, image_root, options, captions_file, log)
    checkpoint = write_checkpoint(model, DataLayout(data_dir).fine_tuned_models_dir, model_name, {
        "base_model": clip.identity,
        "captions_sha256": content_digest(captions_file, SOURCE_VERSION_CHARS),
        "options": dataclasses.asdict(options),
        "wise_alpha": wise.alpha,
    })
    return FineTuneReport(
        checkpoint=checkpoint, base_identity=clip.identity,
        training_pairs=len(training), training_images=len({p.path for p in training}),
        heldout_pairs=len(heldout), heldout_images=len({p.path for p in heldout}),
        before=before, after=after, options=options,
        cpu_s=time.process_time() - cpu_started, wall_s=time.monotonic() - started, wise=wise,
    )


def opt_in_note(report: FineTuneReport, model_name: str) -> str:
    """Where the checkpoint is, and what switching to it re-runs."""
    return (
        f"checkpoint: {report.checkpoint}\n"
        f"To use it, set CLIP_ASSETS_PRETRAINED={report.checkpoint} (CLIP_ASSETS_MODEL stays {model_name}). Its model "
        f"identity is {model_identity(model_name, str(report.checkpoint))}, not {report.base_identity}: re-materialize "
        "prompt_centroids and backfill image_embeddings for every batch, then image_classifications. Until both are "
        "done, classification refuses to compare embeddings and centroids of different models (the blocking "
        "same_model_as_centroids check, ModelMismatchError), so no batch is scored across the two models."
    )
