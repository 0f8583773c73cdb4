#!/usr/bin/env bash
# The GPU machine's setup, in two steps.
#
# Here (with network), once:   bash benchmarks/device_setup.sh download
#   fetches into .whl/ (ignored by git) the wheels that the device image lacks for Python 3.12: pydantic and
#   its dependencies, and into .whl/extra the optional extras the data tests use (tokenizers, diffusers and
#   their dependencies). The image has torch, triton, pluggy, einops, pyyaml, tqdm, torchmetrics, matplotlib,
#   pytest and pytest-xdist.
# There (no network), at the start of every device command, carrying .whl:
#   bash benchmarks/device_setup.sh
#   installs the carried wheels (the extras resolved against what the image has), and momkit itself editable (with its entry points, and so that the tests,
#   which put the repository root on sys.path, import the same package) into the image's Python.
#
# mamba_ssm (the `cuda` backend and the peer columns of the GPU benchmarks) is not built here: its build
# takes minutes (see benchmarks/RESULTS.md for the steps that worked); the tests of the `cuda` backend skip
# without it.
set -euo pipefail

WHEELS=(pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2)
EXTRAS=(diffusers tokenizers)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

if [[ "${1:-}" == "download" ]]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --quiet --no-deps "${PLATFORM[@]}" -d .whl "${WHEELS[@]}"
    python3 -m pip download --quiet "${PLATFORM[@]}" -d .whl/extra "${EXTRAS[@]}"
    ls .whl .whl/extra
else
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl
    if [[ -d .whl/extra ]]; then
        python3 -m pip install -q --no-index --no-compile --no-cache-dir --find-links .whl/extra "${EXTRAS[@]}"
    fi
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e .
    python3 -c "import momkit, torch; print('momkit', momkit.__version__, 'torch', torch.__version__,
                'GPUs', torch.cuda.device_count(), 'backends', momkit.ops.available_backends())"
fi
