"""How long `clip-assets search "..."` takes from the shell, and where the time goes.

Runs the command as a person does, in fresh processes, over the collection the CLIP_ASSETS_*
variables point at (after the demo: `set -a; . .demo/demo.env; set +a`):

- `.venv/bin/clip-assets search ... --timings`: wall clock, CPU seconds (user + system of the child),
  and the command's own split: start-up (interpreter and imports), model load, query;
- the same through `uv run --frozen`, which adds uv's own start-up (it checks the environment);
- with `--baseline REV`, the same command from that git revision's `clip_assets` (extracted to a
  temporary folder and put first on PYTHONPATH, same virtual environment), for a before/after ratio;
- the first text search with a model, which loads open_clip and saves the text tower
  (clip_assets.search.text_query_encoder): the saved tower is removed before each of these runs;
- floors for context: an empty interpreter, `import torch` (what a search with a saved text tower
  needs) and `import torch, torchvision`, which open_clip needs.

The ways run interleaved, `--runs` rounds, and the medians are printed with the load average at the
start and the end: on a shared machine compare CPU seconds, or take the wall figures as provisional.

    set -a; . .demo/demo.env; set +a
    uv run python benchmarks/search_startup.py --runs 5 --baseline HEAD~1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clip_assets.config.layout import DataLayout

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
FIRST_SEARCH = "first search (no saved text tower)"
TIMINGS = re.compile(r"start-up ([\d.]+) s .*model load ([\d.]+) s, query ([\d.]+) s")


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall and CPU seconds of one run, and the split the command prints with --timings."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    out = {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    found = TIMINGS.search(done.stderr)
    if found:
        out.update(start_up=float(found[1]), model_load=float(found[2]), query=float(found[3]))
    return out


def uv_command() -> list[str]:
    """uv as the README runs it: on PATH, or the module of the python3 on PATH."""
    found = shutil.which("uv")
    return [found] if found else [shutil.which("python3") or "python3", "-m", "uv"]


def extract(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", rev, "clip_assets"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--query", default="a red circle")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", help="git revision to compare with (its clip_assets, this venv)")
    args = parser.parse_args()
    if "CLIP_ASSETS_DATA_DIR" not in os.environ:
        sys.exit("point the CLIP_ASSETS_* variables at a classified collection first (e.g. . .demo/demo.env)")
    env = dict(os.environ)
    saved_text_towers = DataLayout(Path(os.environ["CLIP_ASSETS_DATA_DIR"])).text_query_encoder_dir
    search = ["search", args.query, "-k", "5"]
    ways: dict[str, tuple[list[str], dict[str, str]]] = {
        "python -c pass": ([str(VENV_BIN / "python"), "-c", "pass"], env),
        "import torch": ([str(VENV_BIN / "python"), "-c", "import torch"], env),
        FIRST_SEARCH: ([str(VENV_BIN / "clip-assets"), *search, "--timings"], env),
        "import torch, torchvision": ([str(VENV_BIN / "python"), "-c", "import torch, torchvision"], env),
        ".venv/bin/clip-assets search": ([str(VENV_BIN / "clip-assets"), *search, "--timings"], env),
        "uv run clip-assets search": ([*uv_command(), "run", "--frozen", "clip-assets", *search, "--timings"], env),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            old = extract(args.baseline, Path(tmp))
            ways[f"baseline {args.baseline}: .venv/bin/clip-assets search"] = (
                # its own entry point, as its console script ran it (this venv's script calls today's)
                [str(VENV_BIN / "python"), "-P", "-c", "import sys; from clip_assets.cli import main; sys.exit(main(sys.argv[1:]))",
                 *search], {**env, "PYTHONPATH": str(old)})
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
        results: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
        for _ in range(args.runs):
            for name, (cmd, run_env) in ways.items():
                if name == FIRST_SEARCH:  # the model loads and saves its text tower; later ways find it
                    shutil.rmtree(saved_text_towers, ignore_errors=True)
                results[name].append(timed(cmd, run_env))
        print(f"load average at end:   {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(json.dumps(results))  # every run, for a second look
    print(f"\nmedians of {args.runs} runs, seconds")
    print(f"{'way':<48} {'wall':>7} {'cpu':>7} {'start-up':>9} {'model':>7} {'query':>7}")
    for name, runs in results.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        split = (f"{med['start_up']:>9.2f} {med['model_load']:>7.2f} {med['query']:>7.2f}"
                 if "start_up" in med else "")
        print(f"{name:<48} {med['wall']:>7.2f} {med['cpu']:>7.2f} {split}")
    if args.baseline:
        new = results[".venv/bin/clip-assets search"]
        old = results[f"baseline {args.baseline}: .venv/bin/clip-assets search"]
        for key in ("wall", "cpu"):
            ratio = statistics.median(r[key] for r in old) / statistics.median(r[key] for r in new)
            print(f"baseline / now, {key}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
