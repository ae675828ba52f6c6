"""The `clip-assets` command.

A mistake of the user's (a bad option, a file that is not what it should be, data that is not there
yet) is reported in one line on stderr with a non-zero exit, never as a traceback: option errors
exit 2, and the project's own errors (every exception class defined in `clip_assets`, which carry
messages written for the user) exit 1. Anything else is a bug and keeps its traceback.

Each command imports only what it needs, inside its own function: `search` never imports Dagster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from clip_assets.errors import is_project_error

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class UsageError(Exception):
    """A command line that cannot be run as given: the message is the whole explanation."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (with where to look for help) instead of usage text and exit."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    commands = {"search": run_search, "serve": run_serve, "calibrate": run_calibrate, "adapt": run_adapt,
                "fine-tune": run_fine_tune, "demo": run_demo, "duplicates": run_duplicates}
    try:
        return commands[args.command](args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clip-assets {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not is_project_error(exc):
            raise
        print(f"clip-assets {args.command}: {exc}", file=sys.stderr)
        return 1


# Commands that leave nothing open when they return: the console script skips Python's teardown after
# them. With torch imported, the teardown is 0.4-0.8 s of a 4-5 s search from the shell.
FAST_EXIT_COMMANDS = {"search"}


def run() -> None:
    """The `clip-assets` console script: `main`, then for a search an exit without the interpreter's
    teardown, once the output is flushed."""
    code = main()
    if len(sys.argv) > 1 and sys.argv[1] in FAST_EXIT_COMMANDS:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="clip-assets", description="Classify and search image collections with OpenCLIP.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("demo", help="generate a sample collection, train a tiny model, run every asset, print F1")
    add_search_parser(sub)
    add_serve_parser(sub)
    add_calibrate_parser(sub)
    add_adapt_parser(sub)
    add_fine_tune_parser(sub)
    add_duplicates_parser(sub)
    return parser


# --- Option values checked by argparse, so a wrong one is refused before anything loads. --------


def _number(text: str, kind: type, ok, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def at_least_one(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a whole number of at least 1")


def open_fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < 1, "a fraction between 0 and 1 (e.g. 0.5)")


def precision_target(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "a precision above 0 and at most 1 (e.g. 0.9)")


def share_above_zero(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "a share above 0 and at most 1 (e.g. 0.5)")


def share_or_auto(text: str) -> float | None:
    return None if text.strip().lower() == "auto" else share_above_zero(text)


def positive_number(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a number above 0 (e.g. 0.0003)")


def port_number(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v <= 65535, "a port number from 0 to 65535")


def load_settings():
    """The settings from the environment, read here once and applied to the process (the CLI is an edge)."""
    from clip_assets.config.settings import Settings, SettingsError
    from clip_assets.process import configure_process

    try:
        settings = Settings.from_env()
    except SettingsError as exc:  # a CLIP_ASSETS_* value of the wrong type or out of range; names the variable
        raise UsageError("clip-assets: " + " ".join(str(exc).split())) from exc
    configure_process(settings)
    return settings


# --- search ---------------------------------------------------------------------------------------


def add_search_parser(sub) -> None:
    p = sub.add_parser(
        "search",
        help="find the stored images most similar to a text or an image (reads the CLIP_ASSETS_* variables)",
    )
    p.add_argument("text", nargs="?", help='text query, e.g. "a red car"')
    p.add_argument("--image", type=Path,
                   help="image query: a file, absolute or relative to here or to CLIP_ASSETS_IMAGE_ROOT (as search prints it)")
    p.add_argument("-k", type=at_least_one, default=10, help="how many images (default 10)")
    p.add_argument("--batch", action="append", help="only this batch (repeatable)")
    p.add_argument("--category", help="only images whose classification matched this category")
    p.add_argument("--json", action="store_true", help="JSON lines: image_id, path, batch, score; best first")
    p.add_argument("--timings", action="store_true",
                   help="print to stderr the seconds spent starting (interpreter and imports), loading the model and querying")
    p.add_argument("--exact", action="store_true", help="score every stored embedding, never the approximate index")


def run_search(args) -> int:
    if (args.text is None) == (args.image is None):
        raise UsageError("clip-assets search: give a text query or --image PATH (one of them)")
    from clip_assets.search.query import check_query, format_table, search

    check_query(args.text, args.image, args.k)  # an empty text is refused before torch is imported
    settings = load_settings()
    import clip_assets.model.clip_model  # noqa: F401  torch, which every query needs, is timed as start-up;
    # open_clip only when the model itself must load (see clip_assets.search.text_query_encoder), as model load

    imported = time.perf_counter()
    timings: dict[str, float] = {}
    damaged: list = []
    hits = search(settings, text=args.text, image=args.image, k=args.k, batches=args.batch,
                  category=args.category, timings=timings, exact=args.exact, damaged=damaged)
    for exc in damaged:  # left out of the search, which went on over the others
        print(f"clip-assets search: left out: {exc}", file=sys.stderr)
    if args.json:
        for hit in hits:
            print(json.dumps(hit.as_dict()))
    else:
        print(format_table(hits))
    if args.timings:
        print(format_timings(imported, timings), file=sys.stderr)
    return 0


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), so start-up includes the interpreter's own."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def format_timings(imported_at: float, timings: dict[str, float]) -> str:
    """One line: start-up (interpreter and imports, from the process's start), model load, query."""
    age = process_age_s()
    parts = []
    if age is not None:
        parts.append(f"start-up {age - (time.perf_counter() - imported_at):.2f} s (interpreter and imports)")
    parts.append(f"model load {timings['model_load_s']:.2f} s")
    parts.append(f"query {timings['encode_s'] + timings['scan_s']:.2f} s "
                 f"(encode {timings['encode_s']:.2f} s, scan {timings['scan_s']:.2f} s)")
    if age is not None:
        parts.append(f"total {age:.2f} s")
    return "timings: " + ", ".join(parts)


# --- duplicates -----------------------------------------------------------------------------------


def add_duplicates_parser(sub) -> None:
    p = sub.add_parser(
        "duplicates",
        help="the files a person's choices on the near-duplicate page leave to delete or move (nothing is deleted)",
    )
    p.add_argument("action", choices=["export"], help="export: write the list of files to remove, as CSV")
    p.add_argument("--out", type=Path, help="the CSV file to write (default: standard output)")
    p.add_argument("--tiers", default="exact,copy",
                   help="tiers whose choices count, comma-separated: exact, copy, look-alike (default exact,copy)")


def run_duplicates(args) -> int:
    from clip_assets.config.layout import DataLayout
    from clip_assets.search.duplicate_choices import files_to_remove, removal_tiers, removals_csv
    from clip_assets.storage.atomic_files import write_text_atomically
    from clip_assets.storage.warehouse import exists as warehouse_exists
    from clip_assets.storage.warehouse import read_duplicate_groups

    try:
        tiers = removal_tiers(args.tiers)
    except ValueError as exc:
        raise UsageError(f"clip-assets duplicates: --tiers: {exc}") from None
    layout = DataLayout(load_settings().data_dir)
    if not warehouse_exists(layout.duckdb_path):
        raise UsageError("clip-assets duplicates: no near-duplicate groups yet: materialize near_duplicates first")
    found = files_to_remove(layout.duplicate_choices_path, read_duplicate_groups(layout.duckdb_path, 10**9, tiers),
                            tiers)
    text = removals_csv(found)
    if args.out:
        write_text_atomically(text, args.out)
    else:
        sys.stdout.write(text)
    print(f"{len(found.rows)} files to delete or move, from the choices on {found.groups_chosen} groups "
          f"({', '.join(tiers)})" + (f"; {found.stale_choices} choices name a group that is gone or changed"
                                      if found.stale_choices else "") + (f": {args.out}" if args.out else ""),
          file=sys.stderr)
    return 0


# --- serve ----------------------------------------------------------------------------------------


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="the web app: search (text, upload, by example), gallery, near-duplicates, review")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")


def run_serve(args) -> int:
    from clip_assets.app.app import serve

    serve(load_settings(), args.host, args.port)
    return 0


# --- calibrate ------------------------------------------------------------------------------------


def add_labels_option(p) -> None:
    p.add_argument("--labels", type=Path, required=True,
                   help="CSV or parquet: path (or image_id) and labels (categories separated by ';', or none)")


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="score the current thresholds against labelled images and propose calibrated ones",
    )
    add_labels_option(p)
    p.add_argument("--target-precision", type=precision_target,
                   help="the most recall at this precision, instead of the best F1")
    p.add_argument("--heldout-fraction", type=open_fraction, default=0.5,
                   help="share of the labelled images kept out of tuning to score before/after (default 0.5)")
    p.add_argument("--write", action="store_true",
                   help="write the proposal to <prompts dir>/calibrated_thresholds.toml (else print it)")


def run_calibrate(args) -> int:
    from clip_assets.config.layout import DataLayout
    from clip_assets.tuning.calibration import calibrate, evaluate_current, load_labelled_scores, write_overrides
    from clip_assets.tuning.evaluation import macro_f1
    from clip_assets.tuning.labels_file import read_labels_file

    settings = load_settings()
    labels = read_labels_file(args.labels)
    data = load_labelled_scores(DataLayout(settings.data_dir), labels)
    report = calibrate(data, args.target_precision, args.heldout_fraction)
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


# --- adapt ----------------------------------------------------------------------------------------


def add_adapt_parser(sub) -> None:
    p = sub.add_parser(
        "adapt",
        help="fit few-shot adapters on labelled images' embeddings and score zero-shot, calibrated and adapted",
    )
    add_labels_option(p)
    p.add_argument("--shots", type=lambda t: _number(t, int, lambda v: v >= 0, "an integer >= 0"), default=None,
                   help="learn from at most this many labelled images per category of the tuning half "
                   "(default: CLIP_ASSETS_ADAPTER_SHOTS; 0: all)")
    p.add_argument("--heldout-fraction", type=open_fraction, default=0.5,
                   help="share of the labelled images kept out of every choice and fit, to score on (default 0.5)")


def run_adapt(args) -> int:
    from clip_assets.config.layout import DataLayout
    from clip_assets.storage.warehouse import read_centroids
    from clip_assets.tuning.adapter_evaluation import compare, load_labelled_embeddings
    from clip_assets.tuning.labels_file import read_labels_file

    settings = load_settings()
    layout = DataLayout(settings.data_dir)
    labels = read_labels_file(args.labels)
    centroids = read_centroids(layout.duckdb_path)
    shots = settings.adapter_shots if args.shots is None else args.shots
    data = load_labelled_embeddings(layout, labels, centroids, args.heldout_fraction)
    if data.without_embeddings:
        print(f"note: {len(data.without_embeddings)} labelled images have no embeddings of '{centroids.model}' and "
              f"were left out, e.g. {data.without_embeddings[0]}")
    if data.unknown_categories:
        print(f"note: labels name categories no prompt file defines: {', '.join(data.unknown_categories)}")
    started = time.process_time()
    report = compare(data, centroids, shots or None, heldout_fraction=args.heldout_fraction)
    print(report.table())
    print(f"(at most {shots} labelled images per category; " if shots else "(every tuning label; ", end="")
    print(f"choosing and fitting took {time.process_time() - started:.1f} CPU s. Set CLIP_ASSETS_LABELS and "
          "materialize category_adapters to classify with them.)")
    return 0


# --- fine-tune ------------------------------------------------------------------------------------


def add_fine_tune_parser(sub) -> None:
    p = sub.add_parser(
        "fine-tune",
        help="fine-tune the configured model on image-caption pairs (open_clip's contrastive loss) and write a checkpoint",
    )
    p.add_argument("--captions", type=Path, required=True,
                   help="CSV with columns path (relative to the image root) and caption; an image may have several rows")
    p.add_argument("--image-root", type=Path, help="where the captions' paths are (default: CLIP_ASSETS_IMAGE_ROOT)")
    p.add_argument("--lock-image", action="store_true",
                   help="lock the image tower and tune the text side only (LiT); default: tune both towers")
    p.add_argument("--epochs", type=at_least_one, default=5, help="passes over the training pairs (default 5)")
    p.add_argument("--lr", type=positive_number,
                   help="peak learning rate (default 0.0001 with --lock-image, else 0.00001: small steps for a pretrained model)")
    p.add_argument("--batch-size", type=at_least_one, default=64, help="pairs per step (default 64)")
    p.add_argument("--heldout-fraction", type=open_fraction, default=0.25,
                   help="share of the captioned images (by a hash of the path) never trained on, scored before/after "
                   "(default 0.25)")
    p.add_argument("--wise-alpha", type=share_or_auto, default=None,
                   help="share of the tuned weights in the checkpoint, the rest the base model's (WiSE-FT): less "
                   "forgetting of what the base model knew; 1: the tuned weights alone (default auto: the one "
                   "of 0.25, 0.5, 0.75, 1 that does best on a validation split of the training images)")


def run_fine_tune(args) -> int:
    from clip_assets.config import accepted_warnings

    accepted_warnings.ignore()
    from clip_assets.tuning.fine_tuning import FineTuneOptions, fine_tune_to_checkpoint, opt_in_note

    settings = load_settings()
    options = FineTuneOptions(lock_image=args.lock_image, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                              heldout_fraction=args.heldout_fraction, wise_alpha=args.wise_alpha)
    report = fine_tune_to_checkpoint(settings.model, settings.pretrained, args.captions,
                                     args.image_root or settings.image_root, settings.data_dir, options,
                                     settings.device, log=print)
    print(report.table())
    print(opt_in_note(report, settings.model))
    return 0


# --- demo -----------------------------------------------------------------------------------------


def run_demo(args) -> int:
    from clip_assets.config import accepted_warnings

    accepted_warnings.ignore()
    from clip_assets.demo.run import run_demo as demo

    demo(device=load_settings().device)
    return 0


if __name__ == "__main__":
    run()
