"""clip-assets: classify and search image collections with OpenCLIP embeddings, as Dagster assets."""

from clip_assets.cpu_threads import prefer_passive_waiting

prefer_passive_waiting()  # before anything imports torch (see clip_assets.cpu_threads)
