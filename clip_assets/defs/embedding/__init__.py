"""The embedding step: each batch's images through the model, on the GPU where there is one."""

import dagster as dg

from clip_assets.defs.embedding.assets import image_embeddings


def definitions() -> dg.Definitions:
    return dg.Definitions(assets=[image_embeddings])
