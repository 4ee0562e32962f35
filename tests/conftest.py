"""Shared test helpers: synthetic MNIST in torchvision's raw layout (`make_mnist_dir`, the
`mnist_dir` and `synthetic_data` fixtures), a tiny configuration (`tiny_config`, and
`tiny_args` for the command line), `train_n_z3` and the comparison of results (`measured`)."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reproduce_fig2 as rf  # noqa: E402 (importable only once sys.path holds the root)

REAL_MNIST = ROOT.parent / "shared" / "mnist"

torch.set_num_threads(1)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (magic 0x08 = unsigned byte)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 grey-level images made of three blurry prototypes plus noise, and their labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    protos = np.stack(
        [
            np.exp(-((yy - 14) ** 2 + (xx - 8) ** 2) / 30.0),
            np.exp(-((yy - 8) ** 2 + (xx - 20) ** 2) / 30.0),
            ((np.abs(yy - 20) < 3) & (xx > 4) & (xx < 24)).astype(float),
        ]
    )
    labels = rng.integers(0, 3, n)
    images = protos[labels] * rng.uniform(0.7, 1.0, (n, 1, 1)) + rng.uniform(0, 0.1, (n, 28, 28))
    images[:, 0, 0] = 0  # one pixel that is always black (a weight with no data gradient)
    return (np.clip(images, 0, 1) * 255).astype(np.uint8), labels.astype(np.uint8)


def make_mnist_dir(root: Path, n_train: int = 400, n_test: int = 100) -> Path:
    """A data folder holding synthetic MNIST files under MNIST/raw/; returns the folder."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = synthetic_images(n, seed)
        img_name, lbl_name = rf.MNIST_FILES[split]
        write_idx(raw / img_name, images)
        write_idx(raw / lbl_name, labels)
    return root


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """Synthetic MNIST in a temporary data folder."""
    return make_mnist_dir(tmp_path / "data")


@pytest.fixture
def synthetic_data(mnist_dir: Path) -> rf.Data:
    """The synthetic MNIST loaded through the real loader, on the CPU."""
    return rf.load_data(
        str(mnist_dir), torch.device("cpu"), binarize=False, seed=0, verify=False, download=False
    )


def tiny_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """Command-line arguments for a run that takes a second or two on synthetic data."""
    fixed = ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--no-verify-data"]
    small = "--samples 1200 --eval-start 300 --evals-per-decade 3 --hidden-size 16 --batch-size 50"
    serial = "--threads 1 --jobs 1"
    return [*fixed, "--latent-dims", "2", "3", *small.split(), *serial.split(), *extra]


def train_n_z3(
    cfg: rf.Config,
    data: rf.Data,
    method: str = "aevb",
    folder: rf.ResultsFolder | None = None,
    on_keep: Callable[[rf.RunKey, dict], None] = lambda key, run: None,
) -> dict:
    """The N_z = 3 run of `method` trained by the loop alone, on the data's device, from its
    checkpoint in `folder` if there is one (kept there, else nowhere); its record. Raises
    Interrupted if a stop request cut it short."""
    key = rf.RunKey(method, 3)
    run = rf.start_run(key, cfg, data, folder.resume_state(key) if folder else None)
    keep = dataclasses.replace(folder, show=on_keep).keep if folder else lambda run: None
    if not rf.train([run], cfg, data, keep):
        raise rf.Interrupted(130)
    return run.record


def tiny_config(**kw: Any) -> rf.Config:
    """A Config for runs of a second on the synthetic data, trained by `train_n_z3` or by
    `rf.start_run` and `rf.train` directly."""
    base = {
        "latent_dims": (3,),
        "methods": ("aevb",),
        "samples": 3000,
        "eval_start": 1000,
        "evals_per_decade": 2,
        "hidden_size": 32,
        "batch_size": 50,
        "threads": 1,
        "verify_data": False,
    }
    return rf.Config(**(base | kw))


def measured(path: Path) -> list[tuple]:
    """Every evaluation value of a results file, wall-clock fields left out."""
    runs = json.loads(path.read_text())["runs"]
    return [
        (r["method"], r["latent_dim"], r["status"], [without_wall(e) for e in r["evals"]])
        for r in runs
    ]


def without_wall(e: dict) -> dict:
    """An evaluation record without its wall-clock time."""
    return {k: v for k, v in e.items() if k != "wall_seconds"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network: a download attempt fails as it does on an offline machine."""

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("socket.getaddrinfo", offline)
    monkeypatch.setattr("socket.create_connection", offline)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of the tests that need a CUDA GPU."""
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped, with the reason, without")
