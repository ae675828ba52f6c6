import dagster as dg

# One partition per batch folder directly under the image root; batches arrive over time.
image_batches = dg.DynamicPartitionsDefinition(name="image_batches")

# Backfills: batches per run for the manifest and the embeddings (the model loads once per run);
# classifications of any number of batches run as one run.
BATCHES_PER_RUN = 8
