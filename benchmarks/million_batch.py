"""One batch of 1,000,000 images: classification through `dagster asset materialize`, then text search.

Synthesises the batch's manifest and embeddings in the project's own layout (clustered unit vectors
of the tiny registered model's dimension, its model identity, as the embedding step writes them:
the encoder is skipped), a prompt file of 50 categories, and the prompt centroids (in this process).
Then, as a user runs them:

- `dagster asset materialize --select image_classifications --partition <batch>` in a subprocess
  with a temporary DAGSTER_HOME: wall seconds, CPU seconds (user + system of the process tree) and
  peak memory (the largest sum of RSS over the process tree, sampled from /proc every 0.1 s, and
  the largest single process's ru_maxrss);
- `clip-assets search "<text>"` from the shell (start-up included), a few times;
- `clip_assets.search.query.search` in this process with the model loaded, a few times;

and prints each figure beside its target. The machine's load average is printed at start and end:
on a shared machine, read CPU seconds beside wall.

    uv run python benchmarks/million_batch.py [--images 1000000] [--categories 50] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
TINY = "clip-assets-tiny"
BATCH = "million"
GIB = 1 << 30
QUERY = "a red car on a street"
WORDS = ("car bicycle boat train plane bus truck horse dog cat bird fish tree flower house bridge mountain "
         "river beach forest city street road desert snow rain sunset night kitchen bedroom office "
         "garden park stadium market church castle tower lake island field farm cow sheep chair table "
         "book phone computer guitar piano").split()


def write_prompts(folder: Path, categories: int) -> None:
    """One multi_label file: every category with positives, every other with negatives, a shared neutral set."""
    lines = ['threshold = 0.0', 'neutral_margin = 0.0', 'neutral = ["a photo", "an image of something"]', ""]
    for i in range(categories):
        word = WORDS[i % len(WORDS)] + ("" if i < len(WORDS) else f"_{i}")
        lines.append(f"[categories.{word}]")
        lines.append(f'positive = ["a photo of a {word}", "a {word}", "a picture of a {word}"]')
        if i % 2 == 0:
            lines.append(f'negative = ["a drawing of a {word}", "a toy {word}"]')
        lines.append("")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.toml").write_text("\n".join(lines))


def tree_rss_bytes(root: int) -> int:
    """Sum of the resident memory of `root` and all its descendants, from /proc."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


def run_measured(cmd: list[str], env: dict[str, str]) -> dict:
    """Wall, CPU (user + sys of the children) and peak tree RSS of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    wall = time.perf_counter() - started
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}")
    return {
        "wall": wall,
        "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "tree_rss": peak[0],
        "max_rss": after.ru_maxrss * 1024,  # the largest child process so far (Linux: kB)
        "output": output,
    }


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--categories", type=int, default=50)
    parser.add_argument("--searches", type=int, default=3, help="CLI and in-process searches (medians printed)")
    parser.add_argument("--work", type=Path, help="folder for the data (default: a temp dir, removed after)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="clip-assets-million-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    try:
        run(args, work)
    finally:
        print(f"load average at end:   {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    import dagster as dg
    import open_clip
    import torch

    from clip_assets.classification.steps import write_centroids
    from clip_assets.model.clip_model import load_clip_model, register_model_configs
    from clip_assets_tests.support.scratch_instance import SCRATCH_INSTANCE_YAML
    from clip_assets.config.layout import DataLayout
    from clip_assets.search.query import search
    from clip_assets.config.settings import Settings
    from clip_assets_tests.support.synthetic_embeddings import write_synthetic_batch
    from clip_assets.storage.warehouse import connect

    register_model_configs()
    torch.manual_seed(0)
    checkpoint = work / "tiny-seed0.pt"
    torch.save({"state_dict": open_clip.create_model(TINY).state_dict()}, checkpoint)
    clip = load_clip_model(TINY, str(checkpoint), "cpu")
    layout = DataLayout(work / "data")
    prompts = work / "prompts"
    write_prompts(prompts, args.categories)
    images_root = work / "images"
    (images_root / BATCH).mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    write_synthetic_batch(layout, BATCH, args.images, clip.embed_dim, clip.identity)
    size = layout.embeddings_path(BATCH).stat().st_size
    print(f"synthesised {args.images:,} embeddings x {clip.embed_dim} ({size / 1e6:,.0f} MB parquet) "
          f"and their manifest in {time.perf_counter() - t:.1f} s")
    write_centroids(clip, prompts, layout)

    home = work / "dagster_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(SCRATCH_INSTANCE_YAML.format(home=home))
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "CLIP_ASSETS_IMAGE_ROOT": str(images_root),
        "CLIP_ASSETS_DATA_DIR": str(layout.data_dir),
        "CLIP_ASSETS_PROMPTS_DIR": str(prompts),
        "CLIP_ASSETS_MODEL": TINY,
        "CLIP_ASSETS_PRETRAINED": str(checkpoint),
        "CLIP_ASSETS_DEVICE": "cpu",
    }
    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("image_batches", [BATCH])

    classify = run_measured(
        [str(VENV_BIN / "dagster"), "asset", "materialize", "--select", "image_classifications",
         "--partition", BATCH, "-m", "clip_assets.definitions"], env)
    with connect(layout.duckdb_path, read_only=True) as con:
        rows = con.execute("SELECT count(*) FROM image_classifications WHERE batch = ?", [BATCH]).fetchone()[0]
    duckdb_mb = layout.duckdb_path.stat().st_size / 1e6
    print(f"\nclassification via `dagster asset materialize` of {args.images:,} images x {args.categories} "
          f"categories = {rows:,} rows (DuckDB file {duckdb_mb:,.0f} MB):")
    print(f"  wall {classify['wall']:7.1f} s   (target <= 60 s: {verdict(classify['wall'] <= 60)})   "
          f"CPU {classify['cpu']:.1f} s (user+sys)")
    print(f"  peak memory {classify['tree_rss'] / GIB:5.2f} GiB summed over the process tree "
          f"(largest process {classify['max_rss'] / GIB:.2f} GiB)   "
          f"(target < 3 GiB: {verdict(max(classify['tree_rss'], classify['max_rss']) < 3 * GIB)})")
    print("  before this work: 147 s and 1.1 GiB")

    cli = [run_measured([str(VENV_BIN / "clip-assets"), "search", QUERY, "--timings"], env)
           for _ in range(args.searches)]
    walls = [r["wall"] for r in cli]
    split = [line for line in cli[-1]["output"].splitlines() if "start-up" in line]
    print(f"\n`clip-assets search \"{QUERY}\"` over the batch, {args.searches} runs:")
    print(f"  wall median {statistics.median(walls):.2f} s (runs: {', '.join(f'{w:.2f}' for w in walls)})   "
          f"(target < 5 s: {verdict(statistics.median(walls) < 5)})   "
          f"CPU median {statistics.median(r['cpu'] for r in cli):.2f} s")
    print(f"  last run's own split: {split[-1].strip() if split else '(none printed)'}")
    print("  before this work: 17 s")

    settings = Settings(image_root=images_root, data_dir=layout.data_dir, prompts_dir=prompts, model=TINY,
                        pretrained=str(checkpoint), device="cpu")
    seconds, cpu = [], []
    for _ in range(args.searches + 1):  # the first builds the search rows file: reported apart
        c0, t0 = time.process_time(), time.perf_counter()
        hits = search(settings, text=QUERY, clip=clip)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    warm = seconds[1:]
    print(f"\nin-process search (model loaded), {len(warm)} runs after a first of {seconds[0]:.2f} s:")
    print(f"  median {statistics.median(warm):.3f} s (runs: {', '.join(f'{s:.3f}' for s in warm)})   "
          f"(target < 0.5 s: {verdict(statistics.median(warm) < 0.5)})   CPU median {statistics.median(cpu[1:]):.3f} s")
    print(f"  best hit: {hits[0].path} {hits[0].score:.4f}")


if __name__ == "__main__":
    main()
