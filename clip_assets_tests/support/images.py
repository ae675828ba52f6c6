"""Image files made for tests: photo-like pixels, JPEG bytes (with EXIF orientation, YCCK), and a
batch holding one file of every bad or odd kind the pipeline must cope with."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def photo_like(w, h, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def ycck_jpeg() -> bytes:
    data = bytearray(jpeg_bytes(Image.new("CMYK", (64, 48), (10, 200, 30, 0))))
    adobe = data.find(b"Adobe")
    data[adobe + 11] = 2  # Adobe APP14 transform 2: the scan is YCCK
    return bytes(data)


def write_bad_batch(root: Path) -> dict[str, str]:
    """One file per case of the issue; returns name -> where its outcome shows ('ok', 'manifest', 'embedding').

    The manifest only stats: what needs the file's bytes to tell (not an image, a broken header, a
    decompression bomb) is found and recorded by the embedding step."""
    batch = root / "bad"
    batch.mkdir(parents=True)
    good = photo_like(120, 90)
    cases = {}

    def put(name, data: bytes, outcome):
        (batch / name).write_bytes(data)
        cases[name] = outcome

    put("good.jpg", jpeg_bytes(good), "ok")
    put("zero-byte.jpg", b"", "manifest")
    put("truncated.jpg", jpeg_bytes(photo_like(400, 300, 1))[:3000], "embedding")
    png = io.BytesIO()
    photo_like(200, 150, 2).save(png, "PNG")
    put("truncated.png", png.getvalue()[: len(png.getvalue()) // 2], "embedding")
    put("page.jpg", b"<!doctype html><html><body>not found</body></html>", "embedding")
    put("notes.png", b"just some text\n", "embedding")
    put("header-only.png", png.getvalue()[:20], "embedding")  # the signature, then the header cut short
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, "PNG")  # 144 megapixels in a few kB
    put("bomb.png", bomb.getvalue(), "embedding")
    put("cmyk.jpg", jpeg_bytes(Image.new("CMYK", (80, 60), (0, 255, 255, 0))), "ok")
    put("ycck.jpg", ycck_jpeg(), "ok")
    sixteen = io.BytesIO()
    Image.fromarray(np.full((40, 50), 32768, dtype=np.uint16)).save(sixteen, "PNG")
    put("sixteen-bit.png", sixteen.getvalue(), "ok")
    pal = Image.new("P", (50, 40), 1)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.info["transparency"] = 1
    palette = io.BytesIO()
    pal.save(palette, "PNG", transparency=1)
    put("palette-transparent.png", palette.getvalue(), "ok")
    grey = io.BytesIO()
    good.convert("L").save(grey, "JPEG")
    put("grey.jpg", grey.getvalue(), "ok")
    for fmt in ("GIF", "WEBP"):
        frames = [Image.new("RGB", (40, 40), c) for c in ((0, 200, 0), (200, 0, 0))]
        anim = io.BytesIO()
        frames[0].save(anim, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        put(f"animated.{fmt.lower()}", anim.getvalue(), "ok")
    outside = root.parent / "outside.jpg"  # beyond the image root
    outside.write_bytes(jpeg_bytes(good))
    os.symlink(outside, batch / "link-outside.jpg")
    cases["link-outside.jpg"] = "manifest"
    for name in ("vanishes.jpg", "hangs.jpg"):
        put(name, jpeg_bytes(good), "embedding")  # made bad after the manifest is written
    return cases


def with_orientation(img: Image.Image, orientation: int, **kw) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(img, exif=exif.tobytes(), **kw)
