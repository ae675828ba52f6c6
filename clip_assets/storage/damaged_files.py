"""A damaged file of the project's own: named, with the command that rebuilds it; set aside, never a traceback.

Any stored file can be damaged after it was written (a disk error, a copy cut short, a restore gone
wrong, an editor). A reader turns what its library raises for such a file (pyarrow, DuckDB, faiss,
torch, numpy, json) into `DamagedFileError`, whose message names the file, what it holds and the
command that rebuilds it (`Artifact.reading`). What the reader does next depends on what it serves:

- a reader of many batches (search, the gallery, near-duplicates, calibration and the adapters'
  labelled sample) leaves the damaged batch out with a warning, serves the others, and hands the
  warnings back so the command line and the search page show them;
- a step that reads its own earlier output (the embeddings file it carries rows over from, its part
  files, the index codec, the near-duplicate pair files, the saved text encoder) moves the damaged
  copy aside as `<name>.damaged-<UTC time>` (`move_aside`: kept for a look, never deleted; no
  reader's pattern matches that name; in a data directory kept in an object store the object is
  moved aside there too) and builds it anew;
- any other reader fails with the message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from clip_assets.storage import object_store

log = logging.getLogger(__name__)

DAMAGED_MARKER = ".damaged-"
# What the project's readers raise for a file that is cut short, emptied or overwritten: pyarrow's
# errors (ArrowInvalid is a ValueError, ArrowIOError an OSError), numpy's and zipfile's, json's
# (ValueError). faiss and torch raise RuntimeError: their readers add it (see Artifact.reading).
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, zipfile.BadZipFile, pa.ArrowException)
MATERIALIZE = "dagster asset materialize -m clip_assets.definitions --select"


def materialize(asset: str, partition: str | None = None) -> str:
    """The command that materializes `asset` (for one batch), as a person types it."""
    return f"{MATERIALIZE} {asset}" + (f" --partition {shlex.quote(partition)}" if partition is not None else "")


def one_line(exc: BaseException, limit: int = 240) -> str:
    """An exception as a short line: its type and the start of its message, whitespace folded."""
    text = " ".join(str(exc).split()) or "no message"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


class DamagedFileError(RuntimeError):
    """A stored file of the project's own that cannot be read; the message names it and says how to rebuild it."""

    def __init__(self, path: Path, what: str, reason: str, rebuild: str):
        self.path, self.what, self.reason, self.rebuild = Path(path), what, reason, rebuild
        super().__init__(f"{path} ({what}) is damaged and cannot be read ({reason}). To rebuild it: {rebuild}")


@dataclass(frozen=True)
class Artifact:
    """A kind of stored file: what it holds, and the asset whose materialization rebuilds it.

    what: words for one such file, with `{batch}` where the batch goes. asset: the asset that
    rebuilds it, per batch when `partitioned`. how: the whole rebuild text instead, where it is not
    one materialization.
    """

    what: str
    asset: str | None = None
    partitioned: bool = False
    how: str | None = None

    def describe(self, batch: str | None = None) -> str:
        return self.what.format(batch=batch if batch is not None else "?")

    def rebuild(self, batch: str | None = None) -> str:
        if self.how is not None:
            return self.how
        assert self.asset is not None
        return materialize(self.asset, batch if self.partitioned else None)

    def damaged(self, path: Path, reason: BaseException | str, batch: str | None = None) -> DamagedFileError:
        reason = reason if isinstance(reason, str) else one_line(reason)
        return DamagedFileError(path, self.describe(batch), reason, self.rebuild(batch))

    @contextlib.contextmanager
    def reading(
        self, path: Path, batch: str | None = None, errors: tuple[type[BaseException], ...] = READ_ERRORS
    ) -> Iterator[None]:
        """Read `path` inside the block: what a damaged file raises comes out as DamagedFileError.

        A missing file is not a damaged one: FileNotFoundError passes as it is.
        """
        try:
            yield
        except (DamagedFileError, FileNotFoundError):
            raise
        except errors as exc:
            raise self.damaged(path, exc, batch) from exc

    def set_aside(self, path: Path, reason: BaseException | str, batch: str | None = None) -> str:
        """Move a damaged copy aside (a step about to rebuild it); returns the warning, also logged."""
        moved = move_aside(path)
        reason = reason if isinstance(reason, str) else one_line(reason)
        message = (
            f"{path} ({self.describe(batch)}) is damaged and cannot be read ({reason}): moved aside to "
            f"{moved.name} and built anew"
        )
        log.warning(message)
        return message


def move_aside(path: Path) -> Path:
    """Rename a damaged file to `<name>.damaged-<UTC time>` in its folder (never deleted); the new path."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}{DAMAGED_MARKER}{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}{DAMAGED_MARKER}{stamp}-{n}")
    os.replace(path, target)
    store = object_store.store_for(path)
    if store is not None:  # the data directory is in a store: the object is moved aside there too
        store.move(path, target)
    return target


def damaged_copies(path: Path) -> list[Path]:
    """The copies of `path` moved aside, oldest first."""
    path = Path(path)
    return sorted(path.parent.glob(f"{glob_escape(path.name)}{DAMAGED_MARKER}*"))


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def open_parquet(path: Path, artifact: Artifact, batch: str | None = None) -> pq.ParquetFile:
    """A parquet file of the project's, its footer read: DamagedFileError when it is cut short, emptied
    or overwritten (its footer is the last thing written, so damage anywhere near the end shows here)."""
    with artifact.reading(path, batch):
        return pq.ParquetFile(path)


def parquet_batches(
    path: Path, artifact: Artifact, batch: str | None = None, **iter_batches
) -> Iterator[pa.RecordBatch]:
    """The file's record batches (`pq.ParquetFile.iter_batches(**iter_batches)`), what its reads raise
    as DamagedFileError. Only the reads: an error in what the caller does with a batch (a full disk
    while writing it elsewhere) comes out as it is, never blamed on this file."""
    with artifact.reading(path, batch), pq.ParquetFile(path) as f:
        yield from f.iter_batches(**iter_batches)


def readable_parquet_files(paths: list[Path], artifact: Artifact) -> tuple[list[Path], list[DamagedFileError]]:
    """The files whose footer reads, and the damaged ones (each logged as a warning): what a reader of
    many batches serves from, and what it tells its caller it left out. The batch is the file's stem."""
    good: list[Path] = []
    damaged: list[DamagedFileError] = []
    for path in paths:
        try:
            open_parquet(path, artifact, Path(path).stem).close()
        except DamagedFileError as exc:
            log.warning("left out: %s", exc)
            damaged.append(exc)
        else:
            good.append(Path(path))
    return good, damaged


# The stored files, and what rebuilds each. A batch's files are named after its stem (config.layout),
# which for a name over 200 bytes is a shortened one: then the partition is the batch's whole name.
MANIFEST = Artifact("the manifest of batch {batch}", "image_manifest", partitioned=True)
EMBEDDINGS = Artifact("the embeddings file of batch {batch}", "image_embeddings", partitioned=True)
ANN_SHARD = Artifact(
    "the index shard of batch {batch}; until it is rebuilt, search scores that batch exactly",
    "image_search_index",
    partitioned=True,
)
EMBEDDING_PART = Artifact(
    "a part file of batch {batch}'s unfinished embedding run; its images are encoded again",
    "image_embeddings",
    partitioned=True,
)
ANN_CODEC = Artifact("the index codec every shard is filled from", "image_search_index", partitioned=True)
TEXT_ENCODER = Artifact(
    "the text encoder saved for fast search start-up",
    how="nothing to run: the next text search loads the model and saves it again",
)
DUPLICATE_PAIRS = Artifact("the near-duplicate pairs of batch {batch}", "near_duplicates")
ADAPTERS = Artifact(
    "the adapters file", how=f"{materialize('category_adapters')} (or delete the file to classify zero-shot)"
)
FINE_TUNED_CHECKPOINT = Artifact("a fine-tuned checkpoint", "fine_tuned_model")
FINE_TUNED_RECORD = Artifact("the record of which fine-tuned checkpoint is in use", "fine_tuned_model")
DUCKDB = Artifact(
    "the DuckDB file: prompt centroids, classifications, near-duplicate groups",
    how=(
        f"{materialize('prompt_centroids')} (it moves the damaged file aside and starts a new one), then "
        f"{materialize('image_classifications')} --partition-range <first batch>...<last batch> (or a backfill "
        "of every batch in the UI), then near_duplicates; nothing is re-encoded"
    ),
)
