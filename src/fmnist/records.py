"""What one stage hands the next in a file, as frozen dataclasses: each record owns its
file's keys and its read and write, so that the stages and the report's template read
attributes, not string keys (tests/test_structure.py checks that no key is spelled
elsewhere)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from fmnist.files import CorruptFileError, read_json, write_json


@dataclass(frozen=True)
class RunInfo:
    """The facts of one trained model (``paths.RunFiles.run_info`` in models/<variant>/seed<k>/,
    copied into its record in reports/eval/): written by the train stage, read by evaluate, register,
    analyse, the report and fmnist.predict."""

    mlflow_run_id: str
    keras_backend: str
    precision: str
    device: str
    train_seconds: float
    epochs: int
    parameters: int
    canonical_split: bool
    data_source: str
    class_names: tuple[str, ...]  # in the model's output order
    # of the settings, code and data that made it (fmnist.training.train_seeds keeps a seed
    # whose fingerprint matches); "" for a model made before fingerprints were recorded
    fingerprint: str = ""

    def write(self, path: Path) -> None:
        write_json(path, {**dataclasses.asdict(self), "class_names": list(self.class_names)})

    @classmethod
    def read(cls, path: Path, what: str = "written by the train stage") -> RunInfo:
        raw = read_json(path, what)
        names = {field.name for field in dataclasses.fields(cls)}
        required = {field.name for field in dataclasses.fields(cls)
                    if field.default is dataclasses.MISSING}
        if not isinstance(raw, dict) or not required <= set(raw):
            missing = sorted(required - set(raw)) if isinstance(raw, dict) else "all"
            raise CorruptFileError(f"{path} is not a run's record (missing {missing}); run `dvc repro` "
                                   "to make it again")
        values = {key: value for key, value in raw.items() if key in names}
        return cls(**{**values, "class_names": tuple(values["class_names"])})

    @classmethod
    def fingerprint_of(cls, path: Path) -> str | None:
        """The fingerprint recorded in ``path``, or None where it cannot be read."""
        try:
            return json.loads(Path(path).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None
