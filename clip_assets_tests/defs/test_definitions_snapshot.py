"""A snapshot of the code location's graph, so an accidental change to it shows up in review.

The snapshot (definitions_snapshot.json beside this file) lists every asset with its group, partitions,
dependencies, checks, kinds, pool, op tags, tags, owners, code version, backfill policy and
automation; every sensor and schedule with its default status; the jobs and the resources. A change that is
meant: write the snapshot again with `uv run python -m clip_assets_tests.defs.test_definitions_snapshot`
and commit it with the change, where the diff shows what the graph gained or lost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import dagster as dg

from clip_assets.config.settings import Settings
from clip_assets.definitions import build_definitions
from clip_assets.defs import asset_keys

SNAPSHOT = Path(__file__).with_name("definitions_snapshot.json")


def graph_of(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    ops = {key: ad for ad in graph.assets_defs if ad.is_executable and not ad.is_observable for key in ad.keys}
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        partitions = node.partitions_def
        condition = node.automation_condition
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "partitions": getattr(partitions, "name", None) if partitions else None,
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "checks": sorted(c.name for c in node.check_keys),
            "kinds": sorted(node.kinds),
            "pool": ops[key].op.pool if key in ops else None,
            "op_tags": dict(ops[key].op.tags) if key in ops else {},
            "tags": dict(node.tags),
            "owners": list(node.owners),
            "code_version": node.code_version,
            "backfill_policy": str(node.backfill_policy) if node.backfill_policy else None,
            "automation": (condition.get_label() or type(condition).__name__) if condition else None,
            "observable": node.is_observable,
        }
    return {
        "assets": assets,
        "sensors": {s.name: [s.default_status.value, s.minimum_interval_seconds] for s in defs.sensors or []},
        "schedules": {s.name: [s.cron_schedule, s.default_status.value] for s in defs.schedules or []},
        "jobs": sorted(j.name for j in defs.jobs or []),
        "resources": sorted(defs.resources or {}),
    }


def snapshot(root: Path) -> dict:
    """The graph of the two shapes a deployment takes: as it comes, and fine-tuning in the lineage."""
    plain = Settings(image_root=root / "images", data_dir=root / "data")
    fine_tuned = plain.model_copy(update={"fine_tune_captions": root / "captions.csv", "use_fine_tuned": True})
    return {"default": graph_of(build_definitions(plain)), "fine_tuned": graph_of(build_definitions(fine_tuned))}


def test_the_definitions_are_the_snapshot(tmp_path):
    expected = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    assert snapshot(tmp_path) == expected, (
        "The code location's graph changed. If that is meant, run "
        "`uv run python -m clip_assets_tests.defs.test_definitions_snapshot` and commit the snapshot with it."
    )


def test_every_asset_key_constant_names_an_asset(tmp_path):
    names = set(snapshot(tmp_path)["fine_tuned"]["assets"])
    constants = {v.to_user_string() for v in vars(asset_keys).values() if isinstance(v, dg.AssetKey)}
    assert constants == names  # one constant per asset, none for an asset that is gone


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        SNAPSHOT.write_text(json.dumps(snapshot(Path(tmp)), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {SNAPSHOT}", file=sys.stderr)
