"""One GPU per embedding step: on a machine with N GPUs, N steps encode at once, never two on one.

Dagster's `gpu` pool bounds how many embedding steps run at once (set it to N); this module decides
which GPU each of them takes. A step claims a GPU by holding an exclusive `flock` on a lock file
named after the GPU's UUID (so processes that see the GPUs under different CUDA_VISIBLE_DEVICES
orders still agree), in a folder local to the machine. The kernel drops the lock when the process
ends, however it ends (SIGKILL and crashes included), so a dead step never keeps its GPU.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from clip_assets.config.settings import default

DEFAULT_LOCK_DIR = default("gpu_lock_dir")  # CLIP_ASSETS_GPU_LOCK_DIR
REPORT_EVERY_S = 30.0


@dataclass
class GpuClaim:
    """An exclusive hold on one GPU, kept until `release()` or the end of the process."""

    index: int  # torch's device index in this process
    device_id: str
    lock_path: Path
    _fd: int | None

    @property
    def device(self) -> str:
        return f"cuda:{self.index}"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd


def _holders(paths: list[Path]) -> str:
    out = []
    for path in paths:
        try:
            out.append(path.read_text().strip() or "?")
        except OSError:
            out.append("?")
    return "; ".join(out)


def claim_gpu(
    device_ids: list[str],
    lock_dir: Path = DEFAULT_LOCK_DIR,
    wait_s: float | None = None,
    poll_s: float = 0.2,
    report: Callable[[str], None] = print,
) -> GpuClaim:
    """Claim the first free GPU of `device_ids` (index order), waiting for one while all are held.

    `wait_s` None waits as long as it takes (the pool should make that rare); otherwise TimeoutError.
    """
    if not device_ids:
        raise ValueError("no GPUs to claim")
    lock_dir.mkdir(parents=True, exist_ok=True)
    paths = [lock_dir / f"gpu-{device_id}.lock" for device_id in device_ids]
    started = last_report = time.monotonic()
    reported = False
    while True:
        for index, path in enumerate(paths):
            fd = _try_lock(path)
            if fd is not None:
                return GpuClaim(index, device_ids[index], path, fd)
        now = time.monotonic()
        if wait_s is not None and now - started >= wait_s:
            raise TimeoutError(f"no free GPU after {wait_s:g} s: all {len(paths)} are held ({_holders(paths)})")
        if not reported or now - last_report >= REPORT_EVERY_S:
            report(f"waiting for a free GPU: all {len(paths)} are held ({_holders(paths)}); "
                   "is the `gpu` pool larger than the number of GPUs?")
            reported, last_report = True, now
        time.sleep(poll_s)


_process_claim: GpuClaim | None = None


def claim_for_process(device_ids: list[str], lock_dir: Path = DEFAULT_LOCK_DIR,
                      report: Callable[[str], None] = print) -> GpuClaim:
    """This process's claim: made once, then the same GPU for every later call of the process."""
    global _process_claim
    if _process_claim is None or _process_claim.device_id not in device_ids:
        _process_claim = claim_gpu(device_ids, lock_dir, report=report)
    return _process_claim


def visible_gpu_ids() -> list[str]:
    """A stable name per GPU this process sees, in torch's index order (its UUID where torch has it)."""
    import torch  # deferred: claiming needs it only on a machine with GPUs, and importing it costs seconds

    if not torch.cuda.is_available():
        return []
    ids = []
    for index in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        ids.append(str(uuid) if uuid else f"index-{index}")
    return ids


def device_for_embedding_step(device: str | None, lock_dir: Path = DEFAULT_LOCK_DIR,
                              report: Callable[[str], None] = print) -> str | None:
    """The device an embedding step should use: its own GPU when there are several to share.

    An explicit device with an index (`cuda:1`) or a non-CUDA device is the user's choice and kept.
    """
    if device not in (None, "cuda"):
        return device
    ids = visible_gpu_ids()
    if len(ids) < 2:
        return device
    claim = claim_for_process(ids, lock_dir, report)
    report(f"claimed GPU {claim.index} of {len(ids)} ({claim.device_id})")
    return claim.device
