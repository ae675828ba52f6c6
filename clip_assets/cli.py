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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "search":
        return run_search(args)
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


if __name__ == "__main__":
    sys.exit(main())
