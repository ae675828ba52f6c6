"""The pictures the steps draw from the images themselves (the contact sheet, the gallery page), with the image root in a bucket: the same as
from a local folder (moto's S3 server on loopback, through Dagster as a run does it)."""

import base64

import dagster as dg

from clip_assets.definitions import build_definitions
from clip_assets.defs.classification.prompts import PROMPT_OBSERVATION_SENSOR
from clip_assets.instance.execution import BATCH_ASSETS, materialize, observe, register_batches

BATCH = "batch-001"


def pictures(settings, instance: dg.DagsterInstance) -> tuple[bytes, int]:
    """The batch's contact sheet (from a run of the manifest, embedding and classification steps) and the
    number of thumbnails of the gallery page made after it."""
    defs = build_definitions(settings)
    register_batches(instance, [BATCH])
    observe(defs, instance, PROMPT_OBSERVATION_SENSOR)
    materialize(defs, instance, [dg.AssetKey("prompt_centroids")])
    materialize(defs, instance, BATCH_ASSETS, partition_key=BATCH)
    record = instance.fetch_materializations(dg.AssetKey("image_classifications"), limit=1).records[0]
    value = record.asset_materialization.metadata["contact_sheet"].value
    materialize(defs, instance, [dg.AssetKey("classification_gallery")])
    gallery = instance.fetch_materializations(dg.AssetKey("classification_gallery"), limit=1).records[0]
    return base64.b64decode(value.split("base64,")[1].rstrip(")")), gallery.asset_materialization.metadata[
        "thumbnails"].value


def test_the_contact_sheet_and_gallery_of_a_batch_in_a_bucket_show_its_images(settings, instance, s3_store, collection,
                                                                               tmp_path):
    fs = s3_store.filesystem()
    files = sorted(p for p in (collection / BATCH).rglob("*") if p.is_file())
    fs.put([str(p) for p in files], [f"{s3_store.bucket}/images/{p.relative_to(collection).as_posix()}" for p in files])
    from_folder = pictures(settings, instance)

    in_bucket = settings.model_copy(update={"image_root": s3_store.url("images"), "data_dir": tmp_path / "data-b"})
    home = tmp_path / "dagster_home_b"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as other:
        from_bucket = pictures(in_bucket, other)
    # the thumbnails were read from the objects: the same sheet, byte for byte (not empty frames), and as
    # many thumbnails on the gallery page (not none)
    assert from_folder[1] > 0
    assert from_bucket == from_folder
