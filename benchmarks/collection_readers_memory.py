"""Peak memory of the steps that read the whole collection's classifications: gallery, calibration, evaluation.

Synthesises (or reuses, with `--work`) a DuckDB file with the classifications of N images x C
categories (random similarities; a fifth of the categories single_label), the batches' manifests
(paths), and a labels file naming L of the images, in the project's own layout. Then runs each
reader in a fresh Python process and prints its wall and CPU seconds and peak memory (the child's
VmHWM), with the memory the same process has after the imports alone, so the difference is
what the reader itself holds:

- `gallery.gallery_rows` over the whole collection (the classification_gallery asset's query: the
  best 12 matches and 6 near misses per condition per category);
- `calibration.load_labelled_scores` then `calibration.calibrate` (threshold_calibration);
- `calibration.load_labelled_scores` then `calibration.evaluate_current` (image_evaluation).

Run it twice with the same `--work` to compare code: as is, and with PYTHONPATH pointing at another
checkout (e.g. `PYTHONPATH=/work/main`), whose clip_assets the child processes then import.

    uv run python benchmarks/collection_readers_memory.py [--images 1000000] [--categories 50]
        [--labelled 2000] [--batches 4] [--work DIR (kept, reused)]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from working_folder import working_folder  # noqa: E402

MIB = 1 << 20

READERS = {
    "imports only": "pass",
    "gallery_rows, whole collection": "from clip_assets.pages.gallery import gallery_rows\n"
                                      "rows = gallery_rows(layout, 12, 6)\n"
                                      "out = sum(len(v) for v in rows.values())",
    "load_labelled_scores + calibrate": "from clip_assets.tuning import calibration as cal, labels_file\n"
                                        "data = cal.load_labelled_scores(layout, labels_file.read_labels_file(labels))\n"
                                        "out = cal.calibrate(data).heldout_images",
    "load_labelled_scores + evaluate_current": "from clip_assets.tuning import calibration as cal, labels_file\n"
                                               "data = cal.load_labelled_scores(layout, labels_file.read_labels_file(labels))\n"
                                               "out = len(cal.evaluate_current(data))",
}

CHILD = """
import sys, time
from pathlib import Path
import clip_assets, clip_assets.pages.gallery, clip_assets.tuning.calibration  # imported before the clock starts
from clip_assets.config.layout import DataLayout
layout, labels = DataLayout(Path(sys.argv[1])), Path(sys.argv[2])
out = None
t, c = time.perf_counter(), time.process_time()
{body}
# VmHWM: this process's own peak (ru_maxrss can carry the parent's peak across fork and exec)
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("RESULT", time.perf_counter() - t, time.process_time() - c, hwm, out, Path(clip_assets.__file__).parent)
"""


def synthesise(work: Path, images: int, categories: int, labelled: int, batches: int) -> None:
    from clip_assets.config.layout import DataLayout
    from clip_assets.storage.warehouse import connect

    layout = DataLayout(work / "data")
    layout.manifest_dir.mkdir(parents=True, exist_ok=True)
    per_batch = -(-images // batches)
    single = {c for c in range(categories) if c % 5 == 4}
    with connect(layout.duckdb_path) as con:
        con.execute("DELETE FROM prompt_categories; DELETE FROM image_classifications")
        con.executemany(
            "INSERT INTO prompt_categories VALUES (?, ?, 'bench.toml', ?, ?, ?, 2, 100.0, 'bench', 'v1')",
            [(f"cat{c:03d}", c, "single_label" if c in single else "multi_label", 0.5 if c in single else 0.05, 0.0)
             for c in range(categories)],
        )
        con.execute(f"""
            CREATE TEMP TABLE ids AS
            SELECT i, 'b' || lpad((i // {per_batch})::VARCHAR, 3, '0') AS batch, md5(i::VARCHAR)[:16] AS image_id
            FROM range({images}) t(i)""")
        con.execute(f"""
            INSERT INTO image_classifications
            SELECT batch, image_id, p.category, p.mode, pos, neg, neu, score,
                   CASE WHEN p.mode = 'single_label' THEN prob END, NULL, p.threshold, p.neutral_margin,
                   CASE WHEN p.mode = 'single_label' THEN prob >= p.threshold
                        ELSE score >= p.threshold AND pos >= neu + p.neutral_margin END,
                   'bench', 'v1', 'none', NULL, NULL, NULL
            FROM (SELECT ids.*, p.category, p.mode, p.threshold, p.neutral_margin,
                         (0.2 + random() * 0.1)::FLOAT AS pos, (0.2 + random() * 0.1)::FLOAT AS neg,
                         (0.2 + random() * 0.1)::FLOAT AS neu, (random() * 0.2 - 0.1)::FLOAT AS score,
                         random()::FLOAT AS prob
                  FROM ids CROSS JOIN prompt_categories p) p""")
        for b in range(batches):
            con.execute(f"""
                COPY (SELECT image_id, batch || '/' || lpad((i // 1000)::VARCHAR, 4, '0') || '/img-' || i || '.jpg' AS path,
                             40000::BIGINT AS size, 1.7e9::DOUBLE AS mtime, 'ok' AS status, NULL::VARCHAR AS error
                      FROM ids WHERE batch = 'b{b:03d}')
                TO '{layout.manifest_path(f"b{b:03d}")}' (FORMAT parquet)""")
        con.execute(f"""
            COPY (SELECT batch || '/' || lpad((i // 1000)::VARCHAR, 4, '0') || '/img-' || i || '.jpg' AS path,
                         CASE WHEN i % 3 = 0 THEN 'none' ELSE 'cat' || lpad((i % {categories})::VARCHAR, 3, '0') END
                         AS labels
                  FROM ids USING SAMPLE {labelled} ROWS (reservoir, 7))
            TO '{work / "labels.csv"}' (FORMAT csv, HEADER)""")
    (work / "synthesised").write_text(f"{images} {categories} {labelled} {batches}\n")


def run_reader(body: str, work: Path) -> tuple[float, float, float, str, str]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(body=body), str(work / "data"), str(work / "labels.csv")],
        capture_output=True, text=True, check=True,
        cwd=work,  # `-c` puts the current folder first on sys.path: not a checkout's, so PYTHONPATH decides
    ).stdout.rsplit("RESULT", 1)[1].split()  # (DuckDB's progress bar may print before it)
    return float(out[0]), float(out[1]), int(out[2]) * 1024 / MIB, out[3], out[4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--categories", type=int, default=50)
    parser.add_argument("--labelled", type=int, default=2_000)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--work", type=Path, help="where the data goes (kept and reused); default a temp dir, removed")
    args = parser.parse_args()
    with working_folder(args.work, "clip-assets-readers-") as work:
        wanted = f"{args.images} {args.categories} {args.labelled} {args.batches}\n"
        if not (work / "synthesised").is_file() or (work / "synthesised").read_text() != wanted:
            t = time.perf_counter()
            synthesise(work, args.images, args.categories, args.labelled, args.batches)
            print(f"synthesised {args.images:,} images x {args.categories} categories in {time.perf_counter() - t:.1f} s")
        import clip_assets

        print(f"clip_assets from {Path(clip_assets.__file__).parent} (the readers' processes too); {args.images:,} images x {args.categories} "
              f"categories = {args.images * args.categories:,} classification rows, {args.labelled:,} labelled")
        base = None
        for label, body in READERS.items():
            wall, cpu, peak, out, package = run_reader(body, work)
            assert package == str(Path(clip_assets.__file__).parent), (package, clip_assets.__file__)
            base = peak if base is None else base
            print(f"  {label:<42} {wall:6.1f} s wall {cpu:6.1f} s CPU  peak {peak:7.0f} MiB "
                  f"({peak - base:+6.0f} MiB over the imports)  [{out}]")


if __name__ == "__main__":
    main()
