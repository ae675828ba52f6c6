"""Search: each batch's index shard, the copy threshold learnt for the model, and the near-duplicate groups."""

import dagster as dg

from clip_assets.defs.search.assets import copy_threshold, image_search_index, near_duplicates


def definitions() -> dg.Definitions:
    return dg.Definitions(assets=[image_search_index, copy_threshold, near_duplicates])
