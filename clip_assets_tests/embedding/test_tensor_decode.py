"""The tensor decode path (the GPU path, run here on the CPU): routing, preprocessing, equivalence.

The tensor path decodes JPEGs with torchvision and preprocesses them as tensor ops; the Pillow path
decodes in workers with Pillow. Both must give the model the same pixels, record the same failures,
and give embeddings that agree to cosine 0.995 or better.

Which model makes the cosine check meaningful: the project's tiny test model with random weights
maps every image to nearly the same vector (cosine above 0.9999 between different photos), so
0.995 would pass whatever the pixels. A randomly initialised ViT-S-32 (ViT-B-32's preprocessing,
a quarter of its cost) tells photos apart (cosine about 0.93 between different ones), so there the
check can fail; the tests assert that it does separate the photos before trusting the agreement.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision import transforms as T

from clip_assets.config.layout import DataLayout
from clip_assets.embedding import tensor_decode
from clip_assets.embedding.decode import decode_image, draft_size, failure_reason
from clip_assets.embedding.image_files import FileDigest, ImageFiles
from clip_assets.embedding.perceptual_hash import hamming, perceptual_hash
from clip_assets.embedding.jpeg_header import apply_orientation, sniff_jpeg
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.embedding.tensor_decode import (
    DECODE_PIXELS_PER_CALL,
    JpegBytesOrPixels,
    RawJpeg,
    TensorDecoder,
    choose_decode_path,
    collate_bytes_or_pixels,
    decode_jpegs,
    decoded_batches,
)
from clip_assets.embedding.tensor_preprocess import TensorPreprocess, UnsupportedTransform
from clip_assets.ingest.steps import write_manifest
from clip_assets.model.clip_model import ClipModel
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets_tests.support.images import jpeg_bytes, photo_like, with_orientation, write_bad_batch, ycck_jpeg
from clip_assets_tests.support.vectors import agreement

CPU = torch.device("cpu")


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def progressive_jpeg() -> bytes:
    return jpeg_bytes(photo_like(90, 60, 4), progressive=True)


@pytest.mark.parametrize(
    "name, data, decodable",
    [
        ("baseline", lambda: jpeg_bytes(photo_like(90, 60)), True),
        ("grey", lambda: jpeg_bytes(photo_like(90, 60).convert("L")), True),
        ("with EXIF", lambda: with_orientation(photo_like(90, 60), 6), True),
        ("progressive", progressive_jpeg, False),
        ("CMYK", lambda: jpeg_bytes(Image.new("CMYK", (40, 30), (0, 255, 255, 0))), False),
        ("YCCK", ycck_jpeg, False),
        ("truncated", lambda: jpeg_bytes(photo_like(90, 60))[:-400], False),
        ("PNG", lambda: png_bytes(photo_like(20, 20)), False),
        ("text", lambda: b"<html>not found</html>", False),
    ],
)
def test_only_what_the_batch_decoder_takes_goes_to_it(name, data, decodable):
    header = sniff_jpeg(data())
    assert header.batch_decodable == decodable, (name, header)
    assert not decodable or header.pixels in (90 * 60, 60 * 90)
    assert decodable or header.why_not


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(orientation):
    data = with_orientation(photo_like(40, 24, 3), orientation, quality=95)
    header = sniff_jpeg(data)
    assert header.orientation == orientation
    (decoded,) = decode_jpegs([as_tensor(data)], CPU)
    ours = apply_orientation(decoded, header.orientation)
    pillows = torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)
    assert ours.shape == pillows.shape
    assert torch.equal(ours, pillows)  # same libjpeg-turbo decode, so the same pixels exactly


@pytest.mark.parametrize(
    "cfg",
    [
        PreprocessCfg(size=224),  # CLIP: shortest side, bicubic, centre crop
        PreprocessCfg(size=(224, 320)),  # non-square shortest (open_clip's ResizeKeepRatio)
        PreprocessCfg(size=224, resize_mode="squash", interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3),
        PreprocessCfg(size=(256, 192), resize_mode="longest", fill_color=0),  # resize, then pad
    ],
    ids=["shortest", "shortest-non-square", "squash-bilinear", "longest-padded"],
)
def test_tensor_preprocess_gives_the_models_own_pixels(cfg):
    """Against the model's own transform on the Pillow image: the same pixels up to uint8 rounding."""
    transform = image_transform_v2(cfg, is_train=False)
    data = jpeg_bytes(photo_like(1600, 1200, seed=5), quality=92)
    reference = transform(decode_image(data))
    (decoded,) = decode_jpegs([as_tensor(data)], CPU)
    ours = TensorPreprocess(transform)([decoded])[0]
    assert ours.shape == reference.shape
    one_level = 1 / 255 / min(cfg.std)  # one uint8 step, in normalised units
    error = (reference - ours).abs()
    assert error.max().item() <= 1.01 * one_level  # never more than one rounding step apart
    assert error.mean().item() <= 0.25 * one_level, error.mean().item()


def test_a_preprocessing_step_without_a_tensor_equivalent_is_refused():
    with pytest.raises(UnsupportedTransform, match="Grayscale"):
        TensorPreprocess(T.Compose([T.Resize(64), T.Grayscale(3), T.ToTensor()]))


@pytest.mark.parametrize("pixels_per_call", [DECODE_PIXELS_PER_CALL, 1])  # one call, or one per file
def test_a_jpeg_the_batch_decoder_refuses_falls_back_to_pillow_alone(clip, monkeypatch, pixels_per_call):
    """A file that looks decodable but is not fails the batch call; its batch-mates still decode."""
    monkeypatch.setattr(tensor_decode, "DECODE_PIXELS_PER_CALL", pixels_per_call)
    good = jpeg_bytes(photo_like(120, 90, 1))
    bad = bytearray(good)
    sof = bad.find(b"\xff\xc0")
    bad[sof + 5 : sof + 9] = b"\x00\x00\x00\x00"  # height and width 0: torchvision refuses it
    assert sniff_jpeg(bytes(bad)).batch_decodable
    items = [(k, RawJpeg(d, 1, 120 * 90), FileDigest(f"digest-{k}"), None) for k, d in enumerate([good, bytes(bad), good])]
    decoder = TensorDecoder(CPU, clip.preprocess, draft_size(clip))
    indices, digests, pixels, unchanged, failed = decoder.pixels(collate_bytes_or_pixels(items))
    assert indices == [0, 2] and [d.fingerprint for d in digests] == ["digest-0", "digest-2"] and pixels.shape[0] == 2
    # hashed from the pixels decoded on the device, within a few bits of the Pillow path's hash
    pillow_hash = perceptual_hash(decode_image(good, draft_size(clip)))
    assert all(hamming(np.array([d.perceptual_hash]), np.array([pillow_hash]))[0] <= 4 for d in digests)
    (index, reason), = failed
    with pytest.raises(Exception) as pillow:
        decode_image(bytes(bad))
    assert index == 1 and reason == failure_reason(pillow.value)  # the Pillow path's reason


def test_the_decode_thread_hands_on_a_loader_error_and_stops(clip):
    def loader():
        yield collate_bytes_or_pixels([(0, RawJpeg(jpeg_bytes(photo_like(60, 40)), 1, 60 * 40), FileDigest("d"), None)])
        raise RuntimeError("worker died")

    batches = decoded_batches(loader(), TensorDecoder(CPU, clip.preprocess, draft_size(clip)), ahead=True)
    assert next(batches)[0] == [0]
    with pytest.raises(RuntimeError, match="worker died"):
        next(batches)


def test_auto_takes_the_tensor_path_only_on_cuda_where_it_measures_faster():
    cuda = torch.device("cuda")
    assert choose_decode_path("auto", CPU, lambda: (1e9, 1.0))[0] == "pillow"
    assert choose_decode_path("auto", cuda, lambda: (900.0, 300.0))[0] == "tensor"
    assert choose_decode_path("auto", cuda, lambda: (200.0, 300.0))[0] == "pillow"
    assert choose_decode_path("tensor", CPU, None)[0] == "tensor"
    with pytest.raises(ValueError, match="CLIP_ASSETS_DECODE"):
        choose_decode_path("gpu", CPU, None)


def embed_both_ways(clip: ClipModel, root, tmp_path, batch: str, workers: int):
    """Both paths over one manifest; returns per path (image_id -> vector, path -> failure reason)."""
    out = {}
    first = DataLayout(tmp_path / "pillow")
    write_manifest(root, first, batch)
    for decode in ("pillow", "tensor"):
        layout = DataLayout(tmp_path / decode)
        if decode != "pillow":
            layout.manifest_path(batch).parent.mkdir(parents=True)
            shutil.copy(first.manifest_path(batch), layout.manifest_path(batch))
        write_embeddings(clip, root, layout, batch, EncodeOptions(batch_size=4, num_workers=workers, file_timeout_s=5, decode=decode))
        table = pq.read_table(layout.embeddings_path(batch))
        failures = pq.read_table(layout.embedding_failures_path(batch)).to_pylist()
        out[decode] = (dict(zip(table["image_id"].to_pylist(), vectors_matrix(table["embedding"]))),
                       {r["path"]: r["error"] for r in failures})
    return out


def test_bad_and_odd_files_same_outcomes_and_embeddings_both_ways(tmp_path, vit_s_32, clip):
    root = tmp_path / "images"
    cases = write_bad_batch(root)
    batch_dir = root / "bad"
    (batch_dir / "vanishes.jpg").unlink(missing_ok=True)  # the manifest was not written yet: keep them out
    (batch_dir / "hangs.jpg").unlink(missing_ok=True)
    (batch_dir / "progressive.jpg").write_bytes(progressive_jpeg())
    (batch_dir / "rotated.jpg").write_bytes(with_orientation(photo_like(160, 90, 8), 6))
    dataset = JpegBytesOrPixels(root, [f"bad/{n}" for n in ("good.jpg", "grey.jpg", "cmyk.jpg", "progressive.jpg")],
                                [None] * 4, vit_s_32.preprocess, draft_size(vit_s_32), 5)
    assert [isinstance(dataset[k][1], RawJpeg) for k in range(4)] == [True, True, False, False]
    for model in (vit_s_32, clip):
        out = embed_both_ways(model, root, tmp_path / model.identity.replace("/", "_"), "bad", workers=2)
        assert set(out["tensor"][0]) == set(out["pillow"][0])
        assert out["tensor"][1] == out["pillow"][1]
        assert set(out["pillow"][1]) == {f"bad/{n}" for n, o in cases.items() if o == "embedding"} - {
            "bad/vanishes.jpg", "bad/hangs.jpg"}
        same, median, highest = agreement(out)  # (the corpus has images of identical content: highest is 1)
        print(f"{model.identity}: bad-and-odd corpus, {len(out['pillow'][0])} images: tensor vs Pillow cosine "
              f">= {same:.6f}; different images: median {median:.4f}, up to {highest:.4f}")
        assert same >= 0.995
    assert cases["good.jpg"] == "ok"


def test_photos_of_mixed_sizes_agree_both_ways(tmp_path, vit_s_32):
    root = tmp_path / "images"
    (root / "photos").mkdir(parents=True)
    sizes = [(640, 480), (480, 640), (1024, 768), (1600, 1200), (2048, 1536), (4000, 3000), (800, 800), (333, 500)]
    for k, size in enumerate(sizes):
        img = photo_like(*size, seed=20 + k)
        data = with_orientation(img, 6 if k % 3 == 1 else 1, quality=88)
        (root / "photos" / f"photo-{k}.jpg").write_bytes(data)
    out = embed_both_ways(vit_s_32, root, tmp_path, "photos", workers=2)
    same, median, highest = agreement(out)
    print(f"{vit_s_32.identity}: {len(sizes)} photo-like JPEGs 333x500..4000x3000: tensor vs Pillow cosine "
          f">= {same:.6f}; different images: median {median:.4f}, up to {highest:.4f}")
    assert highest < 0.99  # the model tells these photos apart, so agreement to 0.995 means something
    assert same >= 0.995


def test_a_jpeg_over_the_pixel_limit_fails_as_a_decompression_bomb_on_both_paths(tmp_path, clip, monkeypatch):
    """The manifest no longer opens headers: the batch decoder must not take a bomb that Pillow refuses."""
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "big.jpg").write_bytes(jpeg_bytes(photo_like(90, 60)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 90 * 60 // 3)  # Pillow raises from twice the limit
    for dataset_type in (ImageFiles, JpegBytesOrPixels):
        _, pixels, _, reason = dataset_type(tmp_path, ["b/big.jpg"], [None], clip.preprocess, draft_size(clip), 5)[0]
        assert pixels is None and reason.startswith("decompression bomb: "), (dataset_type, reason)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 90 * 60 * 2 // 3)  # between the limit and twice it: Pillow warns
    for dataset_type in (ImageFiles, JpegBytesOrPixels):
        _, pixels, _, reason = dataset_type(tmp_path, ["b/big.jpg"], [None], clip.preprocess, draft_size(clip), 5)[0]
        assert pixels is None and reason.startswith("decompression bomb: "), (dataset_type, reason)
