#!/usr/bin/env bash
# The GPU machine's setup, in three steps.
#
# Here (with network), once:   bash benchmarks/device_setup.sh download
#   fetches into .whl/ (ignored by git) the wheels that the device image lacks for Python 3.12: pydantic and
#   its dependencies, and transformers 5.24 to replace the image's 5.17 (the pretrained tests compare Mamba-2
#   models with transformers, whose PyTorch path normalises per group only from 5.23); into .whl/extra the
#   optional extras the data tests use (tokenizers, diffusers and their dependencies); into .whl/peers the
#   peers of the GPU benchmarks: the source distributions of mamba_ssm and causal-conv1d, and fla-core's wheel
#   (flash-linear-attention's kernels, pure Python and Triton). The image
#   has torch, triton, pluggy, einops, pyyaml, tqdm, torchmetrics, matplotlib, pytest, pytest-xdist, and nvcc,
#   ninja, setuptools and wheel for the peers' builds.
# There (no network), at the start of every device command, carrying .whl:
#   bash benchmarks/device_setup.sh
#   installs the carried wheels (the extras resolved against what the image has), and momkit itself editable (with
#   its entry points, and so that the tests, which put the repository root on sys.path, import the same package)
#   into the image's Python.
# There, when a command needs the peers (the `cuda` backend, the peer columns of benchmarks/gpu_scan.py):
#   bash benchmarks/device_setup.sh peers [NAME ...]
#   builds causal-conv1d and mamba_ssm from .whl/peers for the local GPU's architecture only, both at once (about
#   five minutes on 16 cores), and installs them and fla; with names (mamba_ssm, causal_conv1d, fla), only those
#   (fla installs in seconds: it has nothing to build). Without
#   causal-conv1d, mamba_ssm's decoding falls back to PyTorch for its convolution step and is a weakened peer;
#   the scans and the routed linear compare with mamba_ssm and fla (`peers mamba_ssm fla`: about two minutes). The
#   machine keeps nothing between leases: plan one command that builds them and then runs every comparison that
#   needs them.
set -euo pipefail

WHEELS=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 transformers==5.24.0)
EXTRAS=(diffusers tokenizers)
PEERS=(mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0)
PEER_WHEELS=(fla-core==0.6.0)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

if [[ "${1:-}" == "download" ]]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --quiet --no-deps "${PLATFORM[@]}" -d .whl "${WHEELS[@]}"
    python3 -m pip download --quiet "${PLATFORM[@]}" -d .whl/extra "${EXTRAS[@]}"
    # their source distributions, fetched as files: pip would build their metadata, which needs nvcc
    mkdir -p .whl/peers
    python3 - "${PEERS[@]}" <<'PY'
import json, sys, urllib.request
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    project = json.load(urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json"))
    for file in project["releases"][version]:
        if file["packagetype"] == "sdist":
            urllib.request.urlretrieve(file["url"], f".whl/peers/{file['filename']}")
PY
    python3 -m pip download --quiet --no-deps -d .whl/peers "${PEER_WHEELS[@]}"
    ls .whl .whl/extra .whl/peers
elif [[ "${1:-}" == "peers" ]]; then
    shift
    names=("$@")
    [[ ${#names[@]} -gt 0 ]] || names=(mamba_ssm causal_conv1d fla)
    arch=$(python3 -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
    build=$(mktemp -d)
    for name in "${names[@]}"; do
        if [[ "$name" == fla ]]; then
            wheel=(.whl/peers/fla_core-*.whl)
            [[ -f "${wheel[0]}" ]] || { echo "no fla_core wheel in .whl/peers" >&2; exit 2; }
            python3 -m pip install -q --no-index --no-deps --no-cache-dir "${wheel[0]}"
            continue
        fi
        sdist=(.whl/peers/"$name"-*.tar.gz)
        if [[ ! -f "${sdist[0]}" ]]; then
            echo "no source of peer '$name' in .whl/peers; the peers: mamba_ssm, causal_conv1d, fla" >&2
            exit 2
        fi
        tar xzf "${sdist[0]}" -C "$build"
    done
    pids=()
    shopt -s nullglob
    for source in "$build"/*/; do
        # keep one -gencode, the local GPU's, of the many the setup scripts name
        python3 - "$source/setup.py" "$arch" <<'PY'
import re, sys
path, arch = sys.argv[1:]
text = open(path).read().replace('cc_flag.append("-gencode")', "pass")
text = re.sub(r'cc_flag\.append\("arch=compute_(\d+),code=sm_\d+"\)',
              lambda m: f'cc_flag += ["-gencode", "arch=compute_{arch},code=sm_{arch}"]' if m.group(1) == arch else "pass",
              text)
open(path, "w").write(text)
PY
        (cd "$source" && MAX_JOBS=16 MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
            python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir . \
            > "$build/$(basename "$source").log" 2>&1 || { tail -30 "$build/$(basename "$source").log"; exit 1; }) &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid"
    done
    for name in "${names[@]}"; do
        python3 -c "import $name; print('$name', $name.__version__)"
    done
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
    if [[ -d .whl/extra ]]; then
        python3 -m pip install -q --no-index --no-compile --no-cache-dir --find-links .whl/extra "${EXTRAS[@]}"
    fi
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e .
    python3 -c "import momkit, torch; print('momkit', momkit.__version__, 'torch', torch.__version__,
                'GPUs', torch.cuda.device_count(), 'backends', momkit.ops.available_backends())"
fi
