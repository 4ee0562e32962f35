"""Shared test helpers: synthetic MNIST in torchvision's raw layout (`make_mnist_dir`, the
`mnist_dir` and `synthetic_data` fixtures); tiny configurations (`tiny_config` for the loop,
`tiny_args` and `resumable_args` for the command line) and `train_n_z3`; a finished tiny
invocation to read or copy (the session's `finished` fixture); the script as a process of its
own (`start`, `running`, `wait_for`, `stop_at_first_checkpoint`); the evaluator's hand
computation (`hand_forward`, `hand_elbo`); what runs hold to compare (`measured`, `without_wall`,
`step_counters`); the `cuda` marker and the `no_network` guard."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import reproduce_fig2 as rf  # noqa: E402 (importable only once sys.path holds the root)

REAL_MNIST = ROOT.parent / "shared" / "mnist"
SCRIPT = str(ROOT / "reproduce_fig2.py")
FINISHED_UMASK = 0o027  # the umask the `finished` invocation ran under

torch.set_num_threads(1)


# -------------------------------------------------------------------------------- data
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
    """Synthetic MNIST in a temporary data folder (the same files, and digest, every time)."""
    return make_mnist_dir(tmp_path / "data")


@pytest.fixture
def synthetic_data(mnist_dir: Path) -> rf.Data:
    """The synthetic MNIST loaded through the real loader, on the CPU."""
    return rf.load_data(
        str(mnist_dir), torch.device("cpu"), binarize=False, seed=0, verify=False, download=False
    )


# -------------------------------------------------------------------------------- tiny runs
def tiny_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """Command-line arguments for four runs (both methods, N_z = 2 and 3) of a second or two
    on synthetic data, evaluated at 450, 1,000 and 1,200 samples; `extra` overrides."""
    fixed = ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--no-verify-data"]
    small = "--samples 1200 --eval-start 300 --evals-per-decade 3 --hidden-size 16 --batch-size 50"
    serial = "--threads 1 --jobs 1"
    return [*fixed, "--latent-dims", "2", "3", *small.split(), *serial.split(), *extra]


def resumable_args(data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """An AEVB N_z = 2 run of a few seconds whose first checkpoint (at 450 samples) comes
    early: time to stop it between its start and its end."""
    longer = ("--latent-dims", "2", "--methods", "aevb", "--hidden-size", "64")
    return tiny_args(data_dir, out_dir, *longer, "--samples", "40000", *extra)


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


@dataclasses.dataclass(frozen=True)
class Finished:
    """A finished `tiny_args` invocation: its results folder, not to be written to (copy it),
    its data folder and what it printed."""

    out: Path
    data_dir: Path
    printed: str

    def copy(self, to: Path) -> Path:
        """A copy of the results folder at `to`, to go on from; returns `to`."""
        shutil.copytree(self.out, to)
        return to


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """The four runs of `tiny_args`, trained once for the session (under FINISHED_UMASK)."""
    root = tmp_path_factory.mktemp("finished")
    data_dir, out = make_mnist_dir(root / "data"), root / "out"
    printed, umask = io.StringIO(), os.umask(FINISHED_UMASK)
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            assert rf.main(tiny_args(data_dir, out)) == 0
    finally:
        os.umask(umask)
    return Finished(out, data_dir, printed.getvalue())


# -------------------------------------------------------------------------------- processes
def start(args: list[str]) -> subprocess.Popen:
    """The script started as its own process, its output captured."""
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Poll until `condition()` holds while `proc` runs (`what`: the awaited event, for the
    failure message)."""
    deadline = time.monotonic() + 120
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.01)


@contextlib.contextmanager
def running(args: list[str]) -> Iterator[subprocess.Popen]:
    """The script running as its own process inside the block, killed if still there after."""
    proc = start(args)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=60)


def stop_at_first_checkpoint(args: list[str], checkpoint: Path, sig: int) -> tuple[int, str, str]:
    """Run the script with `args`, send `sig` once `checkpoint` exists; (status, stdout, stderr)."""
    with running(args) as proc:
        wait_for(checkpoint.exists, proc, f"{checkpoint} appeared")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    return proc.returncode, stdout, stderr


# -------------------------------------------------------------------------------- numbers
def hand_forward(vae: rf.VAE, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The paper's MLP VAE on images `x` with the noise `eps` ([B, N_z], or [K, B, N_z] for K
    draws per image), by hand in float64 on the CPU: pixels [B, 784], mu and log var [B, N_z],
    z and the decoder's means [..., B, 784]."""
    d = {k: v.double().cpu() for k, v in vae.state_dict().items()}
    xf, eps = rf.pixels(x).flatten(1).double().cpu(), eps.double().cpu()
    h = torch.tanh(xf @ d["encoder.1.weight"].T + d["encoder.1.bias"])
    mu = h @ d["sampling_layer.mu.weight"].T + d["sampling_layer.mu.bias"]
    lv = h @ d["sampling_layer.log_var.weight"].T + d["sampling_layer.log_var.bias"]
    z = mu + torch.exp(0.5 * lv) * eps
    hidden = torch.tanh(z @ d["decoder.0.weight"].T + d["decoder.0.bias"])
    y = torch.sigmoid(hidden @ d["decoder.2.weight"].T + d["decoder.2.bias"])
    return xf, mu, lv, z, y


def hand_elbo(vae: rf.VAE, x: torch.Tensor, eps: torch.Tensor) -> tuple[float, float]:
    """The average log p(x|z) and KL(q(z|x) || p(z)) of the paper's MLP VAE over images `x`,
    one z per image from the noise `eps`, computed by hand in float64 on the CPU."""
    xf, mu, lv, _, y = hand_forward(vae, x, eps)
    ll = (xf * torch.log(y) + (1 - xf) * torch.log(1 - y)).sum(1).mean()
    kl = (0.5 * (lv.exp() + mu**2 - 1 - lv)).sum(1).mean()
    return float(ll), float(kl)


def step_counters(run: rf.Run) -> list[float]:
    """Adagrad's step counter of every parameter of the run, as a checkpoint holds them."""
    return [float(s["step"]) for o in rf.run_state(run)["optimizers"] for s in o["state"].values()]


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


# -------------------------------------------------------------------------------- guards
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
