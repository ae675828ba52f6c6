import dagster as dg

# One partition per batch folder directly under the image root; batches arrive over time.
image_batches = dg.DynamicPartitionsDefinition(name="image_batches")
