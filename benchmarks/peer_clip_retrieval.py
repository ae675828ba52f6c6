"""The engine beside its peer, clip-retrieval, on one corpus and one checkpoint, in one run.

Four ways to embed the same photo-like JPEGs (640x480 up to 4000x3000) with the same open_clip
checkpoint (random weights: throughput does not depend on them), each as a fresh process, as a
user would start it:

- naive: a plain open_clip loop (PIL open, the model's preprocess, batched encode);
- clip-retrieval: `clip-retrieval inference` from its own venv (created on first use, outside the
  repo: `pip install clip-retrieval 'setuptools<70'`), local weights as `open_clip:ARCH//path.pt`,
  its default batch size and workers, text off;
- engine, direct: `write_embeddings` in a fresh Python process, no Dagster;
- engine, Dagster: `dagster asset materialize --select image_embeddings --partition <batch>` with a
  temporary DAGSTER_HOME, as users run it.

Each runs on the whole corpus and on a batch of one image. The one-image run is the start-up
(launch to first image encoded: imports, model load, workers, Dagster's run and step set-up). The
steady rate is measured two ways:

- (N - 1) / (time for N - time for 1), the start-up taken out of every contestant the same way. This
  fails for clip-retrieval: after its 24 s warm-up it spends about 19 s more on a single image (its
  spawned logger processes start beside the work), a cost hidden under the work of a larger run, so
  the figure swung from 39 to 143 images/s between runs on a quiet machine.
- with `--copies A B` (default 3 and 6): the corpus listed A and B times over (each copy with a byte
  appended after the JPEG's end, so no tool can tell it is a copy), the steady rate being
  (B - A) x N / (time for B copies - time for A copies): two runs large enough that the work hides
  nothing, with the same start-up. `--copies` with no values skips it.

For the Dagster run, the run's event log also says where its start-up went.

    uv run python benchmarks/peer_clip_retrieval.py                  # 288 images, ViT-S-32
    uv run python benchmarks/peer_clip_retrieval.py --engine-code /path/to/other/checkout

Timings are only worth comparing on a quiet machine: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed_throughput import SIZES, make_images  # noqa: E402

from clip_assets_tests.support.scratch_instance import SCRATCH_INSTANCE_YAML  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path.home() / ".cache" / "clip-assets-bench"
PEER_REQUIREMENTS = ["clip-retrieval", "setuptools<70"]  # setuptools 70 dropped pkg_resources APIs it uses

NAIVE = textwrap.dedent(
    """
    import sys, torch, open_clip
    from pathlib import Path
    from PIL import Image
    arch, ckpt, folder, batch = sys.argv[1], sys.argv[2], Path(sys.argv[3]), 64
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=ckpt)
    model.eval()
    files = sorted(folder.glob("*.jpg"))
    with torch.inference_mode():
        for b in range(0, len(files), batch):
            pixels = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files[b:b + batch]])
            model.encode_image(pixels)
    """
)

ENGINE_DIRECT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from clip_assets.embedding.steps import write_embeddings
    from clip_assets.ingest.steps import write_manifest
    from clip_assets.model.clip_model import load_clip_model
    from clip_assets.config.layout import DataLayout
    from clip_assets.config.settings import Settings
    from clip_assets.embedding.options import EncodeOptions
    from clip_assets.process import configure_process
    settings = Settings.from_env()
    configure_process(settings)
    clip = load_clip_model(settings.model, settings.pretrained, settings.device)
    write_embeddings(clip, settings.image_root, DataLayout(settings.data_dir), sys.argv[1],
                     EncodeOptions.from_settings(settings))
    """
)

PREPARE_BATCH = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from clip_assets.ingest.steps import write_manifest
    from clip_assets.config.layout import DataLayout
    write_manifest(Path(sys.argv[1]), DataLayout(Path(sys.argv[2])), sys.argv[3])
    """
)

REGISTER_PARTITION = textwrap.dedent(
    """
    import sys
    import dagster as dg
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("image_batches", [sys.argv[1]])
    """
)

RUN_EVENTS = textwrap.dedent(
    """
    import json, sys
    import dagster as dg
    with dg.DagsterInstance.get() as instance:
        run = instance.get_runs(limit=1)[0]
        out = [{"t": e.timestamp, "event": e.dagster_event.event_type_value if e.dagster_event else "log",
                "message": (e.user_message or "")[:160]} for e in instance.all_logs(run.run_id)]
    print(json.dumps({"status": run.status.value, "events": out}))
    """
)

def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def peer_python(venv: Path) -> Path:
    """clip-retrieval's own venv: created once with pip (uv's pip where there is uv, for speed)."""
    python = venv / "bin" / "python"
    if (venv / "bin" / "clip-retrieval").exists():
        return python
    print(f"installing {' '.join(PEER_REQUIREMENTS)} into {venv} (once)", flush=True)
    uv = shutil.which("uv")
    try:
        uv_cmd = [uv] if uv else [sys.executable, "-m", "uv"]
        subprocess.run([*uv_cmd, "venv", "--python", f"{sys.version_info.major}.{sys.version_info.minor}", str(venv)],
                       check=True, capture_output=True)
        subprocess.run([*uv_cmd, "pip", "install", "--python", str(python), *PEER_REQUIREMENTS], check=True)
    except (OSError, subprocess.CalledProcessError):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_REQUIREMENTS], check=True)
    return python


def save_checkpoint(arch: str, path: Path) -> Path:
    if not path.exists():
        import open_clip
        import torch

        torch.manual_seed(0)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": open_clip.create_model(arch).state_dict()}, path)
    return path


def one_image_batch(corpus: Path, root: Path) -> Path:
    """A batch folder holding the corpus's first image (a hard link): the start-up run's input."""
    folder = root / "one"
    folder.mkdir(parents=True, exist_ok=True)
    first = sorted(corpus.glob("*.jpg"))[0]
    if not (folder / first.name).exists():
        os.link(first, folder / first.name)
    return folder


def copies_batch(corpus: Path, root: Path, copies: int) -> str:
    """A batch folder holding the corpus `copies` times over: the first copy hard links, each other one
    the same JPEG with `k` bytes appended after its end (a different file to every tool, the same
    pixels). Returns the batch name."""
    name = f"photos-x{copies}"
    folder = root / name
    sources = sorted(corpus.glob("*.jpg"))
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) != copies * len(sources):
        shutil.rmtree(folder)  # made from a corpus of another size
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        for k in range(copies):
            target = folder / f"c{k}-{source.name}"
            if target.exists():
                continue
            if k == 0:
                os.link(source, target)
            else:
                target.write_bytes(source.read_bytes() + bytes(k))
    return name


def timed(cmd: list[str], env: dict, cwd: Path = REPO) -> tuple[float, float, subprocess.CompletedProcess]:
    """(launch time as time.time(), wall seconds, the finished process); fails loudly with its output."""
    launched, start = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return launched, wall, proc


class Contestants:
    def __init__(self, args, corpus_root: Path, checkpoint: Path, work: Path):
        self.args, self.root, self.checkpoint, self.work = args, corpus_root, checkpoint, work
        self.engine_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(args.engine_code), os.environ.get("PYTHONPATH")])),
            "CLIP_ASSETS_IMAGE_ROOT": str(corpus_root),
            "CLIP_ASSETS_PROMPTS_DIR": str(REPO / "prompts"),
            "CLIP_ASSETS_MODEL": args.model,
            "CLIP_ASSETS_PRETRAINED": str(checkpoint),
            "CLIP_ASSETS_DEVICE": args.device,
            "CLIP_ASSETS_NUM_WORKERS": str(args.workers),
        }
        self.dagster_runs: dict[str, tuple[list[dict], float]] = {}  # batch -> (run events, launch time)

    def naive(self, batch: str) -> float:
        cmd = [sys.executable, "-c", NAIVE, self.args.model, str(self.checkpoint), str(self.root / batch)]
        return timed(cmd, {**os.environ, "CUDA_VISIBLE_DEVICES": "" if self.args.device == "cpu" else
                           os.environ.get("CUDA_VISIBLE_DEVICES", "")})[1]

    def clip_retrieval(self, batch: str) -> float:
        out = self.work / f"clip-retrieval-{batch}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(self.args.peer_venv / "bin" / "clip-retrieval"), "inference",
               "--input_dataset", str(self.root / batch), "--output_folder", str(out),
               "--clip_model", f"open_clip:{self.args.model}/{self.checkpoint}", "--enable_text", "False"]
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if self.args.device == "cpu" else
               os.environ.get("CUDA_VISIBLE_DEVICES", "")}
        env.pop("PYTHONPATH", None)
        _, wall, proc = timed(cmd, env, cwd=self.work)
        if not list(out.glob("img_emb/*.npy")):
            raise SystemExit(f"clip-retrieval wrote no embeddings:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return wall

    def _data_dir(self, name: str, batch: str) -> Path:
        """A fresh data dir holding the batch's manifest (written before the clock starts)."""
        data = self.work / f"{name}-{batch}"
        shutil.rmtree(data, ignore_errors=True)
        subprocess.run([sys.executable, "-c", PREPARE_BATCH, str(self.root), str(data), batch],
                       env=self.engine_env, cwd=self.args.engine_code, check=True)
        return data

    def engine_direct(self, batch: str) -> float:
        env = {**self.engine_env, "CLIP_ASSETS_DATA_DIR": str(self._data_dir("direct", batch))}
        return timed([sys.executable, "-c", ENGINE_DIRECT, batch], env, cwd=self.args.engine_code)[1]

    def engine_dagster(self, batch: str) -> float:
        home = self.work / f"dagster-home-{batch}"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        (home / "dagster.yaml").write_text(SCRATCH_INSTANCE_YAML.format(home=home))
        env = {**self.engine_env, "DAGSTER_HOME": str(home),
               "CLIP_ASSETS_DATA_DIR": str(self._data_dir("dagster", batch))}
        subprocess.run([sys.executable, "-c", REGISTER_PARTITION, batch], env=env, cwd=self.args.engine_code,
                       check=True)
        dagster = Path(sys.executable).parent / "dagster"
        cmd = [str(dagster), "asset", "materialize", "--select", "image_embeddings", "--partition", batch,
               "-m", "clip_assets.definitions"]
        launched, wall, _ = timed(cmd, env, cwd=self.args.engine_code)  # dagster puts the cwd on sys.path
        report = json.loads(subprocess.run([sys.executable, "-c", RUN_EVENTS], env=env, cwd=REPO, check=True,
                                           capture_output=True, text=True).stdout.strip().splitlines()[-1])
        if report["status"] != "SUCCESS":
            raise SystemExit(f"the Dagster run ended {report['status']}")
        self.dagster_runs[batch] = (report["events"], launched)
        return wall


MILESTONES = [  # (label, event type or None, text the message starts with or contains)
    ("run started (code location loaded, run created)", "PIPELINE_START", ""),
    ("step subprocess launched", "STEP_WORKER_STARTING", ""),
    ("step subprocess running (imports done)", "STEP_WORKER_STARTED", ""),
    ("resources initialised (model loaded)", "RESOURCE_INIT_SUCCESS", ""),
    ("step started", "STEP_START", ""),
    ("model loaded (open_clip imported, weights read)", "log", "model loaded in"),
    ("images planned", "log", "images to encode"),
    ("first images encoded", "log", "first "),
    ("step succeeded", "STEP_SUCCESS", ""),
    ("run succeeded", "PIPELINE_SUCCESS", ""),
]


def print_dagster_breakdown(events: list[dict], launched: float, what: str) -> None:
    print(f"\nWhere the Dagster run's time went, {what} (seconds after `dagster asset materialize` was launched):")
    previous = 0.0
    for label, kind, text in MILESTONES:
        hit = next((e for e in events if e["event"] == kind and text in e["message"]), None)
        if hit is None:
            continue
        at = hit["t"] - launched
        print(f"  {at:7.1f}  (+{at - previous:5.1f})  {label}")
        previous = at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-S-32", help="an open_clip architecture both tools know")
    parser.add_argument("--images", type=int, default=288)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=-1, help="the engine's decode workers (-1: min(16, cores))")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="corpus, checkpoint and peer venv")
    parser.add_argument("--peer-venv", type=Path, default=None)
    parser.add_argument("--engine-code", type=Path, default=REPO, help="a checkout of clip-assets to time")
    parser.add_argument("--copies", nargs="*", type=int, default=[3, 6],
                        help="two corpus multiples for the steady rate (none: skip)")
    parser.add_argument("--only", nargs="*", default=None,
                        choices=["naive", "clip-retrieval", "engine-direct", "engine-dagster"])
    args = parser.parse_args()
    args.peer_venv = args.peer_venv or args.cache / "clip-retrieval-venv"

    corpus_root = args.cache / "peer-corpus"
    names = make_images(corpus_root / "photos", args.images)
    one_image_batch(corpus_root / "photos", corpus_root)
    if args.copies and (len(args.copies) != 2 or not 1 <= args.copies[0] < args.copies[1]):
        raise SystemExit("--copies takes two multiples A < B, e.g. 3 6")
    copies = [(k, copies_batch(corpus_root / "photos", corpus_root, k)) for k in args.copies or []]
    checkpoint = save_checkpoint(args.model, args.cache / f"{args.model}-random-seed0.pt")
    which = args.only or ["naive", "clip-retrieval", "engine-direct", "engine-dagster"]
    if "clip-retrieval" in which:
        peer_python(args.peer_venv)
    work = Path(tempfile.mkdtemp(prefix="clip-assets-peer-"))
    contestants = Contestants(args, corpus_root, checkpoint, work)
    runs = {
        "naive": ("naive open_clip loop", contestants.naive),
        "clip-retrieval": ("clip-retrieval inference", contestants.clip_retrieval),
        "engine-direct": ("engine, direct (write_embeddings)", contestants.engine_direct),
        "engine-dagster": ("engine, dagster asset materialize", contestants.engine_dagster),
    }
    print(f"{len(names)} JPEGs {SIZES[0][0]}x{SIZES[0][1]}..{SIZES[-1][0]}x{SIZES[-1][1]}, {args.model} "
          f"(one checkpoint, random weights), device {args.device}, {os.cpu_count()} cores; "
          f"engine code {args.engine_code}; load average {load_average()}", flush=True)
    results = {}
    for key in which:
        label, run = runs[key]
        whole = run("photos")
        start_up = run("one")
        # A one-image run slower than the whole one means the machine was busy: no steady rate then.
        steady = (len(names) - 1) / (whole - start_up) if whole > start_up else float("nan")
        line = (f"  {label:<42} {len(names)} images {whole:6.1f} s ({len(names) / whole:5.1f} images/s)   "
                f"start-up {start_up:5.1f} s   steady (N-1 vs 1) {steady:6.1f} images/s")
        by_copies = float("nan")
        if copies:
            (a, batch_a), (b, batch_b) = copies
            t_a, t_b = run(batch_a), run(batch_b)
            by_copies = (b - a) * len(names) / (t_b - t_a) if t_b > t_a else float("nan")
            line += f"   x{a} {t_a:6.1f} s, x{b} {t_b:6.1f} s: steady {by_copies:6.1f} images/s"
        results[key] = (label, whole, start_up, steady, by_copies)
        print(line, flush=True)
    print(f"load average after: {load_average()}")
    if "clip-retrieval" in results:
        _, peer_whole, peer_start, peer_steady, peer_copies = results["clip-retrieval"]
        print("\nAgainst clip-retrieval:")
        for key, (label, whole, start_up, steady, by_copies) in results.items():
            if key != "clip-retrieval":
                print(f"  {label:<42} steady {by_copies / peer_copies:5.2f}x (by copies), {steady / peer_steady:5.2f}x "
                      f"(N-1 vs 1)   whole run {peer_whole / whole:5.2f}x   start-up {start_up / peer_start:5.2f}x as long")
    for batch, what in (("one", "one image: the start-up"), ("photos", f"{len(names)} images")):
        if batch in contestants.dagster_runs:
            print_dagster_breakdown(*contestants.dagster_runs[batch], what)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
