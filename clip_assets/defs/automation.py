"""The automation sensor: eager assets re-materialize when what they depend on has a new data version.

`prompt_centroids`, `category_adapters`, `image_classifications` (and, where the deployment
fine-tunes, `fine_tuned_model`) are eager, so a new observation of the prompt files, the labels file,
the review pages' labels or the captions file (clip_assets.defs.observation) requests them;
`image_evaluation` and `threshold_calibration` follow the classifications they read; `image_embeddings`,
which does not depend on prompts or labels, never. Dagster's default automation sensor is STOPPED; this one runs by default.
"""

import dagster as dg

from clip_assets.defs.observation import CHECK_INTERVAL_S

AUTOMATION_SENSOR = "clip_assets_automation"

automation_sensor = dg.AutomationConditionSensorDefinition(
    AUTOMATION_SENSOR,
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=CHECK_INTERVAL_S,
    description="Re-materializes prompt_centroids and every batch of image_classifications when the observed "
    "prompt files change.",
)
