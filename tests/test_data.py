"""Loading MNIST: the loader's tensors, checksums, damaged or missing files said in one line."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REAL_MNIST, tiny_args, tiny_config

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
    for scored in (a.test_eval, a.train_eval):
        assert set(torch.unique(rf.pixels(scored)).tolist()) == {0.0, 1.0}
    assert torch.equal(a.test_eval, b.test_eval) and torch.equal(a.train_eval, b.train_eval)
    # training draws are re-binarized from the grey levels, which the training set keeps
    assert len(torch.unique(a.train)) > 2
    other = rf.load_data(
        str(mnist_dir), torch.device("cpu"), binarize=True, seed=6, verify=False, download=False
    )
    assert not torch.equal(a.test_eval, other.test_eval)  # fixed by the seed, not constant


def truncate(path: Path) -> None:
    """Cut the last 100 bytes off a file."""
    path.write_bytes(path.read_bytes()[:-100])


def replace_with_html(path: Path) -> None:
    """What a failed download through a captive portal leaves."""
    path.write_bytes(b"<html>not mnist</html>")


def images_under_its_name(path: Path) -> None:
    """A labels file swapped for an images file."""
    path.write_bytes((path.parent / "t10k-images-idx3-ubyte").read_bytes())


def emptied(path: Path) -> None:
    """An IDX file of no items: its header alone, with a count of 0."""
    path.write_bytes(path.read_bytes()[:4] + b"\x00\x00\x00\x00")


@pytest.mark.parametrize(
    "damage, file, said",
    [
        (None, "", "the train split does not match the standard MNIST checksums"),
        (truncate, "t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte is truncated"),
        (replace_with_html, "train-labels-idx1-ubyte", "train-labels-idx1-ubyte is not an IDX"),
        (emptied, "t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte holds no items"),
        (
            images_under_its_name,
            "train-labels-idx1-ubyte",
            "train-labels-idx1-ubyte holds images where its name says labels",
        ),
    ],
    ids=["not-mnist", "truncated", "not-idx", "empty", "swapped"],
)
def test_data_that_is_not_mnist_is_one_line_naming_the_file(
    damage: Callable[[Path], None] | None,
    file: str,
    said: str,
    mnist_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if damage:
        damage(mnist_dir / "MNIST" / "raw" / file)
        checked = "--no-verify-data"  # damaged files are refused, checksums or not
    else:
        checked = "--verify-data"  # well-formed files: only the checksums tell them apart
    assert rf.main(tiny_args(mnist_dir, tmp_path / "out", checked)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert said in err and str(mnist_dir / "MNIST" / "raw") in err


def test_binarized_training_draws_fresh_binary_images_each_time_a_batch_is_used(
    synthetic_data: rf.Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []

    def aevb_step(vae: rf.VAE, opts: list, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        seen.append(x.clone())
        return torch.zeros(())

    monkeypatch.setitem(rf.STEPS, "aevb", aevb_step)
    cfg = tiny_config(binarize=True, batch_size=400, samples=800, eval_start=800)
    record = {"seed": 3, "lr": 0.02}
    run = rf.new_run(rf.RunKey("aevb", 3), record, cfg, synthetic_data)  # grey levels as given
    rf.advance_eagerly([run], 800)  # the whole training set, twice
    first, second = seen
    for x in seen:
        assert set(torch.unique(x).tolist()) == {0.0, 1.0}
    # each epoch: all 400 images, binarized afresh (fixed bits would give equal totals)
    assert float(first.sum()) != float(second.sum())
    grey = rf.pixels(synthetic_data.train).mean()
    assert abs(float(first.mean()) - float(grey)) < 0.01  # Bernoulli draws of the grey levels


def test_the_download_gives_up_after_its_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    timeouts = []

    def silent_network(url: str, download_root: str, filename: str, md5: str) -> None:
        timeouts.append(socket.getdefaulttimeout())  # what a stalled connection would wait
        raise TimeoutError("timed out")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", silent_network)
    before = socket.getdefaulttimeout()
    assert rf.main(tiny_args(tmp_path / "empty", tmp_path / "out")) == 1
    assert timeouts and set(timeouts) == {rf.DOWNLOAD_TIMEOUT_S}
    assert socket.getdefaulttimeout() == before  # put back for the rest of the process
    assert "download failed (TimeoutError: timed out)" in capsys.readouterr().err


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


def mirror(source: Path, monkeypatch: pytest.MonkeyPatch, cut_at: int = 0) -> list[str]:
    """Serve torchvision's MNIST downloads from the raw files in `source` instead of the
    network, the `cut_at`-th one (if given) cut short by a Ctrl-C halfway; the names fetched."""
    fetched = []

    def download(url: str, download_root: str, filename: str, md5: str) -> None:
        name = filename.removesuffix(".gz")
        fetched.append(name)
        data = (source / "MNIST" / "raw" / name).read_bytes()
        if len(fetched) == cut_at:
            (Path(download_root) / name).write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        (Path(download_root) / name).write_bytes(data)

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", download)
    return fetched


def test_a_download_fills_in_the_missing_files_whole_and_leaves_the_others(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "empty"
    raw = data_dir / "MNIST" / "raw"
    raw.mkdir(parents=True)
    kept = raw / "t10k-labels-idx1-ubyte"  # the user's own file: not replaced
    kept.write_bytes(b"labels of the user's own")
    fetched = mirror(mnist_dir, monkeypatch)
    rf.ensure_mnist(str(data_dir))
    assert len(fetched) == 4 and kept.read_bytes() == b"labels of the user's own"
    assert sorted(os.listdir(raw)) == sorted(os.listdir(mnist_dir / "MNIST" / "raw"))
    for name in (n for n in os.listdir(raw) if n != kept.name):
        assert (raw / name).read_bytes() == (mnist_dir / "MNIST" / "raw" / name).read_bytes()


def test_ctrl_c_during_the_download_is_one_line_and_leaves_no_part_of_a_file(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    mirror(mnist_dir, monkeypatch, cut_at=3)
    assert rf.main(tiny_args(tmp_path / "empty", tmp_path / "out")) == 130
    err = capsys.readouterr().err
    assert err.strip() == (
        "stopped by signal 2 before training began: nothing was trained; run the same command "
        "again to start"
    )
    assert os.listdir(tmp_path / "empty" / "MNIST" / "raw") == []  # no half file, no folder


@pytest.mark.skipif(
    not (REAL_MNIST / "MNIST" / "raw").is_dir(), reason=f"real MNIST not found at {REAL_MNIST}"
)
def test_real_mnist_passes_the_checksums() -> None:
    train = rf.load_split(str(REAL_MNIST), "train", verify=True)
    test = rf.load_split(str(REAL_MNIST), "test", verify=True)
    assert train.shape == (60_000, 1, 28, 28) and test.shape == (10_000, 1, 28, 28)
    assert abs(float(rf.pixels(train).mean()) - 0.1307) < 1e-3
