"""Data: the MNIST loader, checksums, missing, truncated and malformed files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import REAL_MNIST, tiny_args

import reproduce_fig2 as rf


def test_loader_keeps_the_bytes_and_pixels_gives_intensities_in_0_1(mnist_dir: Path) -> None:
    data = rf.load_data(
        str(mnist_dir), torch.device("cpu"), binarize=False, seed=0, verify=False, download=False
    )
    assert data.train.shape == (400, 1, 28, 28) and data.test_eval.shape == (100, 1, 28, 28)
    for t in (data.train, data.train_eval, data.test_eval):
        assert t.dtype == torch.uint8  # a quarter of float32's memory in every worker
        x = rf.pixels(t)
        assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert torch.equal(x, t.to(torch.float32) / 255)  # the exact intensities, bytes / 255
    assert data.train_eval is data.train  # grey levels: training and scoring use the same tensor
    assert float(rf.pixels(data.train).max()) > 0.9  # scaled by 1/255, not squashed


def test_binarized_evaluation_sets_are_fixed(mnist_dir: Path) -> None:
    a = rf.load_data(
        str(mnist_dir), torch.device("cpu"), binarize=True, seed=5, verify=False, download=False
    )
    b = rf.load_data(
        str(mnist_dir), torch.device("cpu"), binarize=True, seed=5, verify=False, download=False
    )
    assert set(torch.unique(rf.pixels(a.test_eval)).tolist()) == {0.0, 1.0}
    assert torch.equal(a.test_eval, b.test_eval) and torch.equal(a.train_eval, b.train_eval)
    # training draws are re-binarized from the grey levels
    assert not torch.equal(a.train, a.train_eval)


def test_checksum_mismatch_names_split_and_folder(mnist_dir: Path) -> None:
    with pytest.raises(rf.DataError) as err:
        rf.load_split(str(mnist_dir), "train", verify=True)
    msg = str(err.value)
    assert "train" in msg and str(mnist_dir / "MNIST" / "raw") in msg and "checksum" in msg


def test_truncated_file_is_named(mnist_dir: Path) -> None:
    path = mnist_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(rf.DataError, match="t10k-images-idx3-ubyte is truncated"):
        rf.load_split(str(mnist_dir), "test", verify=False)


def test_malformed_header_is_named(mnist_dir: Path) -> None:
    path = mnist_dir / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    path.write_bytes(b"<html>not mnist</html>")
    with pytest.raises(rf.DataError, match="train-labels-idx1-ubyte is not an IDX file"):
        rf.load_split(str(mnist_dir), "train", verify=False)


def test_missing_data_offline_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "nothing-here"
    start = time.monotonic()
    code = rf.main(tiny_args(empty, tmp_path / "out"))
    assert code == 1
    assert time.monotonic() - start < 30  # a missing network must not hang the run
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert str((empty / "MNIST" / "raw").resolve()) in err or str(empty / "MNIST" / "raw") in err
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert name in err
    assert "--data-dir" in err and "download failed" in err


def test_main_reports_a_truncated_file(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = mnist_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    assert rf.main(tiny_args(mnist_dir, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "train-images-idx3-ubyte is truncated" in err


@pytest.mark.skipif(
    not (REAL_MNIST / "MNIST" / "raw").is_dir(), reason=f"real MNIST not found at {REAL_MNIST}"
)
def test_real_mnist_passes_the_checksums() -> None:
    train = rf.load_split(str(REAL_MNIST), "train", verify=True)
    test = rf.load_split(str(REAL_MNIST), "test", verify=True)
    assert train.shape == (60_000, 1, 28, 28) and test.shape == (10_000, 1, 28, 28)
    assert abs(float(rf.pixels(train).mean()) - 0.1307) < 1e-3
