"""Backend and precision as params: resolution, the JAX epoch loop, and DVC re-running on them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import keras
import pytest
import yaml

from fmnist import device
from fmnist.config import ConfigError
from tests.conftest import BUILT_VARIANTS, built_copy, run, venv_env


def test_auto_precision_is_bfloat16_only_on_amx_cpus_under_tensorflow(monkeypatch):
    monkeypatch.setattr(device, "accelerator", lambda: "cpu")
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16", "amx_tile"})
    assert device.resolve_precision("auto") == "mixed_bfloat16"
    # AVX2-only (AMD EPYC Milan: bf16 measured 4x slower) and AVX512-BF16 (not measured): float32
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2"})
    assert device.resolve_precision("auto") == "float32"
    monkeypatch.setattr(device, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert device.resolve_precision("auto") == "float32"
    # a GPU: float32 until the GPU check has measured bfloat16 with these models
    monkeypatch.setattr(device, "accelerator", lambda: "gpu")
    monkeypatch.setattr(device, "cpu_flags", lambda: {"amx_bf16"})
    assert device.resolve_precision("auto") == "float32"
    assert device.resolve_precision("mixed_float16") == "mixed_float16"


def test_auto_backend_is_jax_only_where_jax_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(device, "_nvidia_device_present", lambda: False)
    assert device.resolve_backend("auto") == "tensorflow"
    monkeypatch.setattr(device, "_nvidia_device_present", lambda: True)
    monkeypatch.setattr(device, "_jax_sees_gpu", lambda: True)
    assert device.resolve_backend("auto") == "jax"
    monkeypatch.setattr(device, "_jax_sees_gpu", lambda: False)  # e.g. jax without CUDA
    assert device.resolve_backend("auto") == "tensorflow"


def test_a_backend_that_is_not_installed_names_the_key(monkeypatch):
    monkeypatch.setattr(device, "_installed", lambda module: module != "torch")
    with pytest.raises(ConfigError, match=r"train\.backend = 'torch'.*not installed"):
        device.resolve_backend("torch")


def test_select_backend_refuses_a_backend_keras_was_not_imported_with():
    assert keras.backend.backend() == "tensorflow"  # this test process imported Keras already
    assert device.select_backend("tensorflow") == "tensorflow"
    with pytest.raises(RuntimeError, match="imported with backend tensorflow"):
        device.select_backend("jax")


def test_keras_is_imported_without_the_integrations_no_stage_uses():
    """select_backend imports Keras while scikit-learn, matplotlib and (under TensorFlow) JAX
    are refused: Keras and TensorFlow then skip their integrations with them. Keras trains as
    before, the modules import normally afterwards, and a module imported before is left alone."""
    script = textwrap.dedent("""
        import json, sys
        import matplotlib
        from fmnist import device
        device.select_backend("tensorflow")
        skipped = {name: name in sys.modules for name in device.UNUSED_AT_IMPORT}
        import keras, numpy as np
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile("sgd", "mse")
        model.fit(np.ones((4, 3)), np.zeros((4, 2)), epochs=1, verbose=0)
        from keras.src.visualization import plot_image_gallery
        from keras.src.wrappers import sklearn_wrapper
        import jax, sklearn
        print(json.dumps({"loaded": skipped, "keras_has_matplotlib": plot_image_gallery.plt is not None,
                          "keras_has_sklearn": sklearn_wrapper.sklearn is not None,
                          "imported_after": [jax.__name__, sklearn.__name__]}))
    """)
    env = {key: value for key, value in venv_env().items() if key != "KERAS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "loaded": {"sklearn": False, "matplotlib": True, "jax": False},  # matplotlib: imported before
        "keras_has_matplotlib": True, "keras_has_sklearn": False, "imported_after": ["jax", "sklearn"]}


def test_logged_models_carry_their_pip_requirements():
    requirements = device.pip_requirements()
    assert requirements[0] == f"keras=={keras.__version__}"
    assert requirements[1].startswith("tensorflow==") and requirements[2].startswith("numpy==")


SCAN_VS_STEPS = textwrap.dedent("""
    import json, sys
    import keras, numpy as np
    from fmnist import jax_loop
    from fmnist.config import parse_params
    from fmnist.models import build_model
    from tests.conftest import real_params, tiny_images

    config = parse_params(real_params())
    x, y = tiny_images(13, seed=1)   # 130 images: 4 batches of 32 and one of 2
    xt, yt = tiny_images(3, seed=2)
    results = {}
    for compiled in (True, False):
        keras.utils.set_random_seed(0)
        model = build_model(config.variant(sys.argv[1]))
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
        logs = []
        cb = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, l: logs.append(dict(l)))
        jax_loop.fit(model, x, y, batch_size=32, epochs=2, seed=5, callbacks=[cb], test=(xt, yt),
                     compiled_epochs=compiled, verbose=False)
        results[str(compiled)] = {"logs": logs,
                                  "weights": [w.tolist() for w in model.get_weights()[:2]],
                                  "optimizer_iterations": int(model.optimizer.iterations.numpy())}
    print(json.dumps(results))
""")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cnn2", "cnn2_bn_skip"])
def test_the_compiled_jax_epoch_equals_the_stepwise_one(tmp_path, variant):
    """The GPU path (one lax.scan per epoch) trains exactly as the CPU path (a compiled step
    per batch): same batches, same updates, same logs."""
    import numpy as np

    script = tmp_path / "scan.py"
    script.write_text(SCAN_VS_STEPS)
    from tests.conftest import REPO

    result = subprocess.run([sys.executable, str(script), variant], cwd=REPO,
                            env={**venv_env(), "KERAS_BACKEND": "jax", "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    scan, steps = results["True"], results["False"]
    assert scan["optimizer_iterations"] == steps["optimizer_iterations"] == 2 * 5  # 5 batches/epoch
    scores = ["accuracy", "loss", "test_accuracy", "test_loss"]
    assert [sorted(log) for log in steps["logs"]] == [scores] * 2
    # the two epochs ran as one chunk: each carries its own learning rate and its share of the time
    assert [sorted(log) for log in scan["logs"]] == [sorted([*scores, "epoch_seconds", "learning_rate"])] * 2
    for a, b in zip(scan["logs"], steps["logs"], strict=True):
        for key in scores:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert scan["logs"][1]["loss"] < scan["logs"][0]["loss"]  # it learns
    for a, b in zip(scan["weights"], steps["weights"], strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_backend_and_precision_params_retrain_only_what_depends_on_them(tmp_path, built_pipeline):
    """Each is a param of the train stages (and of the params check; of no other stage: the
    analyse stage draws the feature maps the train stage wrote, loading no model): DVC re-trains
    for it and what follows from the models; the data and the SVC stay. The run under JAX itself:
    tests/test_benchmarks.py's GPU-check rehearsal."""
    repo = built_copy(built_pipeline, tmp_path / "repo")
    for variant in BUILT_VARIANTS:
        run_info = json.loads((repo / f"models/{variant}/seed0/run.json").read_text())
        assert run_info["keras_backend"] == "tensorflow"  # auto, on a machine without a GPU
        assert run_info["precision"] == device.resolve_precision("auto")
        assert run_info["device"].startswith("cpu")
    trains = {f"train@{variant}" for variant in BUILT_VARIANTS}
    for key, value in [("backend", "jax"), ("precision", "mixed_bfloat16")]:
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["train"][key] = value
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        changed = json.loads(run(["dvc", "status", "--json"], repo).stdout)
        assert set(changed) == {"check_params", *trains}, (key, changed)
        for stage in trains:
            assert changed[stage] == [{"changed deps": {"params.yaml": {f"train.{key}": "modified"}}}]
        run(["git", "checkout", "--", "params.yaml"], repo)
