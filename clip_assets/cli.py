"""The `clip-assets` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clip-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="generate a sample collection, train a tiny model, run every asset, print F1")
    add_search_parser(sub)
    add_calibrate_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "search":
        return run_search(args)
    if args.command == "calibrate":
        return run_calibrate(args)
    import dagster

    # Dagster marks some APIs beta/preview; that is for developers of this package, not its users.
    warnings.filterwarnings("ignore", category=dagster.BetaWarning)
    warnings.filterwarnings("ignore", category=dagster.PreviewWarning)
    if args.command == "demo":
        from clip_assets.demo.run import run_demo

        run_demo()
    return 0


def add_search_parser(sub) -> None:
    p = sub.add_parser(
        "search",
        help="find the stored images most similar to a text or an image (reads the CLIP_ASSETS_* variables)",
    )
    p.add_argument("text", nargs="?", help='text query, e.g. "a red car"')
    p.add_argument("--image", type=Path, help="image query: a file to find similar images to")
    p.add_argument("-k", type=int, default=10, help="how many images (default 10)")
    p.add_argument("--batch", action="append", help="only this batch (repeatable)")
    p.add_argument("--category", help="only images whose classification matched this category")
    p.add_argument("--json", action="store_true", help="JSON lines: image_id, path, batch, score; best first")


def run_search(args) -> int:
    from clip_assets.search import NothingToSearchError, SearchModelMismatchError, format_table, search
    from clip_assets.settings import Settings

    if (args.text is None) == (args.image is None):
        print("clip-assets search: give a text query or --image PATH (one of them)", file=sys.stderr)
        return 2
    try:
        hits = search(
            Settings.from_env(), text=args.text, image=args.image, k=args.k, batches=args.batch, category=args.category
        )
    except (NothingToSearchError, SearchModelMismatchError, FileNotFoundError) as exc:
        print(f"clip-assets search: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for hit in hits:
            print(json.dumps(hit.as_dict()))
    else:
        print(format_table(hits))
    return 0


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="score the current thresholds against labelled images and propose calibrated ones",
    )
    p.add_argument("--labels", type=Path, required=True,
                   help="CSV or parquet: path (or image_id) and labels (categories separated by ';', or none)")
    p.add_argument("--target-precision", type=float,
                   help="the most recall at this precision, instead of the best F1")
    p.add_argument("--heldout-fraction", type=float, default=0.5,
                   help="share of the labelled images kept out of tuning to score before/after (default 0.5)")
    p.add_argument("--write", action="store_true",
                   help="write the proposal to <prompts dir>/calibrated_thresholds.toml (else print it)")


def run_calibrate(args) -> int:
    from clip_assets.calibration import (
        LabelsFileError, calibrate, evaluate_current, load_labelled_scores, read_labels_file, write_overrides,
    )
    from clip_assets.evaluation import macro_f1
    from clip_assets.layout import DataLayout
    from clip_assets.settings import Settings

    settings = Settings.from_env()
    try:
        data = load_labelled_scores(DataLayout(settings.data_dir), read_labels_file(args.labels))
        report = calibrate(data, args.target_precision, args.heldout_fraction)
    except LabelsFileError as exc:
        print(f"clip-assets calibrate: {exc}", file=sys.stderr)
        return 1
    if data.unmatched_labels:
        print(f"note: {len(data.unmatched_labels)} labelled images have no classifications and were left out, "
              f"e.g. {data.unmatched_labels[0]}")
    if data.unknown_categories:
        print(f"note: labels name categories no prompt file defines: {', '.join(data.unknown_categories)}")
    print(f"current thresholds on all {len(data.image_ids)} labelled images: macro F1 {macro_f1(evaluate_current(data)):.3f}")
    print(report.table())
    if args.write:
        print(f"wrote {write_overrides(report, settings.prompts_dir)}: prompt_centroids and image_classifications "
              "re-materialize with these thresholds (the automation sensor sees the prompt version change)")
    else:
        print("\n" + report.overrides_toml())
        print("(re-run with --write to save this as calibrated_thresholds.toml in the prompts folder)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
