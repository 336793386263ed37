#!/usr/bin/env bash
# The test suite (or part of it) against another megatron-core release, on the CPU, before a GPU
# session or an NGC container finds out: megatron-core is pure Python apart from a dataset helper
# this project does not use, so the wheel of a newer release (built for Python 3.12, as NGC
# containers have it) runs here on .venv's Python 3.11 and torch.
#
#   bash tools/test_megatron_core.sh WHEEL [pytest arguments]
#   bash tools/test_megatron_core.sh megatron_core-0.19.2-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl -x tests/test_step.py
#
# WHEEL: a megatron-core wheel (e.g. from `pip download megatron-core==0.19.2 --no-deps
# --only-binary=:all: --python-version 3.12 -d DIR` on a machine with PyPI) or a folder it is
# unpacked in. The wheel is unpacked into a temporary folder that goes before .venv's
# site-packages on PYTHONPATH, so every process the tests spawn imports it; .venv is unchanged.
# Without pytest arguments the whole suite runs (tests/).
set -euo pipefail
wheel=${1:?usage: bash tools/test_megatron_core.sh WHEEL|FOLDER [pytest arguments]}
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
if [ -d "$wheel" ]; then
    site=$(cd "$wheel" && pwd)
else
    site=$(mktemp -d "${TMPDIR:-/tmp}/megatron-core.XXXXXX")
    trap 'rm -rf "$site"' EXIT
    "$python" -m zipfile -e "$wheel" "$site"
fi
[ -d "$site/megatron/core" ] || { echo "$wheel: no megatron/core inside" >&2; exit 2; }
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# megatron-core 0.19 imports triton when it is imported (its MoE paged-stash kernels), and
# PyTorch's CPU wheel comes without it: the check then takes triton (import only; nothing
# here runs a Triton kernel on the CPU) from a folder of its own, installed once, outside .venv.
if ! "$python" -c "import triton" >/dev/null 2>&1; then
    triton_site=${TRITON_SITE:-.whl/triton-site}
    if [ ! -d "$triton_site/triton" ]; then
        echo "[test_megatron_core] installing triton (import only) into $triton_site" >&2
        "$python" -m pip install -q --no-deps --target "$triton_site" "${TRITON_PIN:-triton}"
    fi
    export PYTHONPATH="$PYTHONPATH:$(cd "$triton_site" && pwd)"
fi
"$python" -c "import megatron.core as m; print('megatron-core', m.__version__, 'from', m.__file__.rsplit('/megatron/', 1)[0])"
[ $# -gt 0 ] || set -- tests
exec "$python" -m pytest -q -p no:cacheprovider "$@"
