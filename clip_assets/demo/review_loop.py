"""The demo's review loop: a scripted person labels through the app's own HTTP endpoints, and the
pipeline learns from the clicks.

After the demo's pipeline has run, the app (`clip-assets serve`) starts in this process on a loopback
port; the person asks the improve queue of each category for its least certain images and answers
from the ground truth, one POST per click, as the review page does. The labels store is then
observed and the adapters, the classifications and the evaluation re-materialized. The person
then labels a uniform sample of each category (the estimate queue) and the app's estimates are
printed next to the precision the ground truth gives.
"""

from __future__ import annotations

import datetime
import json
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import dagster as dg

from clip_assets.app.app import running_app
from clip_assets.config.layout import DataLayout
from clip_assets.config.settings import Settings
from clip_assets.defs.asset_keys import (
    CATEGORY_ADAPTERS,
    IMAGE_CLASSIFICATIONS,
    IMAGE_EVALUATION,
    THRESHOLD_CALIBRATION,
)
from clip_assets.defs.tuning.labels import REVIEW_LABELS_OBSERVATION_SENSOR
from clip_assets.ingest.manifest import readable_manifests
from clip_assets.instance.execution import materialize, observe
from clip_assets.storage.warehouse import connect
from clip_assets.tuning.evaluation import CategoryScore, macro_f1, score_labels
from clip_assets.tuning.review_labels import ESTIMATE, IMPROVE

IMPROVE_CLICKS = 30  # per category
ESTIMATE_CLICKS = 30  # per category


@dataclass
class ScriptedPerson:
    """Answers the app's cards from the ground truth, through the same endpoints as the review page."""

    url: str  # the app's, e.g. http://127.0.0.1:40123
    truth: dict[str, set[str]]  # path -> the categories the image shows
    clicks: int = 0

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def review(self, category: str, queue: str, clicks: int) -> int:
        """Up to `clicks` answers to the queue's cards (fewer when it runs dry); how many were given."""
        given = 0
        while given < clicks:
            cards = self.call("GET", f"/api/review/{quote(category)}/cards?queue={queue}&n={clicks - given}")["cards"]
            if not cards:
                break
            for card in cards:
                verdict = "yes" if category in self.truth.get(card["path"], set()) else "no"
                self.call(
                    "POST",
                    "/api/review/verdicts",
                    {
                        "request_id": uuid.uuid4().hex,
                        "path": card["path"],
                        "batch": card["batch"],
                        "category": category,
                        "verdict": verdict,
                        "queue": queue,
                        "model": card["model"],
                        "prompt_version": card["prompt_version"],
                    },
                )
                given += 1
        self.clicks += given
        return given


def decisions(layout: DataLayout, person_included: bool) -> dict[str, set[str]]:
    """The categories each image is in, by path: the rule's or adapter's decisions alone, or the tags
    (`matched`, where a person's verdict wins)."""
    column = "c.matched" if person_included else "coalesce(c.model_matched, c.matched)"
    with connect(layout.duckdb_path, read_only=True) as con:
        rows = con.execute(
            f"SELECT m.path, list(c.category) FILTER (WHERE {column}) "
            "FROM image_classifications c JOIN read_parquet(?) m USING (image_id) GROUP BY m.path",
            [readable_manifests(layout)],  # a damaged manifest leaves its batch out, with a warning
        ).fetchall()
    return {path: set(cats or []) for path, cats in rows}


def set_aside_previous_store(layout: DataLayout) -> Path | None:
    """An earlier demo's labels store, renamed beside it (kept, not deleted), so this run's person starts afresh."""
    store = layout.review_labels_path
    if not store.exists():
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    kept = store.with_name(f"{store.stem}.before-demo-{stamp}{store.suffix}")
    for suffix in ("", "-wal", "-shm"):
        part = store.with_name(store.name + suffix)
        if part.exists():
            part.rename(kept.with_name(kept.name + suffix))
    return kept


def relearn(defs: dg.Definitions, instance: dg.DagsterInstance, batches: list[str]) -> None:
    """What the daemon does when the labels change: observe the store, then re-materialize the
    adapters, each batch's classifications and the evaluation group."""
    observe(defs, instance, REVIEW_LABELS_OBSERVATION_SENSOR)
    materialize(defs, instance, [CATEGORY_ADAPTERS])
    for batch in batches:
        materialize(defs, instance, [IMAGE_CLASSIFICATIONS], partition_key=batch)
    materialize(defs, instance, [IMAGE_EVALUATION, THRESHOLD_CALIBRATION])


def review_loop(
    settings: Settings,
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    batches: list[str],
    truth: dict[str, set[str]],
    categories: list[str],
    log=print,
    improve_clicks: int = IMPROVE_CLICKS,
    estimate_clicks: int = ESTIMATE_CLICKS,
) -> dict:
    """Improve clicks, re-materialization, estimate clicks, all through the app; prints the table and
    returns the figures (F1 before and after, the estimates and the true precision, per category)."""
    started = time.monotonic()
    layout = DataLayout(settings.data_dir)
    before = score_labels(decisions(layout, person_included=False), truth, categories)
    with running_app(settings) as app:
        person = ScriptedPerson(app.url, truth)
        improved = {c: person.review(c, IMPROVE, improve_clicks) for c in categories}
        clicked = time.monotonic()
        relearn(defs, instance, batches)
        relearnt = time.monotonic()
        for category in categories:
            person.review(category, ESTIMATE, estimate_clicks)
        estimates = {row["category"]: row for row in person.call("GET", "/api/review/estimates")["estimates"]}
    after = score_labels(decisions(layout, person_included=False), truth, categories)
    tags = score_labels(decisions(layout, person_included=True), truth, categories)
    log(
        f"\nreview through the app ({app.url}): {sum(improved.values())} improve clicks "
        f"({improve_clicks} per category) in {clicked - started:.1f} s, the labels observed and category_adapters, "
        f"image_classifications and the evaluation group re-materialized in {relearnt - clicked:.0f} s, then "
        f"{estimate_clicks} estimate clicks per category:"
    )
    log(format_loop_table(before, after, tags, estimates))
    return {"before": before, "after": after, "tags": tags, "estimates": estimates, "clicks": person.clicks}


def format_loop_table(
    before: list[CategoryScore], after: list[CategoryScore], tags: list[CategoryScore], estimates: dict[str, dict]
) -> str:
    header = f"{'category':<10} {'F1 before':>9} {'F1 after':>9} {'F1 tags':>8}   {'estimated precision [95%]':<26}"
    lines = [header + f"{'true precision':>14}"]
    for b, a, t in zip(before, after, tags):
        e = estimates.get(b.category, {})
        if e.get("precision") is None:
            estimate = "no labelled matches"
        else:
            estimate = f"{e['precision']:.2f} [{e['precision_low']:.2f}, {e['precision_high']:.2f}]"
        lines.append(f"{b.category:<10} {b.f1:>9.3f} {a.f1:>9.3f} {t.f1:>8.3f}   {estimate:<26}{a.precision:>14.3f}")
    lines.append(f"{'macro':<10} {macro_f1(before):>9.3f} {macro_f1(after):>9.3f} {macro_f1(tags):>8.3f}")
    lines.append(
        "F1 before/after: the rule's and adapters' decisions on every image against the ground truth; F1 tags: "
        "with the person's verdicts,\nwhich win on the images they judged. The precision is estimated from the "
        "estimate queue's labels alone; the true one is the\nground truth's, of the decisions after."
    )
    return "\n".join(lines)
