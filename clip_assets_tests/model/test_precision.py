"""The image tower's precision (CLIP_ASSETS_PRECISION) and how the CPU's cores are shared.

int8 (the Linear layers dynamically quantised) and bfloat16 autocast must give embeddings that
agree with float32 to cosine 0.995 or better, on the bad-and-odd corpus of the engine tests and on
photo-like JPEGs of mixed sizes, with the same failures recorded. As in test_tensor_decode, a
randomly initialised ViT-S-32 makes the cosine check meaningful (it tells photos apart, which the
tiny test model does not); the test asserts that it does before trusting the agreement.
"""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import torch

from clip_assets.config.layout import DataLayout
from clip_assets.embedding.engine import EncodeJob, default_num_workers, encode_images, model_threads, torch_threads
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.steps import write_manifest
from clip_assets.model.clip_model import resolved_precision, tuned_for_inference, with_precision
from clip_assets.model.quantizable_attention import SelfAttention
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets_tests.support.images import photo_like, with_orientation, write_bad_batch
from clip_assets_tests.support.models import seeded_vit_s_32
from clip_assets_tests.support.vectors import agreement

CPU = torch.device("cpu")
FAST = ("int8", "bfloat16")  # each made with a fresh seeded_vit_s_32: int8 quantises in place


def embed_at_precisions(root, tmp_path, batch: str) -> dict[str, tuple[dict, dict]]:
    """float32 and each fast precision over one manifest: (image_id -> vector, path -> failure reason)."""
    out = {}
    for precision in ("float32", *FAST):
        layout = DataLayout(tmp_path / precision)
        write_manifest(root, layout, batch)
        clip = with_precision(seeded_vit_s_32(), precision)
        write_embeddings(clip, root, layout, batch, EncodeOptions(batch_size=4, num_workers=1, file_timeout_s=5))
        table = pq.read_table(layout.embeddings_path(batch))
        failures = pq.read_table(layout.embedding_failures_path(batch)).to_pylist()
        out[precision] = (dict(zip(table["image_id"].to_pylist(), vectors_matrix(table["embedding"]))),
                          {r["path"]: r["error"] for r in failures})
    return out


def against_float32(out, precision: str):
    return agreement({"pillow": out["float32"], "tensor": out[precision]})


def test_fast_precisions_agree_with_float32_on_the_bad_and_odd_corpus(tmp_path):
    root = tmp_path / "images"
    write_bad_batch(root)
    for name in ("vanishes.jpg", "hangs.jpg"):  # their outcome depends on timing, not on precision
        (root / "bad" / name).unlink(missing_ok=True)
    (root / "bad" / "rotated.jpg").write_bytes(with_orientation(photo_like(160, 90, 8), 6))
    out = embed_at_precisions(root, tmp_path, "bad")
    for precision in FAST:
        assert set(out[precision][0]) == set(out["float32"][0]) and len(out["float32"][0]) >= 5
        assert out[precision][1] == out["float32"][1] and out["float32"][1]
        same, median, highest = against_float32(out, precision)
        print(f"bad-and-odd corpus, {len(out['float32'][0])} images: {precision} vs float32 cosine >= {same:.6f}; "
              f"different images: median {median:.4f}, up to {highest:.4f}")
        assert same >= 0.995


def test_fast_precisions_agree_with_float32_on_photos_of_mixed_sizes(tmp_path):
    root = tmp_path / "images"
    (root / "photos").mkdir(parents=True)
    sizes = [(640, 480), (480, 640), (1024, 768), (1600, 1200), (2048, 1536), (4000, 3000), (800, 800), (333, 500)]
    for k, size in enumerate(sizes):
        data = with_orientation(photo_like(*size, seed=40 + k), 6 if k % 3 == 1 else 1, quality=88)
        (root / "photos" / f"photo-{k}.jpg").write_bytes(data)
    out = embed_at_precisions(root, tmp_path, "photos")
    for precision in FAST:
        same, median, highest = against_float32(out, precision)
        print(f"{len(sizes)} photo-like JPEGs 333x500..4000x3000: {precision} vs float32 cosine >= {same:.6f}; "
              f"different images: median {median:.4f}, up to {highest:.4f}")
        assert highest < 0.99  # the model tells these photos apart, so agreement to 0.995 means something
        assert same >= 0.995


def test_int8_quantises_the_image_towers_linear_layers_only():
    clip = tuned_for_inference(seeded_vit_s_32(), precision="int8")
    assert clip.precision == "int8"
    kinds = {type(m).__module__ for m in clip.model.visual.modules() if "Linear" in type(m).__name__}
    assert any("quantized" in k for k in kinds)
    assert not any("quantized" in type(m).__module__ for m in clip.model.transformer.modules())
    # The attention projections too (SelfAttention in place of MultiheadAttention), in every block.
    visual = clip.model.visual
    assert not [n for n, m in visual.named_modules() if type(m) is torch.nn.MultiheadAttention]
    projections = [m for n, m in visual.named_modules() if n.endswith((".attn.in_proj", ".attn.out_proj"))]
    assert len(projections) == 2 * len(visual.transformer.resblocks)
    assert all(type(m) is torch.ao.nn.quantized.dynamic.Linear for m in projections)
    texts = clip.encode_texts(["a photo of a cat"])
    assert torch.equal(texts, seeded_vit_s_32().encode_texts(["a photo of a cat"]))
    bf16 = with_precision(seeded_vit_s_32(), "bfloat16")  # autocast for the image tower only, too
    assert torch.equal(bf16.encode_texts(["a photo of a cat"]), texts)
    with pytest.raises(ValueError, match="load it again"):
        with_precision(clip, "float32")


def test_auto_precision_is_float32_on_the_cpu_and_int8_only_by_name():
    """int8 changes some decisions (benchmarks/precision_agreement.py), so it is never the default."""
    assert resolved_precision("auto", CPU) == "float32"
    assert resolved_precision("int8", CPU) == "int8"
    assert with_precision(seeded_vit_s_32(), "auto").computed_precision == "float32"
    cuda = torch.device("cuda")
    assert resolved_precision("auto", cuda) == "auto"  # autocast, as it always was on CUDA
    assert resolved_precision("bfloat16", cuda) == "bfloat16"
    with pytest.raises(ValueError, match="CPU only"):
        resolved_precision("int8", cuda)
    with pytest.raises(ValueError, match="CLIP_ASSETS_PRECISION"):
        resolved_precision("half", CPU)


def test_on_the_cpu_the_model_threads_take_the_cores_the_workers_leave_and_at_least_half():
    cores = os.cpu_count() or 1
    half = -(-cores // 2)
    assert model_threads(default_num_workers()) == max(1, cores - default_num_workers(), half)
    assert model_threads(0) == cores  # decoding in the calling process: it takes turns with the model
    assert model_threads(cores + 4) == half
    assert all(1 <= model_threads(w) <= cores for w in range(0, 20))


def test_the_engine_runs_the_model_on_the_cores_its_workers_leave_and_restores_torch_threads(tmp_path, clip):
    root = tmp_path / "images"
    root.mkdir()
    names = [f"p{k}.jpg" for k in range(6)]
    for k, name in enumerate(names):
        photo_like(64, 48, k).save(root / name, "JPEG")
    job = EncodeJob(names, names, [None] * 6, [None] * 6, [None] * 6, {})
    before = torch.get_num_threads()
    seen = []
    with torch_threads(before + 1):  # something other than what the engine will choose
        encode_images(clip, root, job, lambda table: seen.append(torch.get_num_threads()), EncodeOptions(batch_size=2, num_workers=1, chunk_rows=2), report=lambda s: None)
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    assert seen and set(seen) == {model_threads(1)}


def test_a_tower_with_nothing_to_quantise_refuses_int8(clip):
    """The tiny test model's ResNet tower reads its attention pooling's Linear weights directly."""
    assert not [n for n, m in clip.model.visual.named_modules() if ".mlp." in f".{n}"]
    assert with_precision(clip, "auto").computed_precision == "float32"
    with pytest.raises(ValueError, match="nothing|no MLP"):
        with_precision(clip, "int8")


def test_self_attention_from_linear_layers_computes_what_multihead_attention_does():
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = torch.nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
        x = torch.randn(3, 10, 64) if batch_first else torch.randn(10, 3, 64)
        causal = torch.triu(torch.full((10, 10), float("-inf")), diagonal=1)
        hidden = torch.rand(3 * 4, 10, 10) < 0.3  # per image and head, True: masked out
        hidden[..., 0] = False  # every query sees something
        attention = SelfAttention(mha)
        for mask in (None, causal, causal == float("-inf"), hidden):
            expected = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
            got, weights = attention(x, x, x, need_weights=False, attn_mask=mask)
            assert weights is None and got.shape == expected.shape
            assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="self-attention only"):
        attention(x, torch.randn_like(x), x)
