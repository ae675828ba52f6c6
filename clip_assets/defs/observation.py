"""Human-edited files as observed sources: prompts, labels (the file, and the review pages' store), captions.

Observing is not work, so it launches no run: each file's sensor hashes it every CHECK_INTERVAL_S and
records an observation (the hash as the data version) only when the hash differs from the last one
recorded. What depends on the file is eager (clip_assets.defs.automation), so a new data version
re-runs it: prompts re-run the centroids, adapters and classifications; labels the adapters and
classifications, then evaluation and calibration; captions the fine-tuned model. Scripts and tests record the same observation
without a daemon through clip_assets.instance.execution.observe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import dagster as dg

from clip_assets.defs.conventions import OWNER
from clip_assets.instance.dagster_internals import data_version_tags
from clip_assets.storage.file_hashes import SOURCE_VERSION_CHARS, content_digest

CHECK_INTERVAL_S = 30
MISSING_FILE = "missing"  # a file's data version while the setting names no file that is there


def observation(key: dg.AssetKey, version: str, metadata: dict) -> dg.AssetObservation:
    """An observation of `key` with `version` as its data version."""
    return dg.AssetObservation(key, tags=data_version_tags(version), metadata=metadata)


def file_observation(key: dg.AssetKey, path: Path | None, setting: str, unset_version: str) -> dg.AssetObservation:
    """An observation of a human-edited file now: its content hash as the data version, `unset_version`
    while `setting` names no file, MISSING_FILE while the file it names is not there."""
    if path is None:
        version, metadata = unset_version, {"path": f"unset ({setting})"}
    elif not Path(path).is_file():
        version, metadata = MISSING_FILE, {"path": str(path), "missing": True}
    else:
        version, metadata = content_digest(path, SOURCE_VERSION_CHARS), {"path": str(path)}
    return observation(key, version, metadata)


def last_observed_version(instance: dg.DagsterInstance, key: dg.AssetKey) -> str | None:
    records = instance.fetch_observations(key, limit=1).records
    return records[0].asset_observation.data_version if records else None


def observation_sensor(name: str, description: str):
    """The decorator of a sensor that observes a human-edited file without a run (RUNNING by default).
    Its body returns `record_if_changed(context, observation, what)`."""
    return dg.sensor(name=name, default_status=dg.DefaultSensorStatus.RUNNING,
                     minimum_interval_seconds=CHECK_INTERVAL_S, description=description)


def record_if_changed(context: dg.SensorEvaluationContext, made: dg.AssetObservation | dg.SkipReason,
                      what: str) -> dg.SensorResult | dg.SkipReason:
    """The sensor's result: `made` recorded when its data version differs from the last one recorded.
    An unchanged file is an idle tick, with nothing to say (clip_assets.instance.daemon_logs)."""
    if isinstance(made, dg.SkipReason):
        return made
    if made.data_version == last_observed_version(context.instance, made.asset_key):
        return dg.SensorResult()
    context.log.info(f"{what} changed: data version {made.data_version}")
    return dg.SensorResult(asset_events=[made])


def observed_files_spec(key: dg.AssetKey, description: str, kind: str) -> dg.AssetSpec:
    """A human-edited file (or folder of files) that a sensor observes without a run."""
    return dg.AssetSpec(key, description=description, group_name="prompts", kinds={kind}, owners=[OWNER],
                        code_version="1")


def observed(made: dg.AssetObservation) -> dg.ObserveResult:
    """An observation made inside a run (the UI's Observe button) as the result the run records."""
    return dg.ObserveResult(asset_key=made.asset_key, data_version=dg.DataVersion(made.data_version),
                            metadata=made.metadata)


def observed_file_source(key: dg.AssetKey, description: str, kind: str, resource_key: str,
                         observe: Callable[[Any], dg.AssetObservation]) -> dg.AssetsDefinition:
    """A human-edited file as an observable source asset named `key`: observed by its sensor without a
    run, or in a run when asked for (the UI's Observe button); `observe(resource)` makes the observation."""

    @dg.multi_observable_source_asset(specs=[observed_files_spec(key, description, kind)], name=key.path[-1],
                                      required_resource_keys={resource_key})
    def observe_file(context):
        yield observed(observe(getattr(context.resources, resource_key)))

    return observe_file
