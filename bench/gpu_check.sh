#!/usr/bin/env bash
# bench/gpu_check.py as one call of the device tool (README, Benchmarks, "GPU check"). Two steps:
#
#   bash bench/gpu_check.sh prepare MIRROR   # here, once per checkout: Kornia's wheels into .whl/, the original
#                                            # network_swinir.py into third_party/swinir/ (both git-ignored);
#                                            # MIRROR: the git directory the fetch tool gave for JingyunLiang/SwinIR
#   bash bench/gpu_check.sh run OUT          # on the GPU machine, with .whl and third_party carried: OUT=$OUT
#                                            # (here: `run /tmp/gpu_check --cpu --quick` tries the same path)
#
# The GPU machine has Python 3.12 and PyTorch but no Kornia and no internet: the wheels travel with the call.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(kornia==0.9.0 kornia_rs==0.2.0)  # kornia 0.9.0 needs kornia_rs >= 0.2.0; numpy and torch are there

case "${1:-}" in
prepare)
    mirror="${2:?usage: bench/gpu_check.sh prepare MIRROR_GIT_DIR}"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || exit 1
    mkdir -p third_party/swinir
    git --git-dir="$mirror" show HEAD:models/network_swinir.py > third_party/swinir/network_swinir.py || exit 1
    ls -l .whl/kornia-0.9.0-*.whl .whl/kornia_rs-0.2.0-*.whl third_party/swinir/network_swinir.py
    ;;
run)
    out="${2:?usage: bench/gpu_check.sh run OUT [gpu_check options]}"
    mkdir -p "$out"
    if ! python3 -c "import kornia" 2>/dev/null; then
        # Only the two wheels by name: another version of one in .whl/ would stop the install.
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/kornia-0.9.0-*.whl .whl/kornia_rs-0.2.0-*.whl || exit 1
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONUNBUFFERED=1
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1
    # The check skips sections that would start after 420 s; this limit is the last resort.
    timeout 500 python3 -m bench.gpu_check --original third_party/swinir --out "$out" "${@:3}" 2>&1 \
        | tee "$out/gpu_check.log"
    exit "${PIPESTATUS[0]}"
    ;;
*)
    echo "usage: bash bench/gpu_check.sh prepare MIRROR_GIT_DIR | run OUT" >&2
    exit 2
    ;;
esac
