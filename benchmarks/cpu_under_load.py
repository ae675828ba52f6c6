"""Torch processes sharing the cores: wall and CPU seconds with 1, 2 and 3 copies at once, ours against a baseline.

    python benchmarks/cpu_under_load.py [--baseline DIR] [--copies 1 2 3] [--work training embedding]
        [--samples 1500 --epochs 2]

Each work item runs as its own process, `copies` of it started together; the table gives per copy
the median wall seconds and the mean CPU seconds (user+sys, from the kernel's accounting of that
child, all its threads). "ours" runs this checkout; "baseline" runs the package at --baseline (a
git worktree of an older commit, e.g. `git worktree add /tmp/base 2197b61`), so the two differ only
in the code; with --spinning, "ours-spin" runs this checkout with OpenMP's idle threads spinning as
before the policy (clip_assets.cpu_threads), so the two differ only in the policy. The work:
- training: the demo's tiny model trained on generated pairs with the demo's recipe, shortened
  (--samples, --epochs), into a fresh temp checkpoint;
- embedding: two batches of the demo collection (120 images each) listed and encoded by the plain
  step functions, with a randomly initialised demo model, into a fresh data folder.
Figures from one run of this script on one machine compare with each other only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The shell's environment, as the copies get it: importing clip_assets here sets OMP_WAIT_POLICY in this
# process (clip_assets.cpu_threads), which the baseline's copies must not inherit.
SHELL_ENV = dict(os.environ)

TRAINING = """
import sys, tempfile
from pathlib import Path
import clip_assets
from clip_assets.demo.train import train_tiny_clip, training_recipe
recipe = training_recipe(samples=int(sys.argv[1]), epochs=int(sys.argv[2]))
train_tiny_clip(Path(tempfile.mkdtemp()) / "tiny.pt", recipe, log=lambda line: None)
"""

EMBEDDING = """
import sys, tempfile
from pathlib import Path
import clip_assets, open_clip, torch
from clip_assets.config.layout import DataLayout
from clip_assets.demo.train import DEMO_MODEL
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.steps import write_manifest
from clip_assets.model.clip_model import load_clip_model, register_model_configs
work = Path(tempfile.mkdtemp())
images = Path(sys.argv[3])
register_model_configs()
torch.manual_seed(0)
torch.save({"state_dict": open_clip.create_model(DEMO_MODEL).state_dict()}, work / "random.pt")
clip = load_clip_model(DEMO_MODEL, str(work / "random.pt"), "cpu")
layout = DataLayout(work / "data")
for batch in ("batch-001", "batch-002"):
    write_manifest(images, layout, batch)
    write_embeddings(clip, images, layout, batch, EncodeOptions(), report=lambda line: None)
"""


def run_copies(code_dir: Path, script: str, args: list[str], copies: int, extra_env: dict | None = None
               ) -> list[tuple[float, float]]:
    """(wall s, CPU s) of each of `copies` processes started together."""
    env = {**SHELL_ENV, "PYTHONPATH": str(code_dir), **(extra_env or {})}
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=code_dir) for _ in range(copies)]
    out = {}
    while len(out) < copies:
        pid, status, usage = os.wait4(-1, 0)
        if status != 0:
            raise SystemExit(f"a copy failed (status {status}) in {code_dir}")
        out[pid] = (time.monotonic() - started, usage.ru_utime + usage.ru_stime)
    return [out[p.pid] for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--work", nargs="+", default=["training", "embedding"], choices=["training", "embedding"])
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--spinning", action="store_true",
                        help="also run this checkout with libgomp's default spinning (GOMP_SPINCOUNT=300000), "
                        "which the policy leaves alone when set: the policy's effect alone, without other changes")
    args = parser.parse_args()
    from clip_assets.demo.shapes import write_collection  # after SHELL_ENV was taken

    images = Path(tempfile.mkdtemp()) / "images"
    write_collection(images, batches=2)  # torch is not imported in this process: it only starts the copies
    code = [("ours", REPO, None)] + ([("baseline", args.baseline, None)] if args.baseline else [])
    if args.spinning:
        code.append(("ours-spin", REPO, {"GOMP_SPINCOUNT": "300000"}))
    print(f"{os.cpu_count()} cores; OMP_WAIT_POLICY in this shell: {SHELL_ENV.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"{'work':<10} {'code':<9} {'copies':>6} {'wall s (median)':>16} {'CPU s (mean)':>13}")
    for work in args.work:
        script, work_args = (TRAINING, [str(args.samples), str(args.epochs)]) if work == "training" else (
            EMBEDDING, ["", "", str(images)])
        for copies in args.copies:
            for name, directory, extra_env in code:
                figures = run_copies(directory, script, work_args, copies, extra_env)
                wall = statistics.median(w for w, _ in figures)
                cpu = statistics.mean(c for _, c in figures)
                print(f"{work:<10} {name:<9} {copies:>6} {wall:>16.1f} {cpu:>13.1f}", flush=True)


if __name__ == "__main__":
    main()
