"""Asset check results from the check functions' outcomes (clip_assets.checks), one or several batches."""

from __future__ import annotations

import dagster as dg

from clip_assets.checks import CheckOutcome


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
        (batch, outcome), = outcomes.items()
        return CheckOutcome(outcome.passed, f"{batch}: {outcome.description}", {"batch": batch, **outcome.metadata})
    failed = sorted(b for b, o in outcomes.items() if not o.passed)
    lines = [f"{b}: {'FAILED' if b in failed else 'passed'}: {outcomes[b].description}"
             for b in failed + sorted(set(outcomes) - set(failed))]
    head = f"{len(failed)} of {len(outcomes)} batches failed" if failed else f"all {len(outcomes)} batches passed"
    rows = "".join(f"| {b} | {'failed' if b in failed else 'passed'} | {outcomes[b].description} |\n" for b in sorted(outcomes))
    return CheckOutcome(
        passed=not failed,
        description=(head + "\n" + "\n".join(lines))[:2000],
        metadata={"batches": len(outcomes), "failed_batches": ", ".join(failed) or "none",
                  "by_batch": dg.MetadataValue.md("| batch | check | figures |\n| --- | --- | --- |\n" + rows)},
    )
