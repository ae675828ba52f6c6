"""Asset check results from the check functions' outcomes (clip_assets.checks), one or several batches.

A check that only warns (WARN severity) leaves its run green and the asset's partitions clean, so where
one failed, `warning_result` says so where people look: the run gets the tag WARNING_TAG, which the runs
list shows (`clip_assets/warning: 18% of files unusable in batch-003`), and each batch that failed it gets
a `warning: <check>` entry in its materialization's metadata, which its partition shows.
"""

from __future__ import annotations

import dagster as dg

from clip_assets.checks import CheckOutcome

WARNING_TAG = "clip_assets/warning"
WARNING_TAG_CHARS = 240  # a tag the runs list can show; a longer one is cut, ending "..."


def check_result(name: str, outcome: CheckOutcome, warn: bool = False) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=name,
        passed=outcome.passed,
        severity=dg.AssetCheckSeverity.WARN if warn else dg.AssetCheckSeverity.ERROR,
        description=outcome.description,
        metadata=outcome.metadata,
    )


def combined(outcomes: dict[str, CheckOutcome]) -> CheckOutcome:
    """One outcome for the batches of a run (checks are not per partition in Dagster): passed when
    every batch passed; the description names each batch, failed ones first, one line each; one
    batch's figures are kept as they are, several batches' in a table."""
    if len(outcomes) == 1:
        ((batch, outcome),) = outcomes.items()
        return CheckOutcome(outcome.passed, f"{batch}: {outcome.description}", {"batch": batch, **outcome.metadata})
    failed = sorted(b for b, o in outcomes.items() if not o.passed)
    lines = [
        f"{b}: {'FAILED' if b in failed else 'passed'}: {outcomes[b].description}"
        for b in failed + sorted(set(outcomes) - set(failed))
    ]
    head = f"{len(failed)} of {len(outcomes)} batches failed" if failed else f"all {len(outcomes)} batches passed"
    rows = "".join(
        f"| {b} | {'failed' if b in failed else 'passed'} | {outcomes[b].description} |\n" for b in sorted(outcomes)
    )
    return CheckOutcome(
        passed=not failed,
        description=(head + "\n" + "\n".join(lines))[:2000],
        metadata={
            "batches": len(outcomes),
            "failed_batches": ", ".join(failed) or "none",
            "by_batch": dg.MetadataValue.md("| batch | check | figures |\n| --- | --- | --- |\n" + rows),
        },
    )


def warning_result(
    context: dg.AssetExecutionContext, name: str, outcomes: dict[str, CheckOutcome]
) -> dg.AssetCheckResult:
    """The WARN-severity result of check `name` over the run's batches. Each batch that failed it gets a
    `warning: <name>` metadata entry (call this before the body returns its MaterializeResult), and the
    run the tag WARNING_TAG, added to what an earlier warning of the same run put there."""
    failed = {b: o for b, o in sorted(outcomes.items()) if not o.passed}
    for batch, outcome in failed.items():
        context.add_asset_metadata(partition_key=batch, metadata={f"warning: {name}": outcome.description})
    if failed:
        said = "; ".join(f"{o.headline or name + ' failed'} in {b}" for b, o in failed.items())
        run = context.instance.get_run_by_id(context.run.run_id)
        earlier = run.tags.get(WARNING_TAG) if run is not None else None
        tag = f"{earlier}; {said}" if earlier else said
        tag = tag if len(tag) <= WARNING_TAG_CHARS else tag[: WARNING_TAG_CHARS - 3] + "..."
        context.instance.add_run_tags(context.run.run_id, {WARNING_TAG: tag})
        context.log.warning(f"{name}: {said} (the run is tagged {WARNING_TAG})")
    return check_result(name, combined(outcomes), warn=True)
