"""Every asset's key, in one place: jobs, sensors, automation, scripts and tests name assets through these.

The snapshot test (clip_assets_tests/defs/test_definitions_snapshot.py) checks that each constant is
the key of an asset the code location defines.
"""

import dagster as dg

# Human-edited files, observed without a run
PROMPT_FILES = dg.AssetKey("prompt_files")
LABELS_FILE = dg.AssetKey("labels_file")
REVIEW_LABELS = dg.AssetKey("review_labels")  # the verdicts of the review pages (clip_assets.tuning.review_labels)
CAPTIONS_FILE = dg.AssetKey("captions_file")

# Per batch (partitioned by image_batches)
IMAGE_MANIFEST = dg.AssetKey("image_manifest")
IMAGE_EMBEDDINGS = dg.AssetKey("image_embeddings")
IMAGE_CLASSIFICATIONS = dg.AssetKey("image_classifications")
IMAGE_SEARCH_INDEX = dg.AssetKey("image_search_index")

# Whole collection
PROMPT_CENTROIDS = dg.AssetKey("prompt_centroids")
CATEGORY_ADAPTERS = dg.AssetKey("category_adapters")
FINE_TUNED_MODEL = dg.AssetKey("fine_tuned_model")
IMAGE_EVALUATION = dg.AssetKey("image_evaluation")
THRESHOLD_CALIBRATION = dg.AssetKey("threshold_calibration")
CLASSIFICATION_GALLERY = dg.AssetKey("classification_gallery")
COPY_THRESHOLD = dg.AssetKey("copy_threshold")
NEAR_DUPLICATES = dg.AssetKey("near_duplicates")

# A batch's three steps in order: listed, encoded, classified.
BATCH_ASSETS = [IMAGE_MANIFEST, IMAGE_EMBEDDINGS, IMAGE_CLASSIFICATIONS]
