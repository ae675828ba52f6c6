"""The copy threshold, learnt for the collection's model from the collection's own images.

Whether two embeddings are "the same picture" depends on the model: one model puts a re-encoded copy
at 0.999 and a different photo of the same scene at 0.97, another puts every image above 0.99. So
the threshold is learnt, never set: a sample of the collection's images is copied the way copies
arise (`make_copies`: JPEG re-encoding at several qualities, resizing from a half to double, crops of
up to about a tenth of the picture, small colour and brightness shifts, format changes, with Pillow),
the copies are embedded with the model, and the similarity of each copy to its original is compared
with the similarity of the original to its nearest other images in the collection (the candidates
the index would give it). The copy tier's rule is "similarity >= threshold, perceptual hashes within
`hash_distance` bits and colour layouts within COLOUR_DISTANCE_BOUND" (clip_assets.search.near_duplicates),
so all three are applied here: a copy counts as found when it passes the rule and would be among its
original's candidates; an original counts against the rule when one of its nearest other images passes
it. So the threshold is the one the two other signals leave to the embedding: where they already tell
most look-alikes from copies, it can sit lower and find more copies.

Precision is counted as if copies and non-copies were equally common (true-positive rate over the
sum of the true- and false-positive rates): the threshold is the lowest at which it stays at or above
the target everywhere above it. Half the sample (by a fixed seed) learns the threshold; the other half
is held out and tells the precision and recall to expect, stored and shown with it. A nearest other
image as close to the original as one of its own synthetic copies, by all three signals, is a copy
already in the collection: it is left out of the non-copies, and counted.

The result is stored with the model identity (`<data dir>/near_duplicates/copy_threshold.json`) and
learnt again when the model changes, when the target or the hash bound changes, or while the sample
is short of its full size and the collection has doubled since.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import default
from clip_assets.embedding.decode import decode_image, draft_size
from clip_assets.embedding.perceptual_hash import (
    COLOUR_DISTANCE_BOUND,
    colour_distance,
    colour_layout,
    colour_layouts_of_files,
    hamming,
    perceptual_hash,
)
from clip_assets.ingest.manifest import image_paths
from clip_assets.search.search_rows import ensure_search_rows, mapped_rows
from clip_assets.storage.atomic_files import write_text_atomically
from clip_assets.storage.store_root import StoreRoot, read_file_bytes

if TYPE_CHECKING:  # torch loads in the step that learns, not with the code location
    from clip_assets.model.clip_model import ClipModel

log = logging.getLogger(__name__)

SAMPLE_ORIGINALS = 160  # images copied: half learn the threshold, half are held out
MIN_ORIGINALS = 8  # fewer images in the collection: nothing to learn from
NEAREST_OTHERS = 16  # per original and shard: near_duplicates.NEIGHBOURS, the candidates the index gives an image
MAX_CANDIDATES = 256
KINDS = ("jpeg", "resize", "crop", "colour", "format")
FORMAT_VERSION = 2  # 2: the colour layouts confirm copies too
ROWS_PER_READ = 65_536
ENCODE_BATCH = 64


@dataclass
class CopyThreshold:
    """A learnt copy threshold and what it was learnt from; `threshold` None when it could not be learnt."""

    model: str
    threshold: float | None
    target_precision: float
    hash_distance: int
    precision: float | None = None  # on the half that learnt it
    recall: float | None = None
    heldout_precision: float | None = None  # on the held-out half: what to expect
    heldout_recall: float | None = None
    recall_by_kind: dict[str, float] = field(default_factory=dict)  # both halves, at the threshold
    originals: int = 0
    copies: int = 0
    copies_in_collection: int = 0  # nearest other images of the sample that are copies already (left out)
    collection_images: int = 0
    why: str = ""  # why it could not be learnt
    computed_at: str = ""
    format_version: int = FORMAT_VERSION

    def save(self, path: Path) -> None:
        write_text_atomically(json.dumps(asdict(self), indent=1), path)

    @classmethod
    def load(cls, path: Path) -> "CopyThreshold | None":
        """The stored result; None where there is none, or it cannot be read (it is learnt again)."""
        if not path.is_file():
            return None
        try:
            stored = cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            log.warning("%s cannot be read (%s): the copy threshold is learnt again", path, exc)
            return None
        return stored if stored.format_version == FORMAT_VERSION else None


def relearn_reason(
    stored: CopyThreshold | None, model: str, collection_images: int, target_precision: float, hash_distance: int
) -> str | None:
    """Why the stored threshold must be learnt again, in words; None when it still holds."""
    if stored is None:
        return "none learnt yet"
    if stored.model != model:
        return f"learnt for model {stored.model}, the collection is now embedded with {model}"
    if (stored.target_precision, stored.hash_distance) != (target_precision, hash_distance):
        return "the target precision or the hash bound changed"
    if stored.originals < SAMPLE_ORIGINALS and collection_images >= 2 * max(1, stored.collection_images):
        return (
            f"learnt from {stored.collection_images:,} images, the collection now holds {collection_images:,}: "
            "a larger sample"
        )
    return None


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def make_copies(image: Image.Image, original_format: str | None, rng: random.Random) -> list[tuple[str, bytes]]:
    """One copy of each kind (KINDS) of a decoded RGB image, as file bytes, made the way copies arise."""
    w, h = image.size
    same = "PNG" if original_format == "PNG" else "JPEG"

    def saved(img: Image.Image, fmt: str = same) -> bytes:
        return _bytes(img, fmt, quality=92) if fmt == "JPEG" else _bytes(img, fmt)

    scale = rng.uniform(0.5, 2.0)
    keep = rng.uniform(0.9, 0.99) ** 0.5  # of each side: up to a tenth of the picture goes
    cw, ch = max(8, round(w * keep)), max(8, round(h * keep))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    shifted = ImageEnhance.Brightness(image).enhance(rng.uniform(0.9, 1.1))
    shifted = ImageEnhance.Color(shifted).enhance(rng.uniform(0.9, 1.1))
    other_format = ("JPEG" if same == "PNG" else "PNG") if rng.random() < 0.5 else "WEBP"
    return [
        ("jpeg", _bytes(image, "JPEG", quality=rng.choice([40, 60, 75, 90]))),
        ("resize", saved(image.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.BICUBIC))),
        ("crop", saved(image.crop((left, top, left + cw, top + ch)))),
        ("colour", saved(shifted)),
        ("format", _bytes(image, other_format, quality=90) if other_format != "PNG" else _bytes(image, "PNG")),
    ]


@dataclass
class _Collection:
    """The collection's rows of one model: where each is, its stored hash and fingerprint."""

    batches: list[str]
    ids: list[np.ndarray]  # per batch, image_id of each row (object arrays)
    keep: list[np.ndarray]  # per batch, rows of the model
    hashes: list[np.ndarray]  # per batch, int64 (0 where unknown)
    known: list[np.ndarray]  # per batch, whether the hash is known
    fingerprints: list[np.ndarray]

    @property
    def images(self) -> int:
        return int(sum(k.sum() for k in self.keep))


def _read_collection(layout: DataLayout, batches: list[str], model: str) -> _Collection:
    out = _Collection([], [], [], [], [], [])
    for batch in batches:
        path = layout.embeddings_path(batch)
        if not path.is_file():
            continue
        table = pq.read_table(path, columns=["image_id", "model", "perceptual_hash", "fingerprint"])
        out.batches.append(batch)
        out.ids.append(np.asarray(table["image_id"].to_pylist(), dtype=object))
        out.keep.append(pc.equal(table["model"], model).to_numpy(zero_copy_only=False))
        hashes = table["perceptual_hash"]
        out.known.append(pc.is_valid(hashes).to_numpy(zero_copy_only=False))
        out.hashes.append(pc.fill_null(hashes, 0).to_numpy().astype(np.int64))
        out.fingerprints.append(np.asarray(table["fingerprint"].to_pylist(), dtype=object))
    return out


def _nearest_others(
    layout: DataLayout, coll: _Collection, queries: np.ndarray, query_at: list[tuple[int, int]], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, its k most similar other images of the model: (similarity, batch number, row), best first."""
    n = len(queries)
    best_s = np.full((n, k), -np.inf, dtype=np.float32)
    best_b = np.full((n, k), -1, dtype=np.int64)
    best_r = np.full((n, k), -1, dtype=np.int64)
    for b, batch in enumerate(coll.batches):
        rows = mapped_rows(ensure_search_rows(layout.embeddings_path(batch)))
        for start in range(0, len(rows), ROWS_PER_READ):
            chunk = np.asarray(rows[start : start + ROWS_PER_READ], dtype=np.float32)
            sims = queries @ chunk.T
            sims[:, ~coll.keep[b][start : start + len(chunk)]] = -np.inf
            for q, (qb, qr) in enumerate(query_at):
                if qb == b and start <= qr < start + len(chunk):
                    sims[q, qr - start] = -np.inf  # not itself
            top = (
                np.argpartition(-sims, min(k, sims.shape[1] - 1), axis=1)[:, :k]
                if sims.shape[1] > k
                else np.broadcast_to(np.arange(sims.shape[1]), (n, sims.shape[1]))
            )
            cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], axis=1)
            cand_b = np.concatenate([best_b, np.full(top.shape, b)], axis=1)
            cand_r = np.concatenate([best_r, top + start], axis=1)
            order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
            best_s, best_b, best_r = (np.take_along_axis(a, order, 1) for a in (cand_s, cand_b, cand_r))
    return best_s, best_b, best_r


def balanced_precision(tp_rate: float, fp_rate: float) -> float:
    """Precision where copies and non-copies are equally common."""
    return 1.0 if tp_rate + fp_rate == 0 else tp_rate / (tp_rate + fp_rate)


def choose_threshold(positives: np.ndarray, negatives: np.ndarray, target: float) -> float:
    """The lowest threshold at or above which the balanced precision is at least `target` at every
    threshold above it. `positives`: each copy's score (-inf: never found); `negatives`: each
    original's highest-scoring non-copy (-inf: none can pass)."""
    found = np.sort(positives[np.isfinite(positives)])[::-1]
    chosen = None
    for t in np.unique(found)[::-1]:
        if balanced_precision(float(np.mean(positives >= t)), float(np.mean(negatives >= t))) < target:
            break
        chosen = float(t)
    if chosen is None:  # no copy passes above every non-copy: just above the highest of them
        top = negatives[np.isfinite(negatives)]
        chosen = min(1.0, float(np.nextafter(np.float32(top.max()), np.float32(2)))) if len(top) else 1.0
    return chosen


def rates(threshold: float, positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    """(balanced precision, recall) of the rule at `threshold`."""
    tpr = float(np.mean(positives >= threshold)) if len(positives) else 0.0
    fpr = float(np.mean(negatives >= threshold)) if len(negatives) else 0.0
    return balanced_precision(tpr, fpr), tpr


def learn_copy_threshold(
    clip: ClipModel,
    image_root: Path | StoreRoot,
    layout: DataLayout,
    batches: list[str],
    target_precision: float = default("copy_precision"),
    hash_distance: int = default("copy_hash_distance"),
    sample: int = SAMPLE_ORIGINALS,
    seed: int = 0,
    report: Callable[[str], None] = log.info,
) -> CopyThreshold:
    """Learn the copy threshold of `clip` on copies of a sample of the batches' images (see the module)."""
    import torch

    from clip_assets.model.pillow_preprocess import fused_preprocess

    coll = _read_collection(layout, batches, clip.identity)
    result = CopyThreshold(
        clip.identity,
        None,
        target_precision,
        hash_distance,
        collection_images=coll.images,
        computed_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    rng = random.Random(seed)
    everyone = [(b, int(r)) for b in range(len(coll.batches)) for r in np.flatnonzero(coll.keep[b])]
    if len(everyone) < MIN_ORIGINALS:
        result.why = (
            f"the collection holds {len(everyone)} images embedded with {clip.identity}, fewer than "
            f"{MIN_ORIGINALS}: copies are grouped at the look-alike threshold until it holds more"
        )
        return result
    picked = rng.sample(everyone, min(sample, len(everyone)))
    ids_by_batch: dict[str, list[str]] = {}
    for b, r in picked:
        ids_by_batch.setdefault(coll.batches[b], []).append(coll.ids[b][r])
    paths = image_paths(layout, ids_by_batch)
    preprocess, min_size = fused_preprocess(clip.preprocess), draft_size(clip)

    originals, copies = [], []  # (b, r), (original number, kind, pixels, hash, colour layout)
    original_colours = []
    for b, r in picked:
        path = paths.get(coll.ids[b][r])
        try:
            data = read_file_bytes(image_root, path)
            with Image.open(io.BytesIO(data)) as opened:
                original_format = opened.format
            image = decode_image(data)
        except Exception as exc:  # a file gone or changed since it was embedded: sample another one's copies
            report(f"copy threshold: {path} left out of the sample ({type(exc).__name__}: {exc})")
            continue
        if not coll.known[b][r]:  # embedded before hashes were stored: hashed as the embedding step would
            coll.hashes[b][r], coll.known[b][r] = perceptual_hash(decode_image(data, min_size)), True
        number = len(originals)
        originals.append((b, r))
        original_colours.append(colour_layout(image))
        for kind, copy in make_copies(image, original_format, rng):
            decoded = decode_image(copy, min_size)
            copies.append((number, kind, preprocess(decoded), perceptual_hash(decoded), colour_layout(decoded)))
    if len(originals) < MIN_ORIGINALS:
        result.why = f"only {len(originals)} of the sampled images could be read: fewer than {MIN_ORIGINALS}"
        return result
    report(f"copy threshold: embedding {len(copies):,} copies of {len(originals):,} sampled images")
    vectors = []
    for start in range(0, len(copies), ENCODE_BATCH):
        pixels = torch.stack([c[2] for c in copies[start : start + ENCODE_BATCH]])
        vectors.append(clip.encode_image_tensors(pixels).float().numpy())
    copy_vectors = np.concatenate(vectors)

    stored = {}
    for b in {b for b, _ in originals}:
        rows = mapped_rows(ensure_search_rows(layout.embeddings_path(coll.batches[b])))
        stored.update({(b, r): np.asarray(rows[r], dtype=np.float32) for bb, r in originals if bb == b})
    queries = np.stack([stored[o] for o in originals])
    # The index gives an image NEAREST_OTHERS candidates per shard: a copy less similar to its original
    # than the original's that many-th nearest other image would not be among them.
    candidates = min(MAX_CANDIDATES, NEAREST_OTHERS * len(coll.batches))
    near_s, near_b, near_r = _nearest_others(layout, coll, queries, originals, candidates)

    original_hash = np.array([coll.hashes[b][r] for b, r in originals], dtype=np.int64)
    copy_of = np.array([c[0] for c in copies])
    copy_sim = np.einsum("ij,ij->i", copy_vectors, queries[copy_of])
    copy_bits = hamming(np.array([c[3] for c in copies], dtype=np.int64), original_hash[copy_of])
    last_candidate = near_s[:, -1]  # -inf where the collection holds fewer other images
    copy_colour = np.array([colour_distance(c[4], original_colours[c[0]]) for c in copies])
    confirmed = (copy_bits <= hash_distance) & (copy_colour <= COLOUR_DISTANCE_BOUND)
    positives = np.where(confirmed & (copy_sim >= last_candidate[copy_of]), copy_sim, -np.inf)

    # The nearest other images whose hash agrees: their colour layouts, from their files.
    hash_agrees: set[tuple[int, int, int]] = set()
    for o in range(len(originals)):
        for nb, nr in zip(near_b[o, :NEAREST_OTHERS], near_r[o, :NEAREST_OTHERS]):
            if nb >= 0 and coll.known[nb][nr]:
                if hamming(np.array([coll.hashes[nb][nr]]), original_hash[o : o + 1])[0] <= hash_distance:
                    hash_agrees.add((o, int(nb), int(nr)))
    wanted: dict[str, list[str]] = {}
    for _, nb, nr in hash_agrees:
        wanted.setdefault(coll.batches[nb], []).append(coll.ids[nb][nr])
    other_paths = image_paths(layout, wanted)
    other_colours = colour_layouts_of_files(
        image_root,
        {(nb, nr): other_paths[coll.ids[nb][nr]] for _, nb, nr in hash_agrees if coll.ids[nb][nr] in other_paths})

    negatives = np.full(len(originals), -np.inf)
    already = 0
    for o, (b, r) in enumerate(originals):
        mine = (copy_of == o) & confirmed
        weakest_copy = copy_sim[mine].min() if mine.any() else np.inf
        for s, nb, nr in zip(near_s[o, :NEAREST_OTHERS], near_b[o, :NEAREST_OTHERS], near_r[o, :NEAREST_OTHERS]):
            if (o, int(nb), int(nr)) not in hash_agrees or not np.isfinite(s):
                continue
            other_colour = other_colours.get((int(nb), int(nr)))
            if other_colour is None or colour_distance(other_colour, original_colours[o]) > COLOUR_DISTANCE_BOUND:
                continue  # the colour layouts tell them apart: never a copy, whatever the similarity
            same_bytes = coll.fingerprints[nb][nr] is not None and coll.fingerprints[nb][nr] == coll.fingerprints[b][r]
            if same_bytes or s >= weakest_copy:  # as close as one of its own copies by all three signals: a copy
                already += 1
                continue
            negatives[o] = max(negatives[o], float(s))

    fit = np.arange(len(originals)) % 2 == 0
    fit_copies = fit[copy_of]
    threshold = choose_threshold(positives[fit_copies], negatives[fit], target_precision)
    result.threshold = threshold
    result.precision, result.recall = rates(threshold, positives[fit_copies], negatives[fit])
    result.heldout_precision, result.heldout_recall = rates(threshold, positives[~fit_copies], negatives[~fit])
    kinds = np.array([c[1] for c in copies])
    result.recall_by_kind = {k: float(np.mean(positives[kinds == k] >= threshold)) for k in KINDS}
    result.originals, result.copies, result.copies_in_collection = len(originals), len(copies), already
    return result


def learnt_or_stored(
    clip_loader: Callable[[], ClipModel],
    model: str,
    image_root: Path | StoreRoot,
    layout: DataLayout,
    batches: list[str],
    target_precision: float = default("copy_precision"),
    hash_distance: int = default("copy_hash_distance"),
    report: Callable[[str], None] = log.info,
) -> tuple[CopyThreshold, str | None]:
    """The stored threshold where it still holds for `model`, else one learnt now and stored (the model
    loaded only then); and why it was learnt (None: kept)."""
    stored = CopyThreshold.load(layout.copy_threshold_path)
    images = collection_images(layout, batches, model)
    why = relearn_reason(stored, model, images, target_precision, hash_distance)
    if why is None:
        return stored, None
    report(f"learning the copy threshold: {why}")
    learnt = learn_copy_threshold(
        clip_loader(), image_root, layout, batches, target_precision, hash_distance, report=report
    )
    learnt.save(layout.copy_threshold_path)
    return learnt, why


def collection_images(layout: DataLayout, batches: list[str], model: str) -> int:
    """Rows of `model` in the batches' embeddings files (their footers and model columns only)."""
    total = 0
    for batch in batches:
        path = layout.embeddings_path(batch)
        if path.is_file():
            total += int(pc.sum(pc.equal(pq.read_table(path, columns=["model"])["model"], model)).as_py() or 0)
    return total


def collection_model(layout: DataLayout, batches: list[str]) -> str | None:
    """The model of the first stored embedding (a collection is embedded with one model)."""
    for batch in batches:
        path = layout.embeddings_path(batch)
        if path.is_file():
            models = pq.read_table(path, columns=["model"])["model"]
            if len(models):
                return models[0].as_py()
    return None
