"""The OpenMP wait policy is set before torch loads, and a user's own choice is kept."""

from __future__ import annotations

import os
import subprocess
import sys

from clip_assets.cpu_threads import prefer_passive_waiting


def test_idle_openmp_threads_sleep_unless_the_user_chose_otherwise():
    env = {}
    prefer_passive_waiting(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        env = dict(chosen)
        prefer_passive_waiting(env)
        assert env == chosen


def test_importing_the_package_sets_the_policy_before_torch_starts_its_threads():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import os, clip_assets, torch; torch.ones(4).sum(); print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"
