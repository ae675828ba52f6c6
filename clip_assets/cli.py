"""The `clip-assets` command."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clip-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="generate a sample collection, train a tiny model, run every asset, print F1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import dagster

    # Dagster marks some APIs beta/preview; that is for developers of this package, not its users.
    warnings.filterwarnings("ignore", category=dagster.BetaWarning)
    warnings.filterwarnings("ignore", category=dagster.PreviewWarning)
    if args.command == "demo":
        from clip_assets.demo.run import run_demo

        run_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
