#!/usr/bin/env bash
# The GPU check (issue 9): the real pipeline on one GPU, timed, beside plain reference loops;
# writes benchmarks/results/gpu.json (see benchmarks/gpu_check.py for what it runs).
#
# For a GPU machine that has Python 3.12 with JAX (CUDA), numpy, scikit-learn, matplotlib,
# pyyaml and h5py, but no Keras, MLflow or DVC, and no internet. Prepare on a machine that
# has internet, in the repository root:
#     bash benchmarks/gpu_wheels.sh --one-dir   # Python 3.12 wheels of Keras, MLflow, DVC -> .whl/
#     .venv/bin/dvc repro download           # the data -> data/raw/ (gitignored)
# then send the working tree with .whl and data/raw (the device tool: carry [".whl", "data/raw"])
# and run, within 10 minutes:
#     bash benchmarks/gpu_check.sh [--budget-s 420]
# With $OUT set (the device tool), gpu.json and the pipeline's results come back there:
# results.tar.gz (dvc.lock, metrics/, reports/, gpu.json) and models.tar.gz (models/, predictions/).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c "import keras, mlflow, dvc" 2>/dev/null; then
    [ -d .whl ] || { echo "ERROR: no .whl/: run benchmarks/gpu_wheels.sh where pip reaches PyPI" >&2; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
fi
[ -f data/raw/source.json ] || { echo "ERROR: data/raw/ is missing: carry it (dvc repro download)" >&2; exit 1; }
# the project from this tree (the stages import fmnist; the check imports benchmarks.*)
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}
# stages other than train import Keras too, and TensorFlow (Keras' default) is not installed here;
# the train stage chooses its backend from params.yaml (train.backend: auto -> jax on a GPU)
export KERAS_BACKEND=${KERAS_BACKEND:-jax}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 DVC_NO_ANALYTICS=1
if [ ! -d .git ]; then  # DVC wants a git repository; the device may get a copy without one
    if command -v git >/dev/null; then
        git init -q && git add -A && git -c user.name=gpu-check -c user.email=gpu-check@localhost commit -qm "GPU check"
    else  # `dvc repro` also works without git (experiments do not)
        python3 -m dvc config --local core.no_scm true
    fi
fi
# a second call on the same machine: the lock of what the first call finished (gpu_check.py)
[ -f .gpu-state/dvc.lock ] && cp .gpu-state/dvc.lock dvc.lock
nvidia-smi || true
status=0
python3 -m benchmarks.gpu_check "$@" || status=$?
if [ -n "${OUT:-}" ]; then
    cp benchmarks/results/gpu.json "$OUT/" || true
    tar czf "$OUT/results.tar.gz" dvc.lock metrics reports benchmarks/results/gpu.json || true
    tar czf "$OUT/models.tar.gz" $(ls -d models predictions 2>/dev/null) || true
fi
exit $status
