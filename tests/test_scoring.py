"""fmnist.scoring: the test-set scores of every kind of model, without scikit-learn."""

import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import classification_report, confusion_matrix

from fmnist import scoring
from tests.conftest import REPO, venv_env

CLASSES = tuple(f"c{k}" for k in range(10))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_report_and_the_confusion_matrix_are_scikit_learns(seed):
    """Random labels and predictions, with a class never predicted and one absent from the
    labels (scikit-learn's zero_division=0 cases): the same numbers to the last bit."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 9, size=500)  # class 9 never occurs
    predictions = np.where(rng.random(500) < 0.7, labels, rng.integers(0, 10, size=500))
    predictions[predictions == 3] = 4  # class 3 never predicted
    probabilities = np.eye(10)[predictions]

    evaluation = scoring.score(probabilities, labels, CLASSES)
    expected = classification_report(labels, predictions, labels=list(range(10)), target_names=list(CLASSES),
                                     output_dict=True, zero_division=0)
    assert evaluation.report == expected
    expected = confusion_matrix(labels, predictions, labels=list(range(10)))
    assert evaluation.confusion.tolist() == expected.tolist()


def test_the_evaluate_stage_imports_no_scikit_learn():
    """Its import alone cost each evaluate stage 0.7-0.8 s (the baseline stage needs it: the SVC)."""
    script = ("import runpy, sys\n"
              "runpy.run_path('stages/evaluate.py', run_name='imports only')\n"
              "print('sklearn' in sys.modules)\n"
              "import sklearn\n"  # the check itself can fail: scikit-learn is installed here
              "print('sklearn' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=venv_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["False", "True"]
