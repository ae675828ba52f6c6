"""The demo: a synthetic collection, a tiny model trained on it, the whole pipeline through Dagster.

Runs with no model hub: the model is an open_clip architecture registered from this package's
configs and trained here on generated image-caption pairs (cached after the first run).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg

from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import REPO_ROOT, Settings, env_var
from clip_assets.definitions import build_definitions
from clip_assets.defs.asset_keys import IMAGE_EVALUATION, THRESHOLD_CALIBRATION
from clip_assets.demo.review_loop import decisions, review_loop, set_aside_previous_store
from clip_assets.demo.shapes import LABELS_FILE, read_labels, write_collection
from clip_assets.demo.train import DEMO_MODEL, checkpoint_path, train_tiny_clip, training_recipe
from clip_assets.ingest.manifest import list_batches
from clip_assets.instance.execution import materialize, materialize_everything
from clip_assets.search.copy_threshold import CopyThreshold
from clip_assets.search.query import format_table, search
from clip_assets.storage.warehouse import connect, read_duplicate_groups
from clip_assets.tuning.calibration import CalibrationReport, calibrate, load_labelled_scores, stable_fraction
from clip_assets.tuning.evaluation import macro_f1, score_labels
from clip_assets.tuning.labels_file import LabelRows, read_labels_file, write_labels_file

DEMO_DIR = REPO_ROOT / ".demo"
LABELLED_SAMPLE = "labelled_sample.csv"  # the labels file the demo's pipeline reads (CLIP_ASSETS_LABELS)
LABELLED_SHARE = 1 / 6  # of the demo's images: 60 of 360, as a person would label a sample
DEMO_COPIES = 6  # real copies of its own images (clip_assets.demo.shapes.write_copies), one of each kind


def demo_settings(demo_dir: Path, checkpoint: Path, device: str | None = None,
                  labels_path: Path | None = None) -> Settings:
    return Settings(
        image_root=demo_dir / "images",
        data_dir=demo_dir / "data",
        prompts_dir=REPO_ROOT / "prompts",
        model=DEMO_MODEL,
        pretrained=str(checkpoint),
        device=device,
        labels_path=labels_path,
    )


def write_labelled_sample(truth_file: Path, path: Path, share: float = LABELLED_SHARE) -> Path:
    """A stable share of the demo's images (by a hash of the path) with their ground truth, as the labels
    file the pipeline reads: what calibration, the adapters and the evaluation learn from and score on."""
    truth = read_labels(truth_file)
    chosen = {p: labels for p, labels in truth.items() if stable_fraction(p, "demo-labels") < share}
    return write_labels_file(LabelRows("path", chosen), path)


def write_env_file(path: Path, settings: Settings) -> None:
    names = ["image_root", "data_dir", "model", "pretrained"] + (["labels_path"] if settings.labels_path else [])
    path.write_text("".join(f"{env_var(name)}={getattr(settings, name)}\n" for name in names))


def matched_labels(layout: DataLayout) -> dict[str, set[str]]:
    """Matched categories per image path, read back from DuckDB and the manifests."""
    return decisions(layout, person_included=True)


def category_summary(layout: DataLayout) -> list[tuple]:
    with connect(layout.duckdb_path, read_only=True) as con:
        return con.execute(
            """
            SELECT c.category, count(DISTINCT c.image_id) AS images, count(*) FILTER (WHERE matched) AS matched,
                   round(avg(score)::DOUBLE, 3) AS mean_score, round(max(score)::DOUBLE, 3) AS max_score, any_value(c.threshold) AS threshold
            FROM image_classifications c JOIN prompt_categories p USING (category)
            GROUP BY c.category, p.position ORDER BY p.position
            """
        ).fetchall()


def show_duplicates(layout: DataLayout, log=print) -> dict[str, list[list[str]]]:
    """The near-duplicate groups per tier as DuckDB holds them (paths, first image first), printed."""
    tiers: dict[str, dict[str, list[str]]] = {}
    for row in read_duplicate_groups(layout.duckdb_path, 10_000):
        tiers.setdefault(row["tier"], {}).setdefault(row["group_id"], []).append(row["path"])
    learnt = CopyThreshold.load(layout.copy_threshold_path)
    if learnt is not None and learnt.threshold is not None:
        log(f"\nnear-duplicates: copy threshold {learnt.threshold:.4f} learnt for {learnt.model} (held-out precision "
            f"{learnt.heldout_precision:.3f}, recall {learnt.heldout_recall:.3f})")
    for tier in ("exact", "copy", "look-alike"):
        groups = list(tiers.get(tier, {}).values())
        log(f"{tier}: {len(groups)} groups, {sum(len(g) for g in groups)} images")
        for g in groups[: 10 if tier == "look-alike" else len(groups)]:
            log("  " + " = ".join(g))
    return {tier: list(groups.values()) for tier, groups in tiers.items()}


def show_calibration(layout: DataLayout, labels: Path, log=print) -> CalibrationReport:
    """Calibrate on half the labelled images, score before/after on the other half (not written)."""
    report = calibrate(load_labelled_scores(layout, read_labels_file(labels)))
    log("\ncalibration (`clip-assets calibrate --labels ...`): thresholds tuned on one half of the images,")
    log("scored on the other half, which no threshold was tuned on:")
    log(report.table())
    return report


def run_demo(demo_dir: Path = DEMO_DIR, log=print, device: str | None = None) -> float:
    """Generate, train, materialize, report; returns the macro F1 of matched labels. `device`: where the
    pipeline encodes (CLIP_ASSETS_DEVICE, read by the CLI); unset: cuda, then mps, else cpu."""
    started = time.monotonic()
    images = demo_dir / "images"
    if not (images / LABELS_FILE).is_file():
        write_collection(images, copies=DEMO_COPIES)
        log(f"generated the demo collection under {images}")
    checkpoint = train_tiny_clip(checkpoint_path(demo_dir / "checkpoints", training_recipe()), training_recipe(), log=log)
    labels = write_labelled_sample(images / LABELS_FILE, demo_dir / LABELLED_SAMPLE)
    settings = demo_settings(demo_dir, checkpoint, device, labels)
    write_env_file(demo_dir / "demo.env", settings)
    if (kept := set_aside_previous_store(DataLayout(settings.data_dir))) is not None:
        log(f"an earlier demo's review labels are kept as {kept}; this run's person starts afresh")

    # The repo's dagster.yaml keeps the instance under .dagster_home/, so `dagster dev` shows these runs.
    os.environ.setdefault("DAGSTER_HOME", str(REPO_ROOT))
    os.chdir(REPO_ROOT)
    batches = list_batches(settings.image_root)
    with dg.DagsterInstance.get() as instance:
        t = time.monotonic()
        defs = build_definitions(settings)
        materialize_everything(defs, instance, batches)
        materialize(defs, instance, [IMAGE_EVALUATION, THRESHOLD_CALIBRATION])  # the evaluation group, on the sample
        log(f"materialized prompt_files, prompt_centroids, {len(batches)} batches x 4 assets (manifest, embeddings, "
            f"classifications, index shard), near_duplicates, image_evaluation and threshold_calibration "
            f"in {time.monotonic() - t:.0f} s (labels: {len(read_labels_file(labels).labels)} images of {labels})")

    layout = DataLayout(settings.data_dir)
    summary = category_summary(layout)
    log("\nper category (from DuckDB image_classifications):")
    log(f"{'category':<10} {'images':>7} {'matched':>8} {'mean score':>11} {'max score':>10} {'threshold':>10}")
    for name, n, m, mean, mx, thr in summary:
        log(f"{name:<10} {n:>7} {m:>8} {mean:>11} {mx:>10} {thr:>10}")
    truth = read_labels(images / LABELS_FILE)
    scores = score_labels(matched_labels(layout), truth, [row[0] for row in summary])
    log(f"\n{'category':<10} {'precision':>9} {'recall':>7} {'F1':>6}")
    for s in scores:
        log(f"{s.category:<10} {s.precision:>9.3f} {s.recall:>7.3f} {s.f1:>6.3f}")
    f1 = macro_f1(scores)
    log(f"\nmacro F1 of matched labels against the ground truth ({len(truth)} images): {f1:.3f}")
    show_calibration(layout, images / LABELS_FILE, log)
    show_duplicates(layout, log)
    with dg.DagsterInstance.get() as instance:  # a person reviews through the app, and the pipeline learns
        review_loop(settings, defs, instance, batches, truth, [row[0] for row in summary], log)
    # The first text search loads the model and saves its text tower, so the reader's next search starts fast.
    log(f'\nclip-assets search "a red circle" -k 3:\n{format_table(search(settings, text="a red circle", k=3))}\n')
    log(f"DuckDB file: {layout.duckdb_path}")
    log(f"To browse in the UI: set -a; . {demo_dir / 'demo.env'}; set +a; DAGSTER_HOME=$PWD uv run dagster dev")
    log(f"demo finished in {time.monotonic() - started:.0f} s")
    return f1
