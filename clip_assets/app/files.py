"""Files under the image root, and thumbnails of them: the only files the app serves."""

from __future__ import annotations

import hashlib
from pathlib import Path

from clip_assets.pages.gallery import write_thumbnail

SEARCH_THUMBNAIL_PX = 192
REVIEW_THUMBNAIL_PX = 384  # large enough to judge an image by
THUMBNAIL_SIZES = (SEARCH_THUMBNAIL_PX, REVIEW_THUMBNAIL_PX)


class ImageFiles:
    """The image root's files as the app may serve them, and a cache of their thumbnails in `thumbs_dir`."""

    def __init__(self, image_root: Path, thumbs_dir: Path):
        self.root = Path(image_root).resolve()
        self.thumbs_dir = thumbs_dir

    def file_under_root(self, relative: str) -> Path | None:
        """The file `relative` names inside the image root, or None: no `..`, absolute paths or
        symlinks leading out of it, no folders."""
        try:
            path = (self.root / relative).resolve()
            return path if path.is_relative_to(self.root) and path.is_file() else None
        except (OSError, ValueError, RuntimeError):  # a NUL byte; a loop of links (RuntimeError from resolve)
            return None

    def thumbnail(self, relative: str, size: int = SEARCH_THUMBNAIL_PX) -> bytes | None:
        """A JPEG of an image under the root at most `size` pixels a side (cached by path, size and
        mtime), or None: not under the root, or not an image any more."""
        source = self.file_under_root(relative)
        if source is None:
            return None
        st = source.stat()
        key = hashlib.sha1(f"{source}\0{st.st_size}\0{st.st_mtime_ns}\0{size}".encode()).hexdigest()
        target = self.thumbs_dir / f"{key}.jpg"
        if not write_thumbnail(source, target, size):  # an atomic write: never read half-written
            return None
        return target.read_bytes()
