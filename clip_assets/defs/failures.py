"""The project's own errors, the ones a person fixes, as `dg.Failure`: one sentence and what to do, not a trace.

The library raises plain errors (`PromptFileError`, `LabelsFileError`, `WeightsUnavailableError`, ...), which
the tests and the command line see as they are. An asset body wrapped in `user_errors_as_failures` turns
the errors named in FIXES into a `dg.Failure`: its description is the error's message on one line, and
its metadata names the file and the field where the error knows them, the fix, and the error's type.
The run page shows that sentence and table where it showed a chained stack trace (the trace goes to
the run's debug log). Any other exception is a bug, and keeps its trace.

FIXES names each error by module and class, so this module imports none of them: some live in modules
that import torch, which the code location loads without (clip_assets.defs).
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from typing import TypeVar

import dagster as dg

F = TypeVar("F", bound=Callable)

# Module.Class of each error a person fixes -> what to do. A subclass is found through its bases.
FIXES: dict[str, str] = {
    "clip_assets.classification.prompts.PromptFileError": (
        "Correct the prompt file (docs/prompts.md says what each field means): the prompt_files_observation "
        "sensor sees the edit, and prompt_centroids runs again."
    ),
    "clip_assets.tuning.labels_file.LabelsFileError": (
        "Correct the labels file CLIP_ASSETS_LABELS names, or label more images: the labels_file_observation "
        "sensor sees the edit, and what depends on it runs again."
    ),
    "clip_assets.tuning.fine_tuning.CaptionsFileError": (
        "Correct the captions file CLIP_ASSETS_FINE_TUNE_CAPTIONS names, at the line and field the message "
        "names: fine_tuned_model runs again when it changes."
    ),
    "clip_assets.model.clip_model.WeightsUnavailableError": (
        "Point CLIP_ASSETS_MODEL and CLIP_ASSETS_PRETRAINED at weights this machine has (a local checkpoint "
        "file needs no network), then materialize again."
    ),
    "clip_assets.model.fine_tuned_weights.NoFineTunedModelError": (
        "Materialize fine_tuned_model, or unset CLIP_ASSETS_USE_FINE_TUNED to encode with CLIP_ASSETS_PRETRAINED."
    ),
    "clip_assets.config.settings.SettingsError": (
        "Correct the CLIP_ASSETS_* variable the message names (docs/configuration.md lists them all), then "
        "reload the code location."
    ),
    "clip_assets.classification.rules.ModelMismatchError": (
        "Materialize again whichever side the configured model did not make: this batch's image_embeddings, "
        "or prompt_centroids."
    ),
    "clip_assets.storage.warehouse.CentroidsMissingError": "Materialize prompt_centroids first.",
    "clip_assets.tuning.calibration.NotClassifiedError": (
        "Materialize prompt_centroids and image_classifications for the labelled images' batches first."
    ),
    "clip_assets.tuning.adapter_store.AdapterMismatchError": "Materialize category_adapters, then this asset again.",
    "clip_assets.search.ann_index.IndexNotBuiltError": "Materialize image_embeddings for the batch first.",
    "clip_assets.storage.warehouse.WarehouseLockedError": (
        "Let the process the message names finish, or stop it, then materialize again "
        "(CLIP_ASSETS_DUCKDB_WAIT_S: how long a step waits for the DuckDB file)."
    ),
    "clip_assets.storage.warehouse.WarehouseVersionError": "Do what the message says: the DuckDB file is rebuilt from the parquet files.",
    "clip_assets.storage.atomic_files.DiskFullError": (
        "Free some space where the message says (or move CLIP_ASSETS_DATA_DIR to a larger disk), then "
        "materialize again: the previous files are as they were."
    ),
    # the command that rebuilds the file is the error's own `rebuild`
    "clip_assets.storage.damaged_files.DamagedFileError": "Rebuild the file as the message says.",
}


def fix_for(exc: BaseException) -> str | None:
    """What a person does about `exc`, or None where it is not one of the project's own errors."""
    for cls in type(exc).__mro__:
        fix = FIXES.get(f"{cls.__module__}.{cls.__qualname__}")
        if fix is not None:
            return getattr(exc, "rebuild", None) or fix
    return None


def one_line(exc: BaseException) -> str:
    """The error's message on one line (whitespace folded), as the run page's description."""
    return " ".join(str(exc).split()) or type(exc).__name__


def as_failure(exc: BaseException) -> dg.Failure | None:
    """`exc` as the Failure a person reads (description: its message on one line; metadata: file, field, fix,
    error), or None where it is not one of the project's own errors."""
    fix = fix_for(exc)
    if fix is None:
        return None
    metadata: dict[str, object] = {}
    if getattr(exc, "path", None) is not None:
        metadata["file"] = dg.MetadataValue.path(str(exc.path))
    if getattr(exc, "field", None):
        metadata["field"] = str(exc.field)
    metadata["fix"] = fix
    metadata["error"] = type(exc).__name__
    return dg.Failure(description=one_line(exc), metadata=metadata)


def reason(exc: BaseException) -> str:
    """One line for a batch that failed in a run of several (clip_assets.defs.batch_isolation)."""
    if isinstance(exc, dg.Failure) and exc.description:
        return exc.description
    return one_line(exc) if fix_for(exc) is not None else f"{type(exc).__name__}: {exc}"


def user_errors_as_failures(body: F) -> F:
    """An asset body whose errors of the project's own (FIXES) fail the step as `as_failure` says.
    Put it under `@dg.asset`: Dagster reads the body's signature and docstring through it."""

    @functools.wraps(body)
    def said_plainly(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except Exception as exc:
            failure = as_failure(exc)
            if failure is None:
                raise
            _log_trace_at_debug_level()
            raise failure from None  # no chained trace on the run page: the sentence is the message

    return said_plainly  # type: ignore[return-value]


def _log_trace_at_debug_level() -> None:
    try:
        dg.AssetExecutionContext.get().log.debug(traceback.format_exc())
    except dg.DagsterInvariantViolationError:  # called outside a run (a test invoking the body directly)
        pass
