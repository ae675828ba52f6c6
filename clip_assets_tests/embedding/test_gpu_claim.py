"""One GPU per embedding step, tested without GPUs: fake device lists, real processes, real flocks."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clip_assets.config.settings import REPO_ROOT
from clip_assets.embedding.gpu_claim import claim_for_process, claim_gpu, device_for_embedding_step

# Claims a GPU among argv[2:] (fake ids) under the lock folder argv[1], says which, then holds it
# until its stdin closes or it is killed.
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from clip_assets.embedding.gpu_claim import claim_gpu
    claim = claim_gpu(sys.argv[2:], Path(sys.argv[1]), poll_s=0.05, report=lambda m: print("WAITING", flush=True))
    print("CLAIMED", claim.index, flush=True)
    sys.stdin.read()
    """
)


def start_holder(lock_dir: Path, ids: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), *ids], cwd=REPO_ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def first_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline().strip()
    assert line, f"holder exited with {proc.wait()}"
    return line


def claimed_index(proc: subprocess.Popen) -> int:
    line = first_line(proc)
    assert line.startswith("CLAIMED"), line
    return int(line.split()[1])


@pytest.fixture
def holders():
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_concurrent_steps_get_different_gpus_and_a_third_waits_for_one_to_free(tmp_path, holders):
    ids = ["GPU-fake-a", "GPU-fake-b"]
    holders += [start_holder(tmp_path, ids), start_holder(tmp_path, ids)]
    first, second = claimed_index(holders[0]), claimed_index(holders[1])
    assert {first, second} == {0, 1}
    holders.append(start_holder(tmp_path, ids))
    assert first_line(holders[2]) == "WAITING"  # both GPUs are held: it must not take one
    holders[0].stdin.close()  # the first step ends normally
    holders[0].wait()
    assert claimed_index(holders[2]) == first


def test_a_killed_holder_frees_its_gpu(tmp_path, holders):
    ids = ["GPU-fake-a", "GPU-fake-b", "GPU-fake-c"]
    holders += [start_holder(tmp_path, ids) for _ in range(3)]
    indices = [claimed_index(p) for p in holders]
    assert sorted(indices) == [0, 1, 2]
    victim = indices.index(1)
    holders[victim].send_signal(signal.SIGKILL)  # a crashed step: no cleanup code runs
    holders[victim].wait()
    holders.append(start_holder(tmp_path, ids))
    assert claimed_index(holders[-1]) == 1


def test_a_process_keeps_its_one_claim_and_gives_up_after_a_bounded_wait(tmp_path, holders):
    ids = ["GPU-fake-a"]
    holders.append(start_holder(tmp_path, ids))
    assert claimed_index(holders[0]) == 0
    with pytest.raises(TimeoutError, match="all 1 are held"):
        claim_gpu(ids, tmp_path, wait_s=0.3, poll_s=0.05, report=lambda m: None)
    mine = claim_for_process(["GPU-fake-x", "GPU-fake-y"], tmp_path / "own", report=lambda m: None)
    assert claim_for_process(["GPU-fake-x", "GPU-fake-y"], tmp_path / "own", report=lambda m: None) is mine
    mine.release()


def test_explicit_or_non_cuda_devices_are_kept_without_a_claim(tmp_path):
    for device in ("cpu", "cuda:1", "mps"):
        assert device_for_embedding_step(device, tmp_path) == device
    assert not list(tmp_path.iterdir())  # nothing was claimed
