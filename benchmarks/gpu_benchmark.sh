#!/usr/bin/env bash
# The GPU figures of benchmarks/embed_throughput.py in one command, on a machine with CUDA and
# PyTorch but no package registry (the `device` tool's GPU machines).
#
#   bash benchmarks/gpu_benchmark.sh fetch          # here, with PyPI: the missing wheels into .whl/
#   bash benchmarks/gpu_benchmark.sh run            # there (carry .whl): both corpora, output in $OUT
#   bash benchmarks/gpu_benchmark.sh run 640x480    # one corpus, if a call must stay under 10 minutes
#
# `run` installs the wheels into /tmp/site (nothing else is touched), then measures ViT-B-32 and
# ViT-L-14 on 640x480 and on mixed-size JPEGs: decode only (CPU workers, GPU), model only (plain,
# channels_last, torch.compile on 640x480), the engine on each decode path, the equivalence of the
# two paths' embeddings, and the GPU's name. It needs no dagster or duckdb: only the engine runs.
set -euo pipefail
cd "$(dirname "$0")/.."
# What the engine imports that the machine's image lacks (it has torch, torchvision, pillow, pyarrow,
# numpy, regex, tqdm, huggingface_hub, safetensors): open_clip and ftfy, at uv.lock's versions.
WHEELS=(open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)

case "${1:-run}" in
fetch)
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls .whl
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    out="${OUT:-/tmp}/embed_throughput_gpu.txt"
    nvidia-smi -L | tee -a "$out"
    corpora=("${@:2}")
    [ ${#corpora[@]} -eq 0 ] && corpora=(640x480 mixed)
    for corpus in "${corpora[@]}"; do
        if [ "$corpus" = 640x480 ]; then extra=(--images 2000 --repeat 10 --compile); else extra=(--images 500 --repeat 2); fi
        python3 benchmarks/embed_throughput.py --device cuda --batch-size 0 --models ViT-B-32 ViT-L-14 \
            --corpora "$corpus" --rss-images 0 --cache /tmp/clip-assets-bench "${extra[@]}" 2>&1 | tee -a "$out"
    done
    ;;
*)
    echo "usage: $0 fetch | run [640x480] [mixed]" >&2
    exit 2
    ;;
esac
