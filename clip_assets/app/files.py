"""Files under the image root, and thumbnails of them: the only files the app serves. An image root in an
object store serves its objects the same way (one GET per thumbnail not cached yet)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from clip_assets.pages.gallery import write_thumbnail
from clip_assets.storage.store_root import StoreRoot, file_source, image_root_from
from clip_assets.storage.store_urls import StoreError

SEARCH_THUMBNAIL_PX = 192
REVIEW_THUMBNAIL_PX = 384  # large enough to judge an image by
THUMBNAIL_SIZES = (SEARCH_THUMBNAIL_PX, REVIEW_THUMBNAIL_PX)


class ImageFiles:
    """The image root's files as the app may serve them, and a cache of their thumbnails in `thumbs_dir`."""

    def __init__(self, image_root: Path | str | StoreRoot, thumbs_dir: Path):
        root = image_root_from(image_root)
        self.root = root.resolve() if isinstance(root, Path) else root
        self.thumbs_dir = thumbs_dir

    def source(self, relative: str) -> Path | Callable[[], bytes] | None:
        """What Pillow opens for the image `relative` names under the root (see store_root.file_source), or
        None: not under the root. In a store, a name with `..`, an empty or a dot-named part is refused."""
        if isinstance(self.root, Path):
            return self.file_under_root(relative)
        parts = PurePosixPath(relative).parts
        if not parts or relative.startswith("/") or any(p in ("..", ".") or p.startswith(".") for p in parts):
            return None
        return file_source(self.root, relative)

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
        source = self.source(relative)
        if source is None:
            return None
        if isinstance(self.root, StoreRoot):  # a HEAD: a rewritten object gets a thumbnail of its own
            try:
                length, modified = self.root.stat(relative)
            except (OSError, StoreError):
                return None
            key = hashlib.sha1(f"{self.root}/{relative}\0{length}\0{modified!r}\0{size}".encode()).hexdigest()
        else:
            st = source.stat()
            key = hashlib.sha1(f"{source}\0{st.st_size}\0{st.st_mtime_ns}\0{size}".encode()).hexdigest()
        target = self.thumbs_dir / f"{key}.jpg"
        if not write_thumbnail(source, target, size):  # an atomic write: never read half-written
            return None
        return target.read_bytes()
