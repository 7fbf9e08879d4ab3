"""fmnist.predict's inputs: images made into the data set's format, arrays checked, bad files named."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from fmnist.idx import write_idx
from fmnist.predict import InputError, check_pixels, image_to_pixels, main, read_inputs
from tests.conftest import tiny_images


def _item() -> np.ndarray:
    """A (28, 28) light item on black that touches the top and bottom edges, as the data set's."""
    pixels = np.zeros((28, 28), np.uint8)
    pixels[:, 9:19] = 200
    pixels[4:10, 4:24] = 255
    return pixels


def test_a_photo_on_white_becomes_a_light_item_on_black_filling_the_frame():
    """A large RGB dark-on-white photo with margins: trimmed, resized keeping its aspect,
    centred and negated, it comes back as the item it was made from."""
    item = _item()
    photo = np.full((400, 300), 255, np.uint8)
    photo[60:340, 10:290] = np.kron(255 - item, np.ones((10, 10), np.uint8))  # 10x, dark on white
    pixels = image_to_pixels(Image.fromarray(photo).convert("RGB"))
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    assert pixels[0, 0] == 0  # the white background became black

    def box(image: np.ndarray) -> tuple[int, ...]:
        rows, cols = np.flatnonzero(image.max(axis=1) > 127), np.flatnonzero(image.max(axis=0) > 127)
        return rows[0], rows[-1], cols[0], cols[-1]

    assert box(pixels) == box(item)  # 28 rows (the longest side), 20 columns, centred
    assert np.abs(pixels.astype(np.int32) - item).mean() < 10  # Lanczos rings at the edges only


def test_a_wide_item_keeps_its_aspect_ratio_and_is_centred():
    photo = np.zeros((50, 200), np.uint8)
    photo[10:30, 20:180] = 255  # 160 x 20 after trimming: 28 x 4 (rounded) after resizing
    pixels = image_to_pixels(Image.fromarray(photo))
    rows = np.flatnonzero(pixels.max(axis=1) > 127)
    assert 3 <= len(rows) <= 5 and abs((rows[0] + rows[-1]) / 2 - 13.5) <= 1
    assert pixels[:, 0].max() > 127 and pixels[:, -1].max() > 127  # the long side spans the frame


def test_invert_is_automatic_unless_forced():
    item = _item()
    assert np.array_equal(image_to_pixels(Image.fromarray(item)), item)  # 28 x 28, dark: as it is
    assert np.array_equal(image_to_pixels(Image.fromarray(255 - item)), item)  # light: negated
    assert np.array_equal(image_to_pixels(Image.fromarray(item), invert=True), 255 - item)
    assert np.array_equal(image_to_pixels(Image.fromarray(255 - item), invert=False), 255 - item)
    transparent = Image.new("RGBA", (28, 28), (0, 0, 0, 0))  # a dark item on transparency
    transparent.putalpha(Image.fromarray(item))
    assert image_to_pixels(transparent)[0, 0] == 0


def test_arrays_of_pixels_in_every_container(tmp_path):
    images, _ = tiny_images(1, seed=3)  # (10, 28, 28) uint8
    np.save(tmp_path / "many.npy", images)
    np.save(tmp_path / "one.npy", images[0].astype(np.float64))  # whole-number floats are pixels
    write_idx(tmp_path / "images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "images-idx3-ubyte", images)
    assert np.array_equal(read_inputs(tmp_path / "many.npy"), images)
    assert np.array_equal(read_inputs(tmp_path / "one.npy"), images[:1])
    assert np.array_equal(read_inputs(tmp_path / "images-idx3-ubyte.gz"), images)
    assert np.array_equal(read_inputs(tmp_path / "images-idx3-ubyte"), images)
    Image.fromarray(images[4]).save(tmp_path / "four.png")
    assert np.array_equal(read_inputs(tmp_path / "four.png"), images[4:5])


def test_idx_files_are_told_by_their_content_not_their_name(tmp_path):
    images, _ = tiny_images(1, seed=3)
    write_idx(tmp_path / "images.gz", images)
    (tmp_path / "images.gz").rename(tmp_path / "gzipped-without-suffix")  # e.g. a browser's download
    write_idx(tmp_path / "plain", images)
    (tmp_path / "plain").rename(tmp_path / "plain.gz")  # already unpacked, the name kept
    assert np.array_equal(read_inputs(tmp_path / "gzipped-without-suffix"), images)
    assert np.array_equal(read_inputs(tmp_path / "plain.gz"), images)


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((3, 784), np.uint8), r"shape \(3, 784\); expected \(28, 28\) or \(n, 28, 28\)"),
    (np.zeros((2, 28, 28, 1), np.uint8), r"shape \(2, 28, 28, 1\)"),
    (np.zeros((0, 28, 28), np.uint8), "holds no images"),
    (np.full((28, 28), 0.5), r"not whole-number pixels 0-255; scaled to \[0, 1\]\? multiply by 255"),
    (np.full((28, 28), 300.0), "from 300 to 300 are not whole-number pixels"),
    (np.full((28, 28), np.nan), "NaN"),
    (np.full((28, 28), "a"), "array of <U1"),
])
def test_wrong_arrays_are_refused_naming_the_file(array, message):
    with pytest.raises(InputError, match=f"^x.npy: .*{message}"):
        check_pixels(array, "x.npy")


def test_bad_files_are_one_line_errors_naming_each_and_nothing_is_classified(tmp_path, capsys):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(_png_bytes(tmp_path)[:60])
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 7))
    np.save(tmp_path / "flat.npy", np.zeros((2, 784), np.uint8))
    files = ["empty.png", "notes.png", "cut.png", "bad.gz", "flat.npy", "missing.png"]
    code = main([str(tmp_path / name) for name in files] + ["--model", str(tmp_path)])
    errors = capsys.readouterr()
    assert code == 1 and errors.out == ""  # the model is never loaded: the inputs fail first
    lines = errors.err.strip().splitlines()
    assert len(lines) == len(files) + 1
    for name, line in zip(files, lines, strict=False):
        assert line.startswith(f"ERROR: {tmp_path / name}"), line
    assert "is empty" in lines[0] and "not an image" in lines[1] and "cannot be read as an image" in lines[2]
    assert "bad.gz" in lines[3] and "shape (2, 784)" in lines[4] and "not found" in lines[5]


def test_a_folder_that_is_no_model_is_named(tmp_path, capsys):
    Image.fromarray(_item()).save(tmp_path / "item.png")
    assert main([str(tmp_path / "item.png"), "--model", str(tmp_path)]) == 1
    assert f"--model {tmp_path}: not a model folder" in capsys.readouterr().err


def _png_bytes(tmp_path) -> bytes:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28)).astype(np.uint8)).save(
        tmp_path / "full.png")
    return (tmp_path / "full.png").read_bytes()


def test_a_damaged_model_folder_says_how_to_restore_or_re_train_it(tmp_path, capsys):
    folder = tmp_path / "models" / "cnn2" / "seed0"
    folder.mkdir(parents=True)
    (folder / "model.keras").write_bytes(b"PK\x03\x04 damaged")
    (folder / "run.json").write_text('{"mlflow_run_id": "ab')  # cut short
    Image.fromarray(_item()).save(tmp_path / "item.png")
    assert main([str(tmp_path / "item.png"), "--model", str(folder)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"ERROR: {folder / 'run.json'} cannot be read as JSON (JSONDecodeError: Unterminated string "
        "starting at: line 1 column 19 (char 18)): it is damaged or was replaced; restore it with "
        f"`dvc checkout {folder.parent}` (from DVC's cache), or delete {folder} and run `dvc repro` to "
        "train it again")
