"""A test-only Pillow format whose decoder aborts the process: a native decoder crash, for real.

A file that starts with `MAGIC` opens like any image (the header parses, so the manifest lists it
as usable), and decoding its pixels calls `os.abort()`: the process dies by SIGABRT, as it would in
a C decoder that hits an assertion. A file that starts with `WORKER_ONLY_MAGIC` aborts only inside
a DataLoader worker and decodes fine anywhere else: a crash that cannot be reproduced in isolation.

Registered with `register()` for one test and removed with `unregister()`; decode workers forked
while it is registered have it too.
"""

from __future__ import annotations

import os

from PIL import Image, ImageFile
from torch.utils.data import get_worker_info

MAGIC = b"CRASHME!"
WORKER_ONLY_MAGIC = b"CRASHWK!"
FORMAT = "CRASHME"
SIZE = (32, 32)


class CrashingImageFile(ImageFile.ImageFile):
    format = FORMAT
    format_description = "test-only format whose decoder aborts the process"

    def _open(self) -> None:
        magic = self.fp.read(len(MAGIC))
        if magic not in (MAGIC, WORKER_ONLY_MAGIC):
            raise SyntaxError("not a CRASHME file")
        self._size = SIZE
        self._mode = "RGB"
        self.tile = [ImageFile._Tile(FORMAT, (0, 0, *SIZE), len(MAGIC), magic == WORKER_ONLY_MAGIC)]


class AbortingDecoder(ImageFile.PyDecoder):
    def decode(self, buffer):
        worker_only = self.args[0]
        if not worker_only or get_worker_info() is not None:
            os.abort()
        self.set_as_raw(bytes(buffer[: SIZE[0] * SIZE[1] * 3]))
        return -1, 0


def crashing_file_bytes(worker_only: bool = False) -> bytes:
    return (WORKER_ONLY_MAGIC if worker_only else MAGIC) + bytes(range(256)) * (SIZE[0] * SIZE[1] * 3 // 256)


def register() -> None:
    Image.register_open(FORMAT, CrashingImageFile, lambda prefix: prefix[: len(MAGIC)] in (MAGIC, WORKER_ONLY_MAGIC))
    Image.register_decoder(FORMAT, AbortingDecoder)


def unregister() -> None:
    Image.OPEN.pop(FORMAT, None)
    if FORMAT in Image.ID:
        Image.ID.remove(FORMAT)
    Image.DECODERS.pop(FORMAT, None)
