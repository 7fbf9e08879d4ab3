"""Classify your own images with a trained model: ``python -m fmnist.predict`` (``fmnist-predict``).

    python -m fmnist.predict shoe.jpg shirt.png                      # the registry's champion
    python -m fmnist.predict --model models/cnn2_bn_skip/seed0 x.npy --json
    python -m fmnist.predict --model models:/fashion-mnist-cnn2/1 t10k-images-idx3-ubyte.gz

Inputs: images (PNG, JPEG, anything Pillow reads; any size or colour), ``.npy`` arrays and IDX
files (gzip-compressed or plain) of pixels 0-255, shape (28, 28) or (n, 28, 28).

Images become 28 x 28 grayscale pixels the way Fashion-MNIST was made from product photos
(Zalando's README): trim the edges that have the colour of the corners (5 % tolerance),
resize the longest side to 28 keeping the aspect ratio (Lanczos here; they subsampled and
sharpened), centre on a square canvas of the background colour, and negate the intensities,
because the data set is a light item on black. The choice for light backgrounds: the image
is inverted when its background (the median of its corners) is light, as a product photo on
white; a dark background is kept as it is. ``--invert`` / ``--no-invert`` override that. A
transparent background counts as white. An image that is already 28 x 28 is taken as it is
(no trimming or resizing: it is in the data set's format), inverted only if light.

The model: a folder of the train stage (models/<variant>/seed<k>/, its Keras file), a local
MLflow model folder (with an MLmodel file), or an MLflow URI (``models:/<name>@<alias>``,
``runs:/...``) from the project's store (``MLFLOW_TRACKING_URI`` or ./mlflow.db). Default:
the alias of params.yaml's ``registry`` (``models:/fashion-mnist-authors_cnn2_bn_skip@champion``).

Output: a first line ``model: ...`` naming the model (for a registered one: its name and version,
the MLflow run, DVC experiment, stage and git commit that trained it), then one line per image;
with ``--json`` a list of records, each naming the model under ``"model"``. A model or store
that does not exist is a one-line error listing what the store holds.

Bad input: one line per file naming it and what is wrong (not found, empty, unreadable, not an
image, wrong array shape or values), exit status 1, and nothing classified.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist import paths
from fmnist.config import ConfigError
from fmnist.data import IMAGE_SIZE
from fmnist.idx import GZIP_MAGIC, IDX_MAGIC, IdxError, read_idx

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TRIM_TOLERANCE = 0.05  # Zalando's trim: edges within 5 % of the corner colour are background
_NPY_MAGIC = b"\x93NUMPY"


class InputError(ValueError):
    """A file that cannot be classified; the message names it."""


def image_to_pixels(image, invert: bool | None = None) -> np.ndarray:
    """A Pillow image of any size and mode -> (28, 28) uint8, light item on black.

    ``invert``: None inverts when the background (median of the four corners) is light.
    """
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    gray = np.asarray(image.convert("L"), dtype=np.float32)  # (h, w), ITU-R 601 luma
    background = float(np.median([gray[0, 0], gray[0, -1], gray[-1, 0], gray[-1, -1]]))
    if invert is None:
        invert = background > 127.5
    if gray.shape != (IMAGE_SIZE, IMAGE_SIZE):
        item = np.abs(gray - background) > TRIM_TOLERANCE * 255
        if item.any():
            rows, cols = np.flatnonzero(item.any(axis=1)), np.flatnonzero(item.any(axis=0))
            gray = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        height, width = gray.shape
        scale = IMAGE_SIZE / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resized = Image.fromarray(np.rint(gray).astype(np.uint8)).resize(size, Image.Resampling.LANCZOS)
        canvas = np.full((IMAGE_SIZE, IMAGE_SIZE), background, dtype=np.float32)
        top, left = (IMAGE_SIZE - size[1]) // 2, (IMAGE_SIZE - size[0]) // 2
        canvas[top:top + size[1], left:left + size[0]] = np.asarray(resized, dtype=np.float32)
        gray = canvas
    if invert:
        gray = 255.0 - gray
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def check_pixels(array: np.ndarray, name: str) -> np.ndarray:
    """An array of pixels 0-255 -> (n, 28, 28) uint8; anything else is an InputError."""
    expected = f"({IMAGE_SIZE}, {IMAGE_SIZE}) or (n, {IMAGE_SIZE}, {IMAGE_SIZE})"
    shape = array.shape
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3 or array.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"{name}: array of shape {shape}; expected {expected} pixels")
    if not len(array):
        raise InputError(f"{name}: array holds no images (shape {array.shape})")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iuf":
        raise InputError(f"{name}: array of {array.dtype}; expected pixels 0-255 (uint8)")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{name}: array holds NaN or infinite values; expected pixels 0-255")
    low, high = array.min(), array.max()
    if low < 0 or high > 255 or not np.array_equal(array, np.rint(array)):
        hint = "; scaled to [0, 1]? multiply by 255" if low >= 0 and high <= 1 else ""
        raise InputError(f"{name}: values from {low:g} to {high:g} are not whole-number pixels "
                         f"0-255{hint}")
    return array.astype(np.uint8)


def read_inputs(path: Path, invert: bool | None = None) -> np.ndarray:
    """One file -> (n, 28, 28) uint8 pixels; every problem is an InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an image or array file")
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as error:
        raise InputError(f"{path}: cannot be read ({error.strerror or error})") from error
    if not head:
        raise InputError(f"{path}: is empty")
    if head.startswith(_NPY_MAGIC):
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise InputError(f"{path}: cannot be read as a .npy array ({error})") from error
        return check_pixels(np.asarray(array), str(path))
    if head.startswith(IDX_MAGIC + b"\x08") or (head.startswith(GZIP_MAGIC) and _gzipped_idx(path)):
        try:
            array = read_idx(path)
        except IdxError as error:
            raise InputError(str(error)) from error
        return check_pixels(array, str(path))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image_to_pixels(image, invert)[np.newaxis]
    except UnidentifiedImageError as error:
        raise InputError(f"{path}: not an image (PNG, JPEG, ...), a .npy array or an IDX file") from error
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise InputError(f"{path}: cannot be read as an image ({error})") from error


def _gzipped_idx(path: Path) -> bool:
    try:
        with gzip.open(path, "rb") as f:
            return f.read(3) == IDX_MAGIC + b"\x08"
    except (OSError, EOFError):
        return False


@dataclass(frozen=True)
class Classifier:
    """(n, 28, 28) uint8 pixels -> (n, classes) probabilities, and the classes' names."""

    probabilities: Callable[[np.ndarray], np.ndarray]
    class_names: tuple[str, ...]
    source: str
    origin: str  # which model, in one line: for a registered one its version, run and DVC experiment


def load_classifier(source: str) -> Classifier:
    """A train-stage model folder, a local MLflow model folder, or an MLflow model URI."""
    if "://" in source or source.startswith(("models:/", "runs:/")):
        from fmnist import tracking

        tracking.use_store(create=False)  # a missing store or model: an error before Keras loads
        origin = tracking.model_origin(source).describe()
        predict, names = tracking.load_pyfunc(source)
        return Classifier(predict, tuple(names), source, origin)
    folder = Path(source)
    if (folder / "MLmodel").is_file():
        from fmnist import tracking

        predict, names = tracking.load_pyfunc(str(folder))
        return Classifier(predict, tuple(names), source, f"{source} (an MLflow model folder)")
    files = paths.RunFiles(folder)
    if files.model.is_file():
        from fmnist.models import load_model_file

        run_info = files.read_run_info()
        names = run_info.class_names
        model = load_model_file(files.model, files.remedy)
        origin = f"{source} (a train-stage model folder, MLflow run {run_info.mlflow_run_id})"
        return Classifier(lambda x: np.asarray(model.predict(x, verbose=0)), tuple(names), source, origin)
    raise FileNotFoundError(f"--model {source}: not a model folder (no {files.model.name} or MLmodel) and "
                            "not an MLflow URI (models:/<name>@<alias>)")


def default_model() -> str:
    """The registry alias params.yaml names (run from the project root), e.g.
    models:/fashion-mnist-authors_cnn2_bn_skip@champion."""
    from fmnist.params import load_params
    from fmnist.registry import champion_uri

    if not paths.PARAMS.is_file():
        raise FileNotFoundError("no --model given and no params.yaml here to name the registry's "
                                "champion; pass --model models:/<name>@<alias> or a model folder")
    return champion_uri(load_params(paths.PARAMS))


def classify(classifier: Classifier, inputs: dict[str, np.ndarray]) -> list[dict]:
    """One record per image: file, index within the file, class, probability, all probabilities,
    and the model (``Classifier.origin``)."""
    records = []
    for name, pixels in inputs.items():
        probabilities = np.asarray(classifier.probabilities(pixels), dtype=np.float64)
        for index, row in enumerate(probabilities):
            best = int(row.argmax())
            records.append({"file": name, "index": index, "class": classifier.class_names[best],
                            "class_index": best, "probability": round(float(row[best]), 6),
                            "probabilities": {c: round(float(p), 6)
                                              for c, p in zip(classifier.class_names, row, strict=True)},
                            "model": classifier.origin})
    return records


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fmnist-predict", description="Classify images (PNG, JPEG, ...), .npy arrays and IDX files "
        "of Fashion-MNIST-like items with a trained model.")
    parser.add_argument("files", nargs="+", type=Path, help="images, .npy or IDX files")
    parser.add_argument("--model", help="models/<variant>/seed<k>, an MLflow model folder, or "
                        "models:/<name>@<alias> (default: params.yaml's registry alias)")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of lines")
    invert = parser.add_mutually_exclusive_group()
    invert.add_argument("--invert", dest="invert", action="store_true", default=None,
                        help="always negate images (a dark item on a light background)")
    invert.add_argument("--no-invert", dest="invert", action="store_false",
                        help="never negate images (a light item on a dark background)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    inputs, problems = {}, []
    for path in args.files:
        try:
            inputs[str(path)] = read_inputs(path, args.invert)
        except InputError as error:
            problems.append(str(error))
    for problem in problems:
        print(f"ERROR: {problem}", file=sys.stderr)
    if problems:
        print(f"ERROR: nothing classified; fix or leave out the {len(problems)} file(s) above",
              file=sys.stderr)
        return 1
    try:
        classifier = load_classifier(args.model or default_model())
        import keras

        keras.config.disable_interactive_logging()  # no progress bars in the output (MLflow's predict)
        records = classify(classifier, inputs)
    except (FileNotFoundError, ConfigError, ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"ERROR: {first_line}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(f"model: {classifier.origin}")
        for record in records:
            several = len(inputs[record["file"]]) > 1
            where = f"{record['file']}[{record['index']}]" if several else record["file"]
            print(f"{where}: {record['class']} ({record['probability']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
