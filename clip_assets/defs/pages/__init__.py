"""Pages for people: the classification gallery."""

import dagster as dg

from clip_assets.defs.pages.assets import classification_gallery


def definitions() -> dg.Definitions:
    return dg.Definitions(assets=[classification_gallery])
