"""Dagster definitions: partitions, resources, assets and automation. The work lives in clip_assets.steps."""
