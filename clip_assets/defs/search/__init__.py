"""Search: each batch's index shard, and the near-duplicate groups found through the shards."""

import dagster as dg

from clip_assets.defs.search.assets import image_search_index, near_duplicates


def definitions() -> dg.Definitions:
    return dg.Definitions(assets=[image_search_index, near_duplicates])
