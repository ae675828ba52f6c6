"""What the daemon does with a sensor tick, done in a test: `tick` evaluates the batch discovery
sensor on a real instance, adds the requested partitions, and `run_requests` launches each requested
run (in-process, one after another); `classification_counts` reads what the runs classified;
`stale_status` is what the UI shows of an asset."""

from __future__ import annotations

import dagster as dg

from clip_assets.config.layout import DataLayout
from clip_assets.defs.ingest.sensors import BATCH_DISCOVERY_SENSOR
from clip_assets.instance.execution import QUIET_CONSOLE
from clip_assets.storage.warehouse import connect


def run_requests(defs, instance, requests):
    for request in requests:
        job = defs.resolve_job_def(request.job_name)
        result = job.execute_in_process(
            instance=instance, partition_key=request.partition_key, tags=request.tags, run_config=QUIET_CONSOLE
        )
        assert result.success


def tick(defs, instance, cursor):
    sensor = defs.resolve_sensor_def(BATCH_DISCOVERY_SENSOR)
    # instance_ref, as the daemon passes it: run requests may name partitions added in the same tick
    with dg.build_sensor_context(
        instance_ref=instance.get_ref(), cursor=cursor, repository_def=defs.get_repository_def(), resources=defs.resources
    ) as context:  # closing it releases the instance it opened from the ref
        data = sensor.evaluate_tick(context)
    for request in data.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    run_requests(defs, instance, data.run_requests or [])
    return data


def stale_status(defs, instance, key, partition=None):
    """What the UI shows for the asset: FRESH, STALE (an input's data version changed since) or MISSING."""
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    resolver = CachingStaleStatusResolver(instance, defs.resolve_asset_graph(), LoadingContextForTest(instance))
    return resolver.get_status(key, partition).value


def classification_counts(settings):
    with connect(DataLayout(settings.data_dir).duckdb_path, read_only=True) as con:
        return con.execute(
            "SELECT batch, count(*), count(DISTINCT (image_id, category)) FROM image_classifications "
            "GROUP BY batch ORDER BY batch"
        ).fetchall()
