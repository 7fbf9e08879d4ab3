#!/usr/bin/env bash
# Wheels for the GPU check. The lent GPU machine (Python 3.12.3, JAX 0.11.2 + CUDA 13, numpy,
# pandas, scikit-learn, matplotlib, pyyaml, h5py, rich, protobuf, ... but no Keras, MLflow or DVC)
# has no internet, so what it lacks travels as py3.12 manylinux x86_64 wheels in the working tree:
#   .whl/      keras 3.15.1 + mlflow-skinny 3.17.2 with its SQLite store (~20 MB, 35 wheels)
#   .whl-dvc/  dvc 3.67.1 on top of .whl/ (~11 MB, 53 wheels; optional, send it only if it fits)
# (--one-dir puts both sets in .whl/, 88 wheels, ~30.7 MB, as benchmarks/gpu_check.sh expects;
#  --no-dvc fetches .whl/ alone and leaves .whl-dvc/ as it is.)
# Both folders are ignored (.gitignore), so a device call names them in `carry`
# ([".whl"] or [".whl", ".whl-dvc"]) and starts with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl [.whl-dvc/*.whl] && export PYTHONPATH=/tmp/site:$PWD/src \
#     PATH=/tmp/site/bin:$PATH KERAS_BACKEND=jax DVC_NO_ANALYTICS=1 || exit
#   bash benchmarks/gpu_wheels.sh --check     # versions + keras/mlflow(/dvc) smoke test, ~1 min
# The set is the Requires-Dist closure of keras/mlflow-skinny/sqlalchemy/alembic (and dvc) minus
# what the device image already has, pruned to what the project uses: no uvicorn (server only),
# no google-auth (databricks-sdk is there only because mlflow probes the `databricks` namespace
# at import); sqlalchemy and wcwidth as their pure-python wheels; typing-extensions is carried
# because pydantic-core needs >=4.16 (Sentinel). antlr4-python3-runtime 4.9.3 (hydra) is
# sdist-only and built here as a pure-python wheel. Verified on CPU with the cp311 twins of these
# wheels over the device's packages: smoke test, `pytest -m 'not slow'`, the jax training tests
# and tests/test_pipeline.py (`dvc repro`).
#
# Usage, from the repository root: bash benchmarks/gpu_wheels.sh [--no-dvc | --one-dir | --check]
# Idempotent: present wheels are kept, missing ones fetched, any other *.whl removed.
set -euo pipefail

[[ -f dvc.yaml && -f pyproject.toml ]] || { echo "run from the repository root" >&2; exit 1; }

CORE=(  # -> .whl/
  keras==3.15.1 namex==0.1.0 optree==0.20.0
  mlflow-skinny==3.17.2 alembic==1.20.1 mako==1.4.3 sqlalchemy==2.1.9
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 databricks-sdk==0.162.0
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  cachetools==7.3.3 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0
  opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2 python-dotenv==1.2.4 sqlparse==0.6.1
  jinja2==3.1.6 markupsafe==3.0.4 markdown-it-py==4.3.0 mdurl==0.1.2  # the report (the device's
  # torch and rich may bring them; carried so that the analyse stage cannot miss them)
  psutil==7.2.2 nvidia-ml-py==13.590.44  # MLflow's system metrics: CPU, memory; the GPU's (NVML)
)
DVC=(  # -> .whl-dvc/ (needs .whl/ too)
  dvc==3.67.1 dvc-data==3.18.3 dvc-http==2.32.0 dvc-objects==5.2.0 dvc-render==1.0.2
  dvc-studio-client==0.23.0 dvc-task==0.40.2 scmrepo==3.6.2 dulwich==1.2.21 pygit2==1.21.0
  asyncssh==2.24.1 aiohttp-retry==2.9.1 celery==5.7.0 kombu==5.7.0 billiard==4.3.2 amqp==5.4.2
  vine==5.1.0 click-didyoumean==0.3.1 click-plugins==1.1.1.2 click-repl==0.4.1
  prompt-toolkit==3.0.53 wcwidth==0.9.4 hydra-core==1.3.8 omegaconf==2.3.1
  antlr4-python3-runtime==4.9.3 gto==1.10.1 pydantic-settings==2.16.3 semver==3.1.2
  entrypoints==0.4.2 iterative-telemetry==0.0.10 appdirs==1.4.4 distro==1.9.0
  configobj==5.0.9 dictdiffer==0.10.0 diskcache==5.6.3 dpath==2.2.0 flatten-dict==0.5.0
  flufl-lock==9.2.0 atpublic==9.0.0 funcy==2.1 grandalf==0.8 orjson==3.13.0
  platformdirs==4.14.8 pydot==4.0.1 pygtrie==2.6.2 ruamel-yaml==0.19.1 shortuuid==1.0.13
  shtab==1.13.0 sqltrie==0.11.3 tomlkit==0.15.2 tzlocal==5.4.5 voluptuous==0.16.0 zc-lockfile==4.0
)
PURE=" sqlalchemy wcwidth "       # take the py3-none-any wheel, not the larger compiled one
SDIST=" antlr4-python3-runtime "  # no wheel on PyPI: build a pure-python one locally

check() {  # on the device, after the pip install above
  python3 - <<'EOF'
import importlib.metadata as md, os, sys, tempfile, pathlib
os.environ.setdefault("KERAS_BACKEND", "jax")
print(sys.version.split()[0], {n: md.version(n) for n in ("numpy", "jax", "jaxlib", "protobuf",
      "typing_extensions", "pandas", "h5py", "ml_dtypes", "keras", "mlflow-skinny")})
import numpy as np, keras, jax, mlflow
from mlflow.models import infer_signature
print("keras backend", keras.backend.backend(), jax.devices())
x, y = np.random.rand(64, 28, 28, 1).astype("float32"), np.random.randint(0, 10, 64)
m = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                      keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
m.compile("adam", "sparse_categorical_crossentropy")
m.fit(x, y, epochs=1, verbose=0)
root = pathlib.Path(tempfile.mkdtemp())
mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
exp = mlflow.create_experiment("smoke", artifact_location=(root / "art").as_uri())
with mlflow.start_run(experiment_id=exp) as run:
    mlflow.log_params({"a": 1}); mlflow.log_metrics({"loss": 1.0})
    mlflow.keras.log_model(m, name="model", signature=infer_signature(x[:4], m.predict(x[:4], verbose=0)))
back = mlflow.keras.load_model(f"runs:/{run.info.run_id}/model")
assert np.allclose(back.predict(x[:4], verbose=0), m.predict(x[:4], verbose=0), atol=1e-5)
print("KERAS+MLFLOW OK")
EOF
  if python3 -c "import dvc" 2>/dev/null; then
    local d; d=$(mktemp -d)
    python3 -m dvc version | head -1
    (cd "$d" && git init -q && python3 -m dvc init -q && echo "n: 3" > params.yaml &&
     printf 'stages:\n  s:\n    cmd: python3 -c "open(\x27o.txt\x27, \x27w\x27).write(\x27x\x27)"\n    params: [n]\n    outs: [o.txt]\n' > dvc.yaml &&
     python3 -m dvc repro -q && test -f o.txt) && echo "DVC OK"
  fi
}
[[ ${1:-} == --check ]] && { check; exit; }

norm() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; }

fetch() {  # fetch DIR PINS...: make DIR hold exactly these wheels
  local dir=$1; shift; mkdir -p "$dir"
  local keep=" " spec name ver log
  for spec in "$@"; do
    name=${spec%%==*}; ver=${spec#*==}; keep+="$(norm "$name")-$ver "
    compgen -G "$dir/$(norm "$name")-$ver-*.whl" >/dev/null && continue
    if [[ $SDIST == *" $name "* ]]; then
      log=$(python3 -m pip wheel -q --no-deps --no-binary "$name" -w "$dir" "$spec" 2>&1) ||
        { echo "$log" >&2; exit 1; }
    else
      local plat=(--platform any)
      [[ $PURE == *" $name "* ]] || plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform any)
      log=$(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${plat[@]}" -d "$dir" "$spec" 2>&1) || { echo "$log" >&2; exit 1; }
    fi
    compgen -G "$dir/$(norm "$name")-$ver-*.whl" >/dev/null || { echo "no wheel for $spec" >&2; exit 1; }
  done
  local w base
  for w in "$dir"/*.whl; do  # anything else (older versions, strays) would break the install
    base=$(basename "$w"); base="$(norm "${base%%-*}")-$(echo "$base" | cut -d- -f2)"
    [[ $keep == *" $base "* ]] || { echo "removing stray $w"; rm -f "$w"; }
  done
  [[ $(ls "$dir"/*.whl | wc -l) -eq $# ]] || { echo "$dir: expected $# wheels" >&2; exit 1; }
}

report() {
  ls -l "$1"/*.whl | awk -v d="$1" '{s += $5; printf "  %8.2f MB  %s\n", $5 / 1e6, $9}
    END {printf "%s: %d wheels, %.2f MB\n", d, NR, s / 1e6}'
}

case ${1:-} in
  "")        fetch .whl "${CORE[@]}"; report .whl; fetch .whl-dvc "${DVC[@]}"; report .whl-dvc ;;
  --no-dvc)  fetch .whl "${CORE[@]}"; report .whl ;;
  --one-dir) [[ -d .whl-dvc ]] && mkdir -p .whl && cp -n .whl-dvc/*.whl .whl/
             fetch .whl "${CORE[@]}" "${DVC[@]}"; report .whl; rm -rf .whl-dvc ;;
  *)         echo "usage: bash benchmarks/gpu_wheels.sh [--no-dvc | --one-dir | --check]" >&2; exit 2 ;;
esac
du -cb .whl/*.whl $(compgen -G ".whl-dvc/*.whl" || true) | tail -1 | awk '{printf "total (.whl + .whl-dvc if there) %.2f MB\n", $1 / 1e6}'
