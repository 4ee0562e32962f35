#!/usr/bin/env python
"""Reproduce Figure 2 of Kingma & Welling, "Auto-Encoding Variational Bayes" (2013).

Trains the paper's MNIST variational autoencoders (N_z = 3, 5, 10, 20, 200) with AEVB and with
the wake-sleep baseline, tracks the average variational lower bound (ELBO) per datapoint on the
training and test sets against the number of training samples seen, and draws the figure the
way the paper does.

    python reproduce_fig2.py                    # train (MNIST is downloaded to ./data), see PNG
    python reproduce_fig2.py --help             # the flags, each defaulting to a constant below

Read from the top to the MACHINERY banner to learn the experiment: constants, data, the
paper's networks, the ELBO, the AEVB and wake-sleep steps, the loop over the runs and the
figure. Below the banner is what makes long runs safe and fast, in this order: stop requests,
run settings (device, cores, workers), CUDA graphs, files and fingerprints, the results folder
(checkpoints, run files, locks), the screen, training here or in worker processes, the time
estimate, the command line; and last main(), which chains the two. tests/benchmark.py
measures the engine's speed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import platform
import queue
import re
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing import resource_tracker
from typing import Any, NamedTuple

import matplotlib
import numpy as np
import pyautoencoder
import torch
import torchvision
from filelock import FileLock, Timeout
from matplotlib.figure import Figure
from pyautoencoder.variational import VAE
from torch import Tensor, nn
from torch.nn.functional import binary_cross_entropy_with_logits
from torch.optim import Adagrad

# ================================================================================ constants
LATENT_DIMS: tuple[int, ...] = (3, 5, 10, 20, 200)  # latent sizes N_z, one panel each
METHODS: tuple[str, ...] = ("aevb", "wake-sleep")  # training algorithms compared in each panel
HIDDEN_SIZE: int = 500  # hidden units of encoder and decoder (appendix C, MNIST)
BATCH_SIZE: int = 100  # minibatch size M
LR: float | str = 0.02  # Adagrad global step size, or "auto": pick one by pilot runs
LR_CANDIDATES: tuple[float, ...] = (0.01, 0.02, 0.1)  # step sizes the paper chose from
LR_PILOT_SAMPLES: int = 100_000  # training samples of each pilot run when LR is "auto"
MC_SAMPLES: int = 1  # z samples per datapoint, L (in training and in the evaluator)
WEIGHT_DECAY: float = 1 / 60_000  # N(0, I) prior on parameters, per datapoint: 1 / N_train
INIT_STD: float = 0.01  # standard deviation of the N(0, .) initialisation of every parameter
SAMPLES: int = 10_000_000  # training samples per (method, N_z) run (a flag takes 1e7 too)
EVAL_START: int = 100_000  # evaluations from the first grid point at or above this (axis: 1e5)
EVALS_PER_DECADE: int = 10  # log-spaced evaluation points per factor of ten of samples
EVAL_BATCH_SIZE: int = 5_000  # images per forward pass when scoring the ELBO (its noise)
BINARIZE: bool = False  # train on Bernoulli samples of the grey levels, score fixed ones
DATA_DIR: str = "./data"  # folder that holds MNIST/raw/ (torchvision layout)
VERIFY_DATA: bool = True  # check the decoded images and labels against MNIST's SHA-256 digests
OUT_DIR: str = "."  # folder for the figures, the JSON results and the runs' files
SEED: int = 1926  # master seed; each (method, N_z) run derives its own from it
SEEDS: int = 1  # seeds per (method, N_z); the figure draws their median and range
IW_SAMPLES: int = 100  # K, importance samples per test image of the final log p(x) estimate
IW_DECODES_PER_PASS: int = 50_000  # z draws per batch of the log p(x) estimate (its noise)
IW_DECODES_AT_ONCE: int = 5_000  # of which decoded at once (memory; the same numbers)
DEVICE: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu" or "cuda"
THREADS: int = 0  # CPU threads per process; 0 shares the cores among the processes in flight
JOBS: int = 0  # CPU: runs side by side in worker processes; 0: a worker per core (memory allowing)
CHECKPOINT_EVERY: float = 600.0  # seconds of training between checkpoints, besides one per point
GRAPH_STEPS: int = 50  # CUDA: training steps per CUDA graph, replayed as one launch; 0: no graphs
ESTIMATE_STEPS: int = 20  # timed steps per run for the time estimate (CUDA: at least 4 replays)

FIGURE_NAME = "vae_mnist_fig2_repro.png"  # figure written to OUT_DIR
FIGURE_EVERY_S = 60.0  # while training, the figure is redrawn at most this often (and at the end)
RESULTS_NAME = "vae_mnist_fig2_repro.json"  # combined results, rebuilt from the run files
RUNS_FOLDER = "runs"  # under OUT_DIR: one JSON and one lock file per run, the source of truth
CHECKPOINTS_FOLDER = "checkpoints"  # under OUT_DIR: the state of every unfinished run
MODELS_FOLDER = "models"  # under OUT_DIR: the final model of every finished run
SAMPLES_NAME = "vae_mnist_samples.png"  # samples and reconstructions of the final models
SHOW_DIGITS = 10  # digits per row of the samples picture
WORKER_MEMORY = 800 * 2**20  # bytes a CPU worker may take (0.74 GB measured: docs/reference.md)
PAPER_YLIM = (-150.0, -95.0)  # the paper's vertical range; lines that leave it are clipped
PAPER_XLIM = (1e5, 1e8)  # the paper's horizontal range (training samples, log scale)
METHOD_STYLE = {"aevb": ("AEVB", "tab:red"), "wake-sleep": ("WS", "tab:blue")}  # legend, colour


def positive(kind: type, or_zero: bool = False) -> Callable[[str], Any]:
    """A command-line value parser for a positive int or float (or zero, with `or_zero`); whole
    numbers may be written 1e6."""

    def parse(text: str) -> int | float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not (value > 0 or (or_zero and value == 0)):
            raise argparse.ArgumentTypeError(f"{text!r} must be positive" + " or 0" * or_zero)
        if kind is int and value != int(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be a whole number")
        return kind(value)

    return parse


def learning_rate(text: str) -> float | str:
    """A command-line value parser for Adagrad's step size: a positive number or "auto"."""
    try:
        return "auto" if text == "auto" else positive(float)(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: give a positive step size or auto") from None


WHOLE, WHOLE_OR_0 = positive(int), positive(int, or_zero=True)  # value parsers of counts


def flag(default: Any, **argparse_kwargs: Any) -> Any:
    """A Config field: its default is a constant, its metadata the arguments of its flag (whose
    help is the constant's comment)."""
    return field(default=default, metadata=argparse_kwargs)


@dataclass(frozen=True)
class Config:
    """The experiment's settings: each field is the flag --field-name, defaulting to the constant
    FIELD_NAME (the verbs --plot-only, --list-runs, --run-index and --fresh are the parser's)."""

    latent_dims: tuple[int, ...] = flag(LATENT_DIMS, nargs="+", type=WHOLE, metavar="N_Z")
    methods: tuple[str, ...] = flag(METHODS, nargs="+", choices=METHODS)
    samples: int = flag(SAMPLES, type=WHOLE)
    eval_start: int = flag(EVAL_START, type=WHOLE)
    evals_per_decade: int = flag(EVALS_PER_DECADE, type=WHOLE)
    lr: float | str = flag(LR, type=learning_rate)
    lr_pilot_samples: int = flag(LR_PILOT_SAMPLES, type=WHOLE)
    batch_size: int = flag(BATCH_SIZE, type=WHOLE)
    hidden_size: int = flag(HIDDEN_SIZE, type=WHOLE)
    binarize: bool = flag(BINARIZE)
    seed: int = flag(SEED, type=WHOLE_OR_0)
    seeds: int = flag(SEEDS, type=WHOLE)
    iw_samples: int = flag(IW_SAMPLES, type=WHOLE)
    device: str = flag(DEVICE, choices=("auto", "cpu", "cuda"))
    threads: int = flag(THREADS, type=WHOLE_OR_0)
    jobs: int = flag(JOBS, type=WHOLE_OR_0)
    graph_steps: int = flag(GRAPH_STEPS, type=WHOLE_OR_0)
    checkpoint_every: float = flag(CHECKPOINT_EVERY, type=positive(float))
    data_dir: str = flag(DATA_DIR)
    verify_data: bool = flag(VERIFY_DATA)
    out_dir: str = flag(OUT_DIR)

    @property
    def timing_lr(self) -> float:
        """A step size to time steps with: --lr, or the first candidate with --lr auto."""
        return LR_CANDIDATES[0] if self.lr == "auto" else float(self.lr)


# ================================================================================ data
MNIST_FILES = {  # the four IDX files under DATA_DIR/MNIST/raw/, per split
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_SHA256 = {  # of the standard MNIST files' decoded uint8 images and labels
    "train": (
        "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    ),
    "test": (
        "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    ),
}
DOWNLOAD_TIMEOUT_S = 20  # per network operation, so a missing network cannot hang the run


class DataError(RuntimeError):
    """A problem with the MNIST files, worded as one line for the user."""


@dataclass
class Data:
    """MNIST as uint8 [N, 1, 28, 28] tensors on the device (pixels() makes them intensities)."""

    train: Tensor  # what training draws minibatches from (grey levels)
    train_eval: Tensor  # the training set as scored by the evaluator
    test_eval: Tensor  # the test set as scored by the evaluator
    digest: str = ""  # SHA-256 of the four raw files, part of a run's fingerprint


def load_data(
    data_dir: str,
    device: torch.device,
    binarize: bool,
    seed: int,
    verify: bool = True,
    download: bool = True,
) -> Data:
    """Both MNIST splits, resident on `device`; evaluation sets binarized once when `binarize`."""
    ensure_mnist(data_dir, download=download)
    train, test = load_split(data_dir, "train", verify), load_split(data_dir, "test", verify)
    digest = files_digest(data_dir)
    if binarize:
        fixed = torch.Generator().manual_seed(seed)  # the same binary evaluation sets every time
        train_eval, test_eval = (
            torch.bernoulli(pixels(images), generator=fixed).mul_(255).to(torch.uint8)
            for images in (train, test)
        )
        return Data(train.to(device), train_eval.to(device), test_eval.to(device), digest)
    train = train.to(device)
    return Data(train, train, test.to(device), digest)


def load_split(data_dir: str, split: str, verify: bool = True) -> Tensor:
    """One MNIST split's images as a CPU uint8 tensor [N, 1, 28, 28]."""
    folder = raw_folder(data_dir)
    for name, ndim in zip(MNIST_FILES[split], (3, 1), strict=True):  # images, then labels
        check_idx_file(os.path.join(folder, name), ndim)
    ds = torchvision.datasets.MNIST(data_dir, train=split == "train", download=False)
    images, labels = ds.data, ds.targets
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or len(images) != len(labels):
        raise DataError(
            f"{folder}: the {split} files hold {tuple(images.shape)} images and {len(labels)} "
            "labels, not N x 28 x 28 with N labels"
        )
    if verify and (sha256_of(images), sha256_of(labels)) != MNIST_SHA256[split]:
        raise DataError(
            f"{folder}: the {split} split does not match the standard MNIST checksums; "
            "replace the files with the originals, or pass --no-verify-data for other data"
        )
    return images.unsqueeze(1)


def pixels(images: Tensor) -> Tensor:
    """Images as float32 intensities in [0, 1]: bytes divided by 255 (float images as they are)."""
    return images if images.is_floating_point() else images.to(torch.float32).div_(255)


def raw_folder(data_dir: str) -> str:
    """The folder where torchvision keeps the uncompressed MNIST files."""
    return os.path.join(data_dir, "MNIST", "raw")


def check_idx_file(path: str, expected_ndim: int) -> None:
    """Raise DataError unless `path` is a complete IDX file of unsigned bytes whose items have
    `expected_ndim` dimensions (3 for images, 1 for labels)."""
    with open(path, "rb") as f:
        head = f.read(4)
        ndim = head[3] if len(head) == 4 else 0
        dims_raw = f.read(4 * ndim)
    if head[:3] != b"\x00\x00\x08" or not 1 <= ndim <= 3 or len(dims_raw) < 4 * ndim:
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes (bad header): "
            "replace it with the original MNIST file"
        )
    if ndim != expected_ndim:  # two files swapped: torchvision's ValueError would say less
        kinds = {3: "images", 1: "labels"}
        raise DataError(
            f"{path} holds {kinds.get(ndim, f'{ndim}-dimensional items')} where its name says "
            f"{kinds[expected_ndim]}: replace it with the original MNIST file"
        )
    dims = struct.unpack(f">{ndim}I", dims_raw)
    if dims[0] == 0:
        raise DataError(f"{path} holds no items: replace it with the original MNIST file")
    expected, actual = 4 + 4 * ndim + math.prod(dims), os.path.getsize(path)
    if actual != expected:
        raise DataError(
            f"{path} is truncated or malformed: {actual} bytes where its header {list(dims)} "
            f"needs {expected}; replace it with the original MNIST file"
        )


def ensure_mnist(data_dir: str, download: bool = True) -> None:
    """Make sure the four raw MNIST files are under `data_dir`, downloading the missing ones if
    allowed: each appears whole, however the download ends and whoever else fetches them."""
    folder = raw_folder(data_dir)
    names = [name for pair in MNIST_FILES.values() for name in pair]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if not missing:
        return
    reason = "downloading is off"
    if download:
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            os.makedirs(folder, exist_ok=True)
            quiet = io.StringIO()
            with (
                tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as fetched,
                contextlib.redirect_stdout(quiet),
                contextlib.redirect_stderr(quiet),
            ):
                torchvision.datasets.MNIST(fetched, train=True, download=True)
                for name in missing:  # moved into place whole, beside files that were there
                    os.replace(os.path.join(raw_folder(fetched), name), os.path.join(folder, name))
            return
        except Exception as exc:  # noqa: BLE001 (any download failure becomes one readable line)
            lines = str(exc).strip().splitlines()
            reason = f"the download failed ({type(exc).__name__}: {lines[-1] if lines else exc})"
        finally:
            socket.setdefaulttimeout(old_timeout)
    raise DataError(
        f"MNIST not found: {os.path.abspath(folder)} lacks {', '.join(missing)} and {reason}. "
        f"Put the four files {', '.join(names)} in MNIST/raw/ under a folder and pass it "
        "with --data-dir"
    )


def sha256_of(t: Tensor) -> str:
    """SHA-256 of a uint8 tensor's bytes (MNIST_SHA256 lists those of the standard files)."""
    return hashlib.sha256(t.to(torch.uint8).numpy().tobytes()).hexdigest()


def files_digest(data_dir: str) -> str:
    """SHA-256 of the four raw MNIST files, in a fixed order."""
    h = hashlib.sha256()
    for name in (n for pair in MNIST_FILES.values() for n in pair):
        with open(os.path.join(raw_folder(data_dir), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


class Batches:
    """Minibatches of resident images, reshuffled each epoch by the run's own generator.
    take() makes no decision on the host, so a CUDA graph can replay it."""

    def __init__(self, images: Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.images, self.batch_size, self.generator = images, batch_size, generator
        self.per_epoch = len(images) // batch_size  # the incomplete last batch is dropped
        device = images.device
        self.order = torch.zeros(self.per_epoch, batch_size, dtype=torch.long, device=device)
        self.pos = self.per_epoch  # minibatches taken from this epoch's order: none left
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # pos, on the device

    def begin_epoch_if_used_up(self) -> int:
        """Start a new epoch's order if this one is used up; the minibatches left in the epoch."""
        if self.pos == self.per_epoch:
            perm = torch.randperm(
                len(self.images), generator=self.generator, device=self.images.device
            )
            self.order.copy_(perm[: self.per_epoch * self.batch_size].view(self.per_epoch, -1))
            self.pos = 0
            self.index.zero_()
        return self.per_epoch - self.pos

    def take(self) -> Tensor:
        """The next minibatch of this epoch, [batch_size, 1, 28, 28]."""
        x = pixels(self.images[self.order.index_select(0, self.index).view(-1)])
        self.index += 1
        self.pos += 1
        return x

    def state(self) -> dict:
        """The current epoch's order and the position in it."""
        return {"order": self.order.to("cpu", copy=True), "pos": self.pos}

    def load_state(self, state: dict) -> None:
        """Continue from a state() taken earlier (in place: a captured graph keeps working)."""
        self.order.copy_(state["order"])
        self.pos = state["pos"]
        self.index.fill_(self.pos)


# ================================================================================ model
def build_vae(latent_dim: int, hidden_size: int = HIDDEN_SIZE, init_std: float = INIT_STD) -> VAE:
    """The paper's MLP VAE (appendix C) on the CPU, parameters ~ N(0, init_std^2) by torch's RNG."""
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden_size), nn.Tanh())
    decoder = nn.Sequential(
        nn.Linear(latent_dim, hidden_size),
        nn.Tanh(),
        nn.Linear(hidden_size, 28 * 28),
        nn.Unflatten(1, (1, 28, 28)),
    )
    vae = VAE(encoder=encoder, decoder=decoder, latent_dim=latent_dim)
    vae.build(torch.zeros(1, 1, 28, 28))  # materialise the lazy Gaussian head
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, init_std)
    return vae


def encoder_parameters(vae: VAE) -> list[nn.Parameter]:
    """The recognition model's parameters: encoder body and Gaussian head."""
    return [*vae.encoder.parameters(), *vae.sampling_layer.parameters()]


# ================================================================================ ELBO evaluator
@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's global CPU (and CUDA) generators seeded with `seed` in the block, restored after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        yield


@torch.inference_mode()
def evaluate_elbo(vae: VAE, images: Tensor, seed: int) -> dict[str, float]:
    """Average per-datapoint ELBO (nats) over `images` and its parts; z drawn with `seed`, so
    every evaluation point scores its model with the same noise."""
    totals = torch.zeros(3, dtype=torch.float64, device=images.device)
    with seeded(seed, images.device):
        for x in map(pixels, images.split(EVAL_BATCH_SIZE)):
            d = vae.compute_loss(x, vae(x, S=MC_SAMPLES), likelihood="bernoulli").diagnostics
            parts = torch.stack([d["elbo"], d["log_likelihood"], d["kl_divergence"]])
            totals += parts.double() * len(x)
    elbo, ll, kl = (totals / len(images)).tolist()
    return {"elbo": elbo, "log_likelihood": ll, "kl": kl}


def gaussian_log_density(z: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
    """log N(z; mu, diag(exp(log_var))) summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (z - mu).pow(2) * torch.exp(-log_var)).sum(-1)


@torch.inference_mode()
def estimate_log_px(vae: VAE, images: Tensor, k: int, seed: int) -> float:
    """Average log p(x) over `images` by importance weighting (Burda et al. 2015): the log of
    the mean of p(x|z) p(z) / q(z|x) over K draws z ~ q(z|x) per image, noise from `seed`."""
    device = images.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    per_pass = max(1, IW_DECODES_PER_PASS // k)  # images per pass: K draws of z for each
    with seeded(seed, device):
        for x in images.split(per_pass):
            x = pixels(x).flatten(1)
            mu, log_var = vae.sampling_layer.get_params(vae.encoder(x))
            z = mu + torch.exp(0.5 * log_var) * torch.randn(k, *mu.shape, device=device)
            draws = max(1, IW_DECODES_AT_ONCE // len(x))  # decoded together, for memory
            log_w = torch.cat([log_weights(vae, zs, x, mu, log_var) for zs in z.split(draws)])
            total += (torch.logsumexp(log_w.double(), dim=0) - math.log(k)).sum()
    return float(total / len(images))


def log_weights(vae: VAE, z: Tensor, x: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
    """log p(x|z) + log p(z) - log q(z|x) of draws z [D, B, N_z] of images x [B, 784]: [D, B]."""
    logits = vae.decoder(z.flatten(0, 1)).view(len(z), len(x), -1)
    bce = binary_cross_entropy_with_logits(logits, x.expand(len(z), -1, -1), reduction="none")
    log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
    return log_prior - bce.sum(-1) - gaussian_log_density(z, mu, log_var)


def evaluate_point(vae: VAE, data: Data, seed: int) -> dict[str, float]:
    """The ELBO and its parts on the whole training and test sets, as one evaluation record."""
    train = evaluate_elbo(vae, data.train_eval, seed)
    test = evaluate_elbo(vae, data.test_eval, seed)
    return {
        "train_elbo": train["elbo"],
        "test_elbo": test["elbo"],
        "train_log_likelihood": train["log_likelihood"],
        "train_kl": train["kl"],
        "test_log_likelihood": test["log_likelihood"],
        "test_kl": test["kl"],
    }


# ================================================================================ training steps
def make_optimizers(vae: VAE, method: str, lr: float, fused: bool) -> list[Adagrad]:
    """Adagrad with the prior's weight decay: one for AEVB, decoder and encoder apart for WS
    (no lr_decay, as in the paper; CUDA graphs need a step size that ignores the step count)."""
    groups = {
        "aevb": [list(vae.parameters())],
        "wake-sleep": [list(vae.decoder.parameters()), encoder_parameters(vae)],
    }[method]
    # fused: one kernel per step on the CPU; foreach on CUDA keeps the step counters on the
    # host, where CudaGraphs.next_replay counts the replayed steps
    kwargs = {"fused": True} if fused else {"foreach": True}
    return [Adagrad(g, lr=lr, weight_decay=WEIGHT_DECAY, **kwargs) for g in groups]


def reparameterise(mu: Tensor, log_var: Tensor, gen: torch.Generator) -> Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): MC_SAMPLES draws per datapoint, [B * L, N_z]."""
    shape = (len(mu), MC_SAMPLES, mu.shape[-1])
    eps = torch.randn(shape, generator=gen, device=mu.device, dtype=mu.dtype)
    return (mu.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * eps).flatten(0, 1)


def neg_log_px_given_z(vae: VAE, z: Tensor, x: Tensor) -> Tensor:
    """-log p(x|z) of the Bernoulli decoder, summed over pixels and datapoints, mean over L z."""
    x = x.unsqueeze(1).expand(-1, MC_SAMPLES, *x.shape[1:]).flatten(0, 1)  # L = 1: a view
    return binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="sum") / MC_SAMPLES


def kl_to_prior(mu: Tensor, log_var: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) in closed form (the paper's appendix B), summed over datapoints."""
    return 0.5 * (log_var.exp() + mu.pow(2) - 1 - log_var).sum()


def aevb_loss(vae: VAE, x: Tensor, gen: torch.Generator) -> Tensor:
    """-ELBO per datapoint of minibatch x by the SGVB estimator B (closed-form KL, L z draws)."""
    # VAE.compute_loss's objective (a test holds them equal) without its per-step overhead
    mu, log_var = vae.sampling_layer.get_params(vae.encoder(x))
    z = reparameterise(mu, log_var, gen)
    return (neg_log_px_given_z(vae, z, x) + kl_to_prior(mu, log_var)) / len(x)


def aevb_step(vae: VAE, opts: list[Adagrad], x: Tensor, gen: torch.Generator) -> Tensor:
    """One AEVB step on minibatch x: Adagrad on encoder and decoder together; returns -ELBO."""
    (opt,) = opts
    opt.zero_grad(set_to_none=True)
    loss = aevb_loss(vae, x, gen)
    loss.backward()
    opt.step()
    return loss.detach()


def wake_step(vae: VAE, opt: Adagrad, x: Tensor, gen: torch.Generator) -> Tensor:
    """Wake phase: z ~ q(z|x) held fixed, the decoder climbs log p(x|z); returns -log p(x|z)."""
    with torch.no_grad():
        z = reparameterise(*vae.sampling_layer.get_params(vae.encoder(x)), gen)
    loss = neg_log_px_given_z(vae, z, x) / len(x)  # per datapoint
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def sleep_step(vae: VAE, opt: Adagrad, batch_size: int, gen: torch.Generator) -> Tensor:
    """Sleep phase: a fantasy (z, x) from the generative model, the encoder climbs log q(z|x)."""
    device = next(vae.parameters()).device
    with torch.no_grad():
        z = torch.randn(batch_size, vae.latent_dim, generator=gen, device=device)
        x = torch.bernoulli(torch.sigmoid(vae.decoder(z)), generator=gen)
    mu, log_var = vae.sampling_layer.get_params(vae.encoder(x))
    loss = -gaussian_log_density(z, mu, log_var).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def wake_sleep_step(vae: VAE, opts: list[Adagrad], x: Tensor, gen: torch.Generator) -> Tensor:
    """One wake-sleep step on minibatch x (decoder, then encoder); returns the summed losses."""
    dec_opt, enc_opt = opts
    return wake_step(vae, dec_opt, x, gen) + sleep_step(vae, enc_opt, len(x), gen)


Step = Callable[[VAE, list[Adagrad], Tensor, torch.Generator], Tensor]
STEPS: dict[str, Step] = {"aevb": aevb_step, "wake-sleep": wake_sleep_step}  # by method


# ================================================================================ the runs
def log(message: str) -> None:
    """Print one line at once (a log file shows it as it happens)."""
    print(message, flush=True)


def eval_schedule(target: int, batch_size: int, start: int, per_decade: int) -> list[int]:
    """Sample counts to evaluate at: 10^(k / per_decade) in whole minibatches, then the target."""
    end = max(batch_size, math.ceil(target / batch_size) * batch_size)  # at least the target
    k = math.ceil(per_decade * math.log10(min(start, end)) - 1e-9)
    points = []
    while (s := 10 ** (k / per_decade)) < end:
        points.append(max(batch_size, round(s / batch_size) * batch_size))
        k += 1
    return sorted({p for p in points if p < end} | {end})


def schedule_of(cfg: Config) -> list[int]:
    """The evaluation points of every run of a configuration."""
    return eval_schedule(cfg.samples, cfg.batch_size, cfg.eval_start, cfg.evals_per_decade)


class RunKey(NamedTuple):
    """One run of the figure: a method, a latent size and which of the --seeds seeds."""

    method: str
    latent_dim: int
    seed_index: int = 0

    @property
    def name(self) -> str:
        """How the log names the run: 'aevb N_z=20', or 'aevb N_z=20 seed 2'."""
        seed = f" seed {self.seed_index}" if self.seed_index else ""
        return f"{self.method} N_z={self.latent_dim}{seed}"

    @property
    def stem(self) -> str:
        """The run's file names without extension: 'aevb_nz20', or 'aevb_nz20_seed2'."""
        seed = f"_seed{self.seed_index}" if self.seed_index else ""
        return f"{self.method}_nz{self.latent_dim}{seed}"

    @classmethod
    def of(cls, record: dict) -> RunKey:
        """The key of a run record."""
        return cls(record["method"], record["latent_dim"], record["seed_index"])


def runs_of(cfg: Config) -> list[RunKey]:
    """The runs of a configuration, in figure order (--list-runs shows them)."""
    return [RunKey(m, d, i) for m in cfg.methods for d in cfg.latent_dims for i in range(cfg.seeds)]


def pending_record(key: RunKey) -> dict:
    """The record of a run that no process has started. Records also hold seed, lr, threads
    (once started), lr_pilot_scores (--lr auto), log_px (done), earlier_log_px (extended),
    diverged_at, error (failed); statuses: pending, running, interrupted, done, diverged,
    failed."""
    return {**key._asdict(), "status": "pending", "evals": []}


def run_seed(seed: int, method: str, latent_dim: int, seed_index: int = 0) -> int:
    """A run's own seed, hashed from (seed, method, N_z, seed index): no run depends on another."""
    text = f"{seed}/{method}/{latent_dim}" + f"/{seed_index}" * bool(seed_index)  # 0: left out
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


@dataclass
class Clock:
    """Wall seconds a run has trained, across stops and resumes (runs trained in one process
    take turns: each counts the wall time of them all)."""

    before: float = 0.0  # seconds trained by earlier processes
    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        """Seconds trained so far."""
        return self.before + time.perf_counter() - self.start


@dataclass
class Run:
    """One run in flight: its record (its run file's content), model, optimisers, minibatches,
    the generator of all its training noise, and how far it has trained."""

    key: RunKey
    record: dict
    vae: VAE
    opts: list[Adagrad]
    batches: Batches
    gen: torch.Generator
    step: Callable[[], Tensor]  # one training step on the next minibatch; returns its loss
    samples: int = 0
    loss: Tensor = field(default_factory=lambda: torch.zeros(()))  # of its latest step
    clock: Clock = field(default_factory=Clock)

    @property
    def status(self) -> str:
        """ "pending", "running", "interrupted", "done", "diverged" or "failed"."""
        return self.record["status"]


def new_run(key: RunKey, record: dict, cfg: Config, data: Data) -> Run:
    """The run of `record` at its start, on the data's device; all its noise from one generator."""
    seed, device = record["seed"], data.train.device
    with seeded(seed, torch.device("cpu")):
        vae = build_vae(key.latent_dim, cfg.hidden_size).to(device)
        after_init = torch.get_rng_state()
    gen = torch.Generator(device)
    if device.type == "cpu":  # the CPU's training noise goes on from where the init stopped
        gen.set_state(after_init)
    else:
        gen.manual_seed(seed)
    opts = make_optimizers(vae, key.method, record["lr"], fused=device.type == "cpu")
    batches = Batches(data.train, cfg.batch_size, gen)
    method_step, binarize = STEPS[key.method], cfg.binarize

    def step() -> Tensor:
        x = batches.take()
        return method_step(vae, opts, torch.bernoulli(x, generator=gen) if binarize else x, gen)

    return Run(key, record, vae, opts, batches, gen, step)


def run_state(run: Run) -> dict:
    """A copy of everything the run needs to go on exactly as it would have."""
    return {
        "run": copy.deepcopy(run.record),
        "samples": run.samples,
        "wall_seconds": run.clock.seconds(),
        "model": {k: v.detach().to("cpu", copy=True) for k, v in run.vae.state_dict().items()},
        "optimizers": [copy.deepcopy(opt.state_dict()) for opt in run.opts],
        "batches": run.batches.state(),
        "generator": run.gen.get_state(),
    }


def load_run_state(run: Run, state: dict) -> None:
    """Put the run back where run_state() found it (its record and clock aside), in place: a
    captured graph keeps working."""
    run.vae.load_state_dict(state["model"])
    for opt, saved in zip(run.opts, state["optimizers"], strict=True):
        # Adagrad makes its state when constructed: copied into, not replaced, for the graphs
        params = [p for group in opt.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            for name, value in saved["state"][i].items():
                opt.state[p][name].copy_(value)
    run.batches.load_state(state["batches"])
    run.gen.set_state(state["generator"])
    run.samples = state["samples"]


def start_run(key: RunKey, cfg: Config, data: Data, checkpoint: dict | None) -> Run:
    """A run ready to train: new (--lr auto: pilots pick its step size), or from `checkpoint`
    (ResultsFolder.resume_state: the further of its checkpoint and its final model)."""
    threads = torch.get_num_threads()
    if checkpoint:
        record = checkpoint["run"] | {"status": "running", "threads": threads}
        if "log_px" in record:  # extended: estimated again at the new end, this one kept
            measured = record.pop("log_px") | {"samples": checkpoint["samples"]}
            record["earlier_log_px"] = [*record.get("earlier_log_px", []), measured]
    else:
        seed = run_seed(cfg.seed, *key)
        record = pending_record(key) | {"status": "running", "seed": seed, "threads": threads}
        if cfg.lr == "auto":
            record["lr"], record["lr_pilot_scores"] = pick_lr(key, seed, cfg, data)
        else:
            record["lr"] = cfg.lr
    run = new_run(key, record, cfg, data)
    if checkpoint:
        load_run_state(run, checkpoint)
        run.clock = Clock(checkpoint["wall_seconds"])
    device = data.train.device
    where = f"{threads} thread{'s' * (threads > 1)}" if device.type == "cpu" else str(device)
    log(f"[{key.name}] training on {where}")
    if checkpoint and checkpoint["run"]["status"] == "done":
        log(f"[{key.name}] extended from its end at {run.samples:,} samples")
    elif checkpoint:
        log(f"[{key.name}] resumed from its checkpoint at {run.samples:,} samples")
    return run


def advance_eagerly(runs: list[Run], target: int, until: float = math.inf) -> bool:
    """Step each run to `target` samples, or until time.monotonic() passes `until`; False if a
    stop request came first (the runs then stand where they stopped)."""
    for run in runs:  # STOP_REQUEST: the signals received (stop requests, below the banner)
        while run.samples < target and not STOP_REQUEST and time.monotonic() < until:
            run.batches.begin_epoch_if_used_up()
            run.loss = run.step()
            run.samples += run.batches.batch_size
    return not STOP_REQUEST


Advance = Callable[[list[Run], int, float], bool]  # advance_eagerly, or CudaGraphs.advance
Keep = Callable[[Run], None]  # keeps a run: ResultsFolder.keep (checkpoint, run file, screen)


def train(
    runs: list[Run], cfg: Config, data: Data, keep: Keep, advance: Advance | None = None
) -> bool:
    """The experiment: every run in flight advanced from one evaluation point to the next
    (eager steps on the CPU, CUDA graphs on a GPU), scored there, kept; at its end, its log
    p(x) estimate. False if a stop request cut training short."""
    advance = advance or (advance_eagerly if STOP_REQUEST else advance_on(runs, cfg))
    for run in runs:  # each clock counts from here, not the set-up of the runs beside it
        run.clock.start = time.perf_counter()
    points = schedule_of(cfg)
    end = points[-1]
    for point in points:  # in flight: the runs still to be scored here, or finished
        in_flight = [
            run
            for run in runs
            if run.status == "running" and (scored_to(run.record) < point or point == end)
        ]
        if not in_flight:
            continue
        stopped = False
        while any(run.samples < point for run in in_flight):
            if not advance(in_flight, point, time.monotonic() + cfg.checkpoint_every):
                stopped = True
                break
            for run in in_flight:  # a checkpoint at least every --checkpoint-every seconds
                if run.samples < point:
                    keep(run)
        for run in in_flight:
            # scored if it reached the point, unless it was scored there before a stop
            if run.samples == point > scored_to(run.record):
                score(run, evaluate_point(run.vae, data, cfg.seed))
            if run.status == "running" and run.samples == end:
                k = cfg.iw_samples
                log_px = estimate_log_px(run.vae, data.test_eval, k, cfg.seed)
                iw = {"test": log_px, "k": k, "decodes_per_pass": IW_DECODES_PER_PASS}
                run.record |= {"log_px": iw, "status": "done"}
            elif run.status == "running" and stopped:
                run.record["status"] = "interrupted"
            keep(run)
        if stopped:
            return False
    return True


def scored_to(record: dict) -> int:
    """The samples of a run's last evaluation (0 before the first)."""
    return record["evals"][-1]["samples"] if record["evals"] else 0


def score(run: Run, evaluation: dict[str, float]) -> None:
    """Add an evaluation to the record, or mark the run diverged if it or its loss is not finite."""
    if all(math.isfinite(v) for v in [*evaluation.values(), float(run.loss)]):
        run.record["evals"].append(
            {"samples": run.samples, **evaluation, "wall_seconds": run.clock.seconds()}
        )
    else:
        run.record["status"], run.record["diverged_at"] = "diverged", run.samples


def pick_lr(
    key: RunKey, seed: int, cfg: Config, data: Data
) -> tuple[float, dict[str, float | None]]:
    """The paper's step-size choice: the candidate whose short pilot scores the best train ELBO."""
    scores: dict[str, float | None] = {}  # None: the pilot diverged (scored worst)
    pilot_end = math.ceil(cfg.lr_pilot_samples / cfg.batch_size) * cfg.batch_size
    for lr in LR_CANDIDATES:
        pilot = new_run(key, {"seed": seed, "lr": lr}, cfg, data)
        advance_eagerly([pilot], pilot_end)
        stop_if_requested()
        finite = bool(torch.isfinite(pilot.loss))
        elbo = evaluate_elbo(pilot.vae, data.train_eval, cfg.seed)["elbo"] if finite else math.nan
        scores[repr(lr)] = elbo if math.isfinite(elbo) else None
        log(f"[{key.name}] pilot lr {lr}: train ELBO {elbo:.3f} after {pilot_end:,} samples")
    best = max(LR_CANDIDATES, key=lambda lr: -math.inf if (s := scores[repr(lr)]) is None else s)
    log(f"[{key.name}] chose lr {best}")
    return best, scores


# ================================================================================ figure
def plot_results(results: dict, path: str) -> Figure:
    """Draw Figure 2 in the paper's frame (lines clipped at its edges, as there): a panel per
    N_z, train solid, test dashed; with several seeds, the median and a band for the range."""
    runs = [r for r in results["runs"] if r["evals"]]
    dims = list(dict.fromkeys(r["latent_dim"] for r in results["runs"])) or [None]
    fig = Figure(figsize=(3.0 * len(dims), 3.7))
    axes = fig.subplots(1, len(dims), sharey=True, squeeze=False)[0]
    for ax, nz in zip(axes, dims, strict=True):
        for method in dict.fromkeys(r["method"] for r in runs if r["latent_dim"] == nz):
            seeds = [r for r in runs if r["latent_dim"] == nz and r["method"] == method]
            label, colour = METHOD_STYLE.get(method, (method, None))
            for split, style in (("train", "-"), ("test", "--")):
                xs, low, mid, high = seed_band(seeds, f"{split}_elbo")
                ax.plot(xs, mid, style, color=colour, linewidth=1.2, label=f"{label} ({split})")
                if len(seeds) > 1:
                    ax.fill_between(xs, low, high, color=colour, alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlim(*PAPER_XLIM)
        ax.set_title(f"MNIST, $N_z = {nz}$")
        ax.set_xlabel("# Training samples evaluated")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylim(*PAPER_YLIM)
    axes[0].set_ylabel(r"$\mathcal{L}$")
    legend = {line.get_label(): line for ax in axes for line in ax.get_lines()}
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return fig


def seed_band(runs: list[dict], name: str) -> tuple[list[int], list, list, list]:
    """Samples, min, median and max of `name` over seeds, at the points all of them reached."""
    reached = [{e["samples"]: e[name] for e in r["evals"]} for r in runs]
    xs = sorted(set.intersection(*(set(values) for values in reached)))
    columns = [[values[x] for values in reached] for x in xs]
    return xs, *(list(map(f, columns)) for f in (min, statistics.median, max))


def results_table(results: dict) -> str:
    """The last ELBOs and test log p(x) per (method, N_z), as Markdown; seeds: median (range);
    each log p(x) with its K when the runs' K differ."""
    lines = [
        "| method | N_z | seeds | samples | train ELBO | test ELBO | test log p(x) | gap "
        "| status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    all_k = {r["log_px"]["k"] for r in results["runs"] if r.get("log_px")}  # several: say each
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["method"], r["latent_dim"]), []).append(r)
    for (method, latent_dim), runs in groups.items():
        last = [r["evals"][-1] for r in runs if r["evals"]]
        iw = [(r["log_px"]["test"], r["evals"][-1]["test_elbo"]) for r in runs if r.get("log_px")]
        ks = ", ".join(str(k) for k in sorted({r["log_px"]["k"] for r in runs if r.get("log_px")}))
        cells = [
            spread([e["samples"] for e in last], "{:,.0f}"),
            spread([e["train_elbo"] for e in last]),
            spread([e["test_elbo"] for e in last]),
            spread([log_px for log_px, _ in iw]) + f" (K = {ks})" * (len(all_k) > 1 and bool(ks)),
            spread([log_px - elbo for log_px, elbo in iw]),
        ]
        status = ", ".join(dict.fromkeys(r["status"] for r in runs))
        name = METHOD_STYLE.get(method, (method,))[0]
        lines.append(f"| {name} | {latent_dim} | {len(runs)} | {' | '.join(cells)} | {status} |")
    return "\n".join(lines)


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """One value, or the median and the range of several; '-' for none."""
    if not values:
        return "-"
    if len(values) == 1 or min(values) == max(values):
        return fmt.format(values[0])
    median, low, high = statistics.median(values), min(values), max(values)
    return f"{fmt.format(median)} ({fmt.format(low)} to {fmt.format(high)})"


@torch.inference_mode()
def plot_samples(models: dict[RunKey, dict], digits: Tensor, path: str, seed: int) -> Figure:
    """What the final models learned: per N_z, decoder means of z ~ N(0, I) (the same z for
    each method) and reconstructions of the test digits shown on top; methods side by side."""
    dims = sorted({key.latent_dim for key in models})
    methods = [m for m in METHODS if any(key.method == m for key in models)]
    fig = Figure(figsize=(4.4 * max(1, len(methods)), 0.62 * (1 + 2 * len(dims)) + 0.2))
    grid = fig.add_gridspec(1 + 2 * len(dims), max(1, len(methods)))
    digits = pixels(digits[:SHOW_DIGITS].cpu())
    show_strip(fig.add_subplot(grid[0, :]), digits, "test digits")
    for row, nz in enumerate(dims):
        z = torch.randn(SHOW_DIGITS, nz, generator=torch.Generator().manual_seed(seed + nz))
        for col, method in enumerate(methods):
            top, bottom = (fig.add_subplot(grid[r, col]) for r in (1 + 2 * row, 2 + 2 * row))
            if (saved := models.get(RunKey(method, nz))) is None:
                top.axis("off")
                bottom.axis("off")
                continue
            vae = build_vae(nz, saved["hidden_size"])
            vae.load_state_dict(saved["model"])
            mu, _ = vae.sampling_layer.get_params(vae.encoder(digits))
            name = f"{METHOD_STYLE.get(method, (method,))[0]}, $N_z = {nz}$"
            name += f" (diverged; its state at {saved['samples']:,} samples)" * saved["diverged"]
            show_strip(top, torch.sigmoid(vae.decoder(z)), f"{name}: samples")
            show_strip(bottom, torch.sigmoid(vae.decoder(mu)), f"{name}: reconstructions")
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    return fig


def draw_samples(cfg: Config) -> str | None:
    """Draw the samples picture from the final models in --out-dir (the first seed of each
    setting), with the test digits read from --data-dir; its path, or None without models."""
    folder, models = os.path.join(cfg.out_dir, MODELS_FOLDER), {}
    for name in files_in(folder, ".pt"):
        model = os.path.join(folder, name)
        try:
            saved = torch.load(model, map_location="cpu", weights_only=True)
            key = RunKey.of(saved)
        except Exception as exc:  # noqa: BLE001 (a damaged model must not cost the picture)
            print(
                f"warning: {model} cannot be read ({one_line(exc)}); the samples "
                "picture leaves it out",
                file=sys.stderr,
            )
            continue
        if key.seed_index == 0:
            models[key] = saved
    if not models:
        return None
    path = os.path.join(cfg.out_dir, SAMPLES_NAME)
    plot_samples(models, load_split(cfg.data_dir, "test", cfg.verify_data), path, cfg.seed)
    return path


def show_strip(ax: Any, images: Tensor, title: str) -> None:
    """A row of 28 x 28 images side by side, titled."""
    ax.imshow(
        torch.cat(list(images.reshape(-1, 28, 28)), dim=1).numpy(), cmap="gray", vmin=0, vmax=1
    )
    ax.set_title(title, fontsize=7, loc="left", pad=2)
    ax.axis("off")


# ################################################################################################
# MACHINERY: everything below serves long runs: stop requests, run settings, CUDA graphs, files
# and fingerprints, the results folder (checkpoints, run files, locks), the screen, training here
# or in worker processes, the time estimate, the command line. main() at the end chains the two.
# ################################################################################################


# -------------------------------------------------------------------------------- stop requests
STOP_REQUEST: list[int] = []  # signals received; training stops at the next step boundary


class Interrupted(BaseException):
    """Training stopped on request (Ctrl-C or SIGTERM); `code` is the exit status, 128 + signal."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def request_stop(signum: int, frame: object) -> None:
    """Signal handler: stop after the current step (further signals change nothing)."""
    if not STOP_REQUEST:
        STOP_REQUEST.append(signum)


@contextlib.contextmanager
def stop_requests() -> Iterator[None]:
    """Ctrl-C and SIGTERM become stop requests inside the block."""
    STOP_REQUEST.clear()
    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Ctrl-C held back (deferred, not lost) in the block from this thread and the processes
    it starts, which keep it held until they let it through: one that reaches a worker while
    it imports is then no traceback. POSIX only; elsewhere nothing is held."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    resource_tracker.ensure_running()  # now: starting, it would let Ctrl-C through
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def stop_if_requested() -> None:
    """Raise Interrupted if a stop request came."""
    if STOP_REQUEST:
        raise Interrupted(128 + STOP_REQUEST[0])


# -------------------------------------------------------------------------------- run settings
def resolve_device(name: str) -> torch.device:
    """The torch device for "auto", "cpu" or "cuda", set up for float32 throughout."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    # No TF32: the matrix products keep float32's 24-bit mantissa (TF32 keeps 11), so the
    # numbers stay those of the paper's float model on every device.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)


def cpu_count() -> int:
    """CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_name() -> str:
    """The processor's model name, as /proc/cpuinfo gives it where it exists."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def side_by_side(cfg: Config, device: torch.device, runs: int) -> int:
    """How many of `runs` runs train side by side, each in a worker process of its own (1: all
    in this process, as on a GPU): --jobs, or one per usable core, up to the runs and to what
    the available memory holds."""
    if device.type != "cpu" or runs < 2:
        return 1
    if cfg.jobs:
        return min(cfg.jobs, runs)
    memory = available_memory()
    room = memory // WORKER_MEMORY if memory is not None else runs
    return max(1, min(cpu_count(), runs, room))


def available_memory() -> int | None:
    """Bytes of memory that new processes can take (Linux's MemAvailable); None where unknown."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def threads_for(cfg: Config, in_flight: int) -> int:
    """CPU threads for a process that starts now: --threads, or the cores shared among the
    processes that will be in flight with it (so a lone one gets every core)."""
    return cfg.threads or max(1, cpu_count() // max(1, in_flight))


# -------------------------------------------------------------------------------- CUDA graphs
def advance_on(runs: list[Run], cfg: Config) -> Advance:
    """How the runs advance: CUDA graphs on a GPU (unless --graph-steps 0), captured now, before
    any file changes (CaptureError if one cannot be); else eager steps."""
    if not runs or runs[0].batches.images.device.type != "cuda" or not cfg.graph_steps:
        return advance_eagerly
    engine = CudaGraphs(cfg.graph_steps)
    engine.capture_all(runs)
    return engine.advance


class Graphed(NamedTuple):
    """A run's CUDA stream, and its graphs and their loss outputs by steps per replay."""

    stream: torch.cuda.Stream
    graphs: dict[int, torch.cuda.CUDAGraph]
    losses: dict[int, Tensor]


class CaptureError(RuntimeError):
    """A run's training steps could not be captured as a CUDA graph, worded as one line."""


class CudaGraphs:
    """Advances runs on a GPU by replaying each run's steps, captured once as CUDA graphs of
    `steps` steps and of one, on its own stream, with no host synchronisation until the target.
    Graphs draw from the run's own generator, so its numbers do not depend on its neighbours.
    Each replay advances Adagrad's step counters on the host by its steps, so checkpoints hold
    the true count. Beyond torch's 32 streams per device, runs share streams (same numbers)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.graphs: dict[int, Graphed] = {}  # by id(run)

    def capture_all(self, runs: list[Run]) -> None:
        """Capture every run's graphs now, before training; CaptureError if one cannot be."""
        for run in runs:
            if id(run) not in self.graphs:
                self.graphs[id(run)] = self.capture(run)

    def advance(self, runs: list[Run], target: int, until: float = math.inf) -> bool:
        """advance_eagerly's contract, by replaying the runs' graphs side by side."""
        self.capture_all(runs)
        graphed = [(run, self.graphs[id(run)]) for run in runs]
        for _, g in graphed:  # after all the host queued before: restored states, evaluations
            g.stream.wait_stream(torch.cuda.current_stream())
        while (
            not STOP_REQUEST
            and time.monotonic() < until
            and (moving := [(r, g) for r, g in graphed if r.samples < target])
        ):
            for run, g in moving:
                with torch.cuda.stream(g.stream):  # a new epoch's order, if due, on its stream
                    n = self.next_replay(run, target)
                    g.graphs[n].replay()
                run.loss = g.losses[n]
        for _, g in graphed:
            torch.cuda.current_stream().wait_stream(g.stream)
        return not STOP_REQUEST

    def next_replay(self, run: Run, target: int) -> int:
        """Steps of the run's next replay, counted on the host as taken: the long graph if it
        ends before both `target` and the epoch's end (a graph cannot start one), else one step."""
        steps = min(
            (target - run.samples) // run.batches.batch_size, run.batches.begin_epoch_if_used_up()
        )
        n = self.steps if steps >= self.steps else 1
        run.batches.pos += n
        run.samples += n * run.batches.batch_size
        for state in (state for opt in run.opts for state in opt.state.values()):
            state["step"] += n  # Adagrad's step counter, on the host
        return n

    def capture(self, run: Run) -> Graphed:
        """The run's stream and graphs, the run put back; CaptureError naming cause and way out."""
        saved = run_state(run)
        try:
            return self.capture_graphs(run, saved)
        except Exception as exc:  # any capture problem becomes one line, naming the first
            cause = exc  # error (a failed capture's own cleanup can raise a second)
            while cause.__context__ is not None:
                cause = cause.__context__
            raise CaptureError(
                f"[{run.key.name}] its training step could not be captured as a CUDA graph "
                f"({one_line(cause)}); train with --graph-steps 0 (eager steps on the GPU, the "
                "same numbers, slower) or --device cpu; nothing was lost"
            ) from exc

    def capture_graphs(self, run: Run, saved: dict) -> Graphed:
        """Capture the run's graphs on a new stream after a warm-up (lazy initialisation happens
        there), then put the run back to `saved`."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                run.batches.begin_epoch_if_used_up()
                run.step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        load_run_state(run, saved)
        run.batches.begin_epoch_if_used_up()  # a capture must not start a new epoch
        graphs, losses = {}, {}
        for n in dict.fromkeys((self.steps, 1)):
            graph = torch.cuda.CUDAGraph()
            with warnings.catch_warnings():  # needed up to torch 2.11; later a no-op that warns
                warnings.filterwarnings("ignore", message=r".*register_generator_state")
                graph.register_generator_state(run.gen)
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(n):
                    loss = run.step()
            graphs[n], losses[n] = graph, loss
        load_run_state(run, saved)  # the host's counts, moved by the capture
        return Graphed(stream, graphs, losses)


# -------------------------------------------------------------------------------- files
def one_line(exc: BaseException) -> str:
    """An exception as 'Type: first line of its message'."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def write_atomic(path: str, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write `path` through `write` so that a reader or a kill finds the old file or the new one;
    DiskFullError on a full disk, the old file left as it was."""
    # hand-written: the standard library has no atomic replace with fsync
    folder, tmp = os.path.dirname(os.path.abspath(path)), ""
    umask = os.umask(0)
    os.umask(umask)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a plainly written file, not 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            if tmp:
                os.unlink(tmp)
        if no_space(exc):
            raise DiskFullError(
                f"no space left on the device while writing {path}: free some space there (or "
                "choose another --out-dir) and run the same command again; it goes on from the "
                "last checkpoint, which is kept"
            ) from None
        raise


class DiskFullError(RuntimeError):
    """The disk (or the quota) filled while a file was written, worded as one line."""


def no_space(exc: BaseException | None) -> bool:
    """Whether `exc`, or one behind it, is a full disk or quota (torch.save wraps the OSError)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_json_atomic(obj: dict, path: str) -> None:
    """Write `obj` as JSON to `path`, atomically."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def move_aside(path: str) -> None:
    """Move an earlier results file or folder out of the way, time-stamped."""
    if os.path.exists(path):
        stem, ext = os.path.splitext(path)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
        aside, n = f"{stem}.{stamp}{ext}", 1
        while os.path.exists(aside):  # set aside twice within a second
            aside, n = f"{stem}.{stamp}-{n}{ext}", n + 1
        os.replace(path, aside)
        print(f"kept {path} aside as {aside}")


# -------------------------------------------------------------------------------- fingerprints
class CheckpointError(RuntimeError):
    """A run file or checkpoint that cannot be used, worded as one line for the user."""


def fixed_constants(cfg: Config) -> dict:
    """The constants without a flag that change the training or its ELBO evaluations, for
    results and fingerprints (the step sizes piloted only under --lr auto; IW_DECODES_PER_PASS,
    like --iw-samples, moves only log p(x))."""
    return {
        "mc_samples": MC_SAMPLES,
        "weight_decay": WEIGHT_DECAY,
        "init_std": INIT_STD,
        **({"lr_candidates": list(LR_CANDIDATES)} if cfg.lr == "auto" else {}),
        "eval_batch_size": EVAL_BATCH_SIZE,
    }


def package_versions() -> dict[str, str]:
    """The versions of the packages that compute or draw the numbers."""
    return {p.__name__: str(p.__version__) for p in (torch, torchvision, pyautoencoder, np)}


def fingerprint(cfg: Config, data: Data, device: torch.device) -> dict:
    """What a results folder fixes: all that changes a run's numbers or points, and nothing that
    cannot (--samples, which extends runs, threads, --jobs, --graph-steps, pilots with fixed lr,
    --iw-samples: each log p(x) says its K)."""
    settings = ("eval_start", "evals_per_decade", "lr", "batch_size", "hidden_size")
    settings += ("binarize", "seed") + ("lr_pilot_samples",) * (cfg.lr == "auto")
    versions = package_versions()
    return {
        **{name: getattr(cfg, name) for name in settings},
        "device": device.type,
        **fixed_constants(cfg),
        "data_sha256": data.digest,
        **{name: versions[name] for name in ("torch", "pyautoencoder")},
    }


def unreadable(what: str) -> CheckpointError:
    """The one-line refusal of a run file or checkpoint that cannot be read."""
    return CheckpointError(
        f"{what} cannot be read; pass --fresh to start over (the old files are kept aside)"
    )


def load_run_file(path: str) -> tuple[RunKey, dict]:
    """A run file's run and contents (fingerprint, header, record); CheckpointError, in one
    line, if it cannot be read or its record is not whole."""
    try:
        with open(path) as f:
            saved = json.load(f)
        record = saved["run"]
        whole = isinstance(record["evals"], list) and isinstance(record["status"], str)
        if not whole or "fingerprint" not in saved:
            raise TypeError("not a whole run file")
        return RunKey.of(record), saved
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise unreadable(path) from None


def check_settings(what: str, old: dict, new: dict) -> None:
    """Refuse, in one line naming the differing settings, a file made with other settings."""
    if old != new:
        keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
        differ = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
        raise CheckpointError(
            f"{what} was made with other settings: {differ}; pass "
            "--fresh to start over (the old files are kept aside), or use another --out-dir"
        )


# -------------------------------------------------------------------------------- results folder
def ended(record: dict, end: int) -> bool:
    """Whether a record needs no more training to `end`: diverged, or done there or beyond."""
    return record["status"] == "diverged" or (
        record["status"] == "done" and scored_to(record) >= end
    )


def environment(device: torch.device) -> dict:
    """Versions and machine facts that a reader of the results needs."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "python": platform.python_version(),
        **package_versions(),
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "cpu_count": cpu_count(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def figure_order(record: dict) -> tuple[int, int, int]:
    """Sort key of a record: methods in METHODS order, then N_z, then seed index."""
    order = METHODS.index(record["method"]) if record["method"] in METHODS else len(METHODS)
    return order, record["latent_dim"], record["seed_index"]


def take_lock(path: str, probe: bool = False) -> tuple[FileLock, str | None]:
    """Try to take the lock file at `path`: the lock, and None when taken (the file then names
    this process, unless only probing), else who holds it ("host pid N"). The OS releases it
    however its holder ends; release() on a lock not taken does nothing."""
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        with contextlib.suppress(OSError), open(path, errors="replace") as f:
            return lock, f.read(200).strip() or "another process"
        return lock, "another process"
    if not probe:
        with contextlib.suppress(OSError), open(path, "w") as f:
            f.write(f"{socket.gethostname()} pid {os.getpid()}")
    return lock, None


def lock_holder(path: str) -> str | None:
    """Who holds the lock at `path` now, or None when nobody does."""
    if not os.path.exists(path):
        return None
    lock, holder = take_lock(path, probe=True)
    lock.release()
    return holder


@dataclass(frozen=True)
class ResultsFolder:
    """OUT_DIR: a run file per run under runs/ (the source of truth), its checkpoint while it
    trains, its final model once it ends, and the combined JSON and figure rebuilt from all the
    run files. A run's files are written atomically under its lock, so processes sharing the
    folder neither train a run twice nor lose results; files of other settings are refused."""

    out_dir: str
    fingerprint: dict
    header: dict = field(default_factory=dict)  # this invocation's config and environment
    keys: tuple[RunKey, ...] = ()  # this invocation's runs, in figure order
    end: int = 0  # this invocation's last evaluation point: runs done short of it are extended
    show: Callable[[RunKey, dict], None] | None = None  # Progress.show, or a worker's message

    @property
    def runs_dir(self) -> str:
        """Where the run files and their locks live."""
        return os.path.join(self.out_dir, RUNS_FOLDER)

    @property
    def checkpoints_dir(self) -> str:
        """Where the checkpoints of unfinished runs live."""
        return os.path.join(self.out_dir, CHECKPOINTS_FOLDER)

    @property
    def models_dir(self) -> str:
        """Where the final models live."""
        return os.path.join(self.out_dir, MODELS_FOLDER)

    def path(self, key: RunKey, ext: str = ".json") -> str:
        """The run file (or with ext=".lock", the lock file) of one run."""
        return os.path.join(self.runs_dir, f"{key.stem}{ext}")

    def keep(self, run: Run) -> None:
        """Save a run as it stands: its checkpoint (its final model once it ended), then its run
        file, then its lines on the screen."""
        saved = False
        # never a checkpoint of a non-finite state: a diverging run keeps its last good one
        if run.status in ("running", "interrupted") and torch.isfinite(run.loss):
            self.save_state(run.key, run_state(run))  # before the run file: a kill loses nothing
        elif run.status in ("done", "diverged"):
            saved = self.save_model(run)
        if run.status == "diverged":
            kept = f", its last good state is kept in {self.models_dir}" if saved else ""
            print(
                f"warning: [{run.key.name}] diverged (non-finite loss or ELBO) at "
                f"{run.samples:,} samples; this run stops here{kept}",
                file=sys.stderr,
                flush=True,
            )
        self.save_run(run.record)
        if run.status in ("done", "diverged"):  # ended: its final state is in models/
            self.remove_checkpoint(run.key)
        if self.show:
            self.show(run.key, run.record)

    def state_path(self, key: RunKey, folder: str = "") -> str:
        """The checkpoint of one run (or its file in another folder, such as models/)."""
        return os.path.join(folder or self.checkpoints_dir, f"{key.stem}.pt")

    def save_state(self, key: RunKey, state: dict, folder: str = "") -> None:
        """Write a checkpoint (or, into the models folder, a final model) atomically."""
        path, payload = self.state_path(key, folder), {"fingerprint": self.fingerprint} | state
        for last_try in (False, True):  # a process whose last run ended removes the empty folder
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                write_atomic(path, lambda f: torch.save(payload, f))
                return
            except FileNotFoundError:
                if last_try:
                    raise

    def load_state(self, key: RunKey, folder: str = "") -> dict | None:
        """The run's checkpoint (or its file in `folder`), or None; CheckpointError if unusable."""
        path = self.state_path(key, folder)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            fingerprint = state["fingerprint"]
        except FileNotFoundError:  # none, or an ended run's, removed by its process just now
            return None
        except Exception as exc:  # noqa: BLE001 (truncated, foreign or corrupt: say which file)
            raise unreadable(f"checkpoint {path} ({type(exc).__name__})") from None
        check_settings(f"checkpoint {path}", fingerprint, self.fingerprint)
        return state

    def resume_state(self, key: RunKey) -> dict | None:
        """Where an unfinished run goes on from: the further of its checkpoint and the whole
        state its final model was saved with (a run done at fewer samples, extended), or None."""
        states = [s for s in (self.load_state(key), self.load_state(key, self.models_dir)) if s]
        return max(states, key=lambda state: state["samples"], default=None)

    def save_model(self, run: Run) -> bool:
        """Save a run's whole final state to models/ (a longer run goes on from it); a diverged
        run's last checkpoint instead, marked so (False if it has none)."""
        diverged = run.status == "diverged"
        if diverged:
            if (state := self.load_state(run.key)) is None:
                return False
            del state["fingerprint"]
        else:
            state = run_state(run)
        hidden_size = run.vae.decoder[0].out_features  # the first decoder layer's width
        about = {"hidden_size": hidden_size, "seed": run.record["seed"], "diverged": diverged}
        self.save_state(run.key, state | run.key._asdict() | about, self.models_dir)
        return True

    def remove_checkpoint(self, key: RunKey) -> None:
        """Drop an ended run's checkpoint, and the checkpoint folder once it is empty."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_path(key))
        with contextlib.suppress(OSError):  # not empty: other runs still have checkpoints
            os.rmdir(self.checkpoints_dir)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the folder's lock: results rebuilt and run locks taken one process at a time."""
        os.makedirs(self.runs_dir, exist_ok=True)
        with FileLock(os.path.join(self.runs_dir, ".folder.lock")):
            yield

    def lock(self, key: RunKey) -> tuple[FileLock, str | None]:
        """Try to take one run's lock: the lock, and None or who holds it instead."""
        with self.exclusive():
            return take_lock(self.path(key, ".lock"))

    def claim(self, key: RunKey) -> tuple[FileLock | None, str | None]:
        """Take a run's lock: (lock, None); (None, holder) if held; (None, None) if it ended."""
        lock, holder = self.lock(key)
        if holder:
            log(f"[{key.name}] skipped: {holder} is training it")
            return None, holder
        record = self.record_of(key)
        if ended(record, self.end):  # another process may have finished it meanwhile
            lock.release()
            log(f"[{key.name}] already {record['status']}: skipped")
            return None, None
        return lock, None

    def read(self, strict: bool = True) -> dict[RunKey, dict]:
        """Every run file's record by run; CheckpointError for an unreadable or foreign one, or,
        not `strict` (while runs train: it is refused when they have), that file left out."""
        records = {}
        for name in files_in(self.runs_dir):
            try:
                key, record = self.read_run_file(name)
            except CheckpointError:
                if strict:
                    raise
                continue
            records[key] = record
        return records

    def record_of(self, key: RunKey) -> dict:
        """One run's record as its file holds it while runs train: pending if it has no file
        or an unreadable or foreign one (refused when they have)."""
        try:
            return self.read_run_file(f"{key.stem}.json")[1]
        except CheckpointError:
            return pending_record(key)

    def read_run_file(self, name: str) -> tuple[RunKey, dict]:
        """The run and record of the run file `name`; CheckpointError if unreadable or foreign."""
        path = os.path.join(self.runs_dir, name)
        key, saved = load_run_file(path)
        record = saved["run"]
        if name != f"{key.stem}.json":  # a copy kept beside it would pass for the run
            raise CheckpointError(
                f"{path} holds the record of [{key.name}], whose file is {key.stem}.json; "
                f"move it out of {self.runs_dir}"
            )
        check_settings(path, saved["fingerprint"], self.fingerprint)
        return key, record

    def save_run(self, record: dict) -> None:
        """Write one run's file atomically, then rebuild the combined JSON (and the figure)."""
        os.makedirs(self.runs_dir, exist_ok=True)
        saved = {"fingerprint": self.fingerprint, **self.header, "run": record}
        write_json_atomic(saved, self.path(RunKey.of(record)))
        png = os.path.join(self.out_dir, FIGURE_NAME)
        stale = not os.path.exists(png) or time.time() - os.path.getmtime(png) > FIGURE_EVERY_S
        self.publish(figure=stale, strict=False)  # a file put there meanwhile cannot stop runs

    def publish(self, figure: bool = True, strict: bool = True) -> dict:
        """Rebuild the combined JSON (and the figure) from all the run files (read(strict));
        returns it. A run shows as "running" only while a process holds it, else "interrupted"."""
        with self.exclusive():
            on_disk = self.read(strict)
            records = [on_disk.pop(key, pending_record(key)) for key in self.keys]
            records += sorted(on_disk.values(), key=figure_order)  # other configurations' runs
            for i, record in enumerate(records):
                lock = self.path(RunKey.of(record), ".lock")
                if record["status"] == "running" and lock_holder(lock) is None:
                    records[i] = record | {"status": "interrupted"}
            results = self.header | {"fingerprint": self.fingerprint, "runs": records}
            write_json_atomic(results, os.path.join(self.out_dir, RESULTS_NAME))
        if figure:
            plot_results(results, os.path.join(self.out_dir, FIGURE_NAME))
        return results


def open_results(
    cfg: Config, data: Data, device: torch.device, selected: list[RunKey], fresh: bool = False
) -> tuple[ResultsFolder, dict[RunKey, int | None]]:
    """This configuration's results folder (`fresh`: old files set aside), and the `selected`
    runs left to train with the samples each has trained (None: not started, so with --lr auto
    its pilots are to come); CheckpointError for an unusable file, before any work."""
    fp, end = fingerprint(cfg, data, device), schedule_of(cfg)[-1]
    config = asdict(cfg) | fixed_constants(cfg) | {"eval_schedule": schedule_of(cfg)}  # as used
    header = {"config": config, "environment": environment(device)}  # what the results say
    folder = ResultsFolder(cfg.out_dir, fp, header, tuple(runs_of(cfg)), end)
    if fresh:
        locks = files_in(folder.runs_dir, ".lock")  # the runs' (".folder.lock" is the folder's)
        held = [lock_holder(os.path.join(folder.runs_dir, n)) for n in locks if n[0] != "."]
        if holders := [h for h in held if h]:
            raise CheckpointError(
                f"--fresh would set aside runs that {holders[0]} is training in {cfg.out_dir}; "
                "let it finish or stop it first, or use another --out-dir"
            )
        for name in (
            RESULTS_NAME,
            FIGURE_NAME,
            SAMPLES_NAME,
            RUNS_FOLDER,
            CHECKPOINTS_FOLDER,
            MODELS_FOLDER,
        ):
            move_aside(os.path.join(cfg.out_dir, name))
    on_disk, todo = folder.read(), {}
    for key in selected:
        record = on_disk.get(key, pending_record(key))
        if ended(record, end):
            log(f"[{key.name}] already {record['status']}: skipped")
        else:
            state = folder.resume_state(key)  # refused now, before any work, if unusable
            if state is None and record["evals"]:  # starting over would overwrite them
                raise CheckpointError(
                    f"[{key.name}] has evaluations to {scored_to(record):,} samples in "
                    f"{folder.path(key)} but neither its checkpoint nor its final model "
                    f"({folder.state_path(key, folder.models_dir)}) to go on from; put it back, "
                    f"or move the run file out of {folder.runs_dir} to train this run again from "
                    "its start (its seed gives the same numbers), or pass --fresh to start all "
                    "runs over (the old files are kept aside)"
                )
            if state and state["samples"] > end:
                raise CheckpointError(
                    f"[{key.name}] has trained {state['samples']:,} samples, beyond --samples "
                    f"{cfg.samples:,}; ask for at least that many, or pass --fresh to start over"
                )
            if state and state["samples"] == end and state["run"]["status"] == "done":
                folder.save_run(state["run"])  # killed between its final model and run file
                folder.remove_checkpoint(key)
                log(f"[{key.name}] already done: skipped")
                continue
            todo[key] = state["samples"] if state else None
    return folder, todo


def files_in(folder: str, ext: str = ".json") -> list[str]:
    """The names of the `ext` files in `folder`, sorted (none if it does not exist)."""
    return sorted(n for n in os.listdir(folder) if n.endswith(ext)) if os.path.isdir(folder) else []


# -------------------------------------------------------------------------------- screen
class Progress:
    """The screen: a line per evaluation of each run, printed once."""

    def __init__(self) -> None:
        self.seen: dict[RunKey, int] = {}  # evaluations printed, by run

    def show(self, key: RunKey, record: dict) -> None:
        """Print each evaluation of the run's record not printed yet."""
        evals = record["evals"]
        for e in evals[self.seen.get(key, max(0, len(evals) - 1)) :]:  # a resumed run: its last
            log(
                f"[{key.name}] samples {e['samples']:>11,}  train ELBO {e['train_elbo']:9.3f}  "
                f"test ELBO {e['test_elbo']:9.3f}  (test log p(x|z) "
                f"{e['test_log_likelihood']:9.3f}, KL {e['test_kl']:7.3f})  "
                f"{e['wall_seconds']:8.1f} s"
            )
        self.seen[key] = len(evals)


def fail(record: dict, error: str, trace: str = "") -> None:
    """Mark a run's record as failed, keeping what it measured, and say so."""
    record["status"], record["error"] = "failed", error
    if trace:
        print(trace, file=sys.stderr, end="")
    name = RunKey.of(record).name
    print(f"error: [{name}] failed: {error}; the other runs go on", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------- training here
def train_in_this_process(
    keys: list[RunKey], cfg: Config, data: Data, folder: ResultsFolder
) -> dict:
    """Train the runs of `keys` that no other process holds, all in flight here, each from its
    checkpoint if it has one; returns the others with who holds them."""
    left, runs = {}, []
    with contextlib.ExitStack() as held:  # each lock taken is released however this ends
        for key in keys:
            if STOP_REQUEST:  # the runs started so far are kept by train(), pilots and all
                break
            lock, holder = folder.claim(key)
            if holder:
                left[key] = holder
            if lock is None:
                continue
            held.callback(lock.release)
            try:
                runs.append(start_run(key, cfg, data, folder.resume_state(key)))
            except Interrupted:  # during its pilots: the runs before it are kept as above
                break
            except Exception as exc:  # noqa: BLE001 (one broken run must not cost the others)
                record = folder.record_of(key)
                fail(record, one_line(exc), traceback.format_exc())
                folder.save_run(record)
        try:
            finished = train(runs, cfg, data, folder.keep)
        except (DiskFullError, CaptureError):
            raise  # not the runs' fault: the invocation stops, the last checkpoints kept
        except Exception as exc:  # noqa: BLE001 (the runs' files say what broke)
            trace = traceback.format_exc()
            for run in (r for r in runs if r.status == "running"):
                fail(run.record, one_line(exc), trace)
                folder.save_run(run.record)
            finished = True
        if not finished or not runs:
            stop_if_requested()
    return left


def worker(
    cfg: Config, key: RunKey, folder: ResultsFolder, messages: multiprocessing.Queue, threads: int
) -> None:
    """A worker process: one run, each keeping of it (or who holds it) sent to the main process."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    if hasattr(signal, "pthread_sigmask"):  # a Ctrl-C held back since it started comes now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    try:
        torch.set_num_threads(threads)
        device = resolve_device(cfg.device)
        data = load_data(cfg.data_dir, device, cfg.binarize, cfg.seed, verify=cfg.verify_data)

        def send(key: RunKey, record: dict) -> None:
            messages.put(("run", key, copy.deepcopy(record)))

        left = train_in_this_process([key], cfg, data, dataclasses.replace(folder, show=send))
        for held, holder in left.items():
            messages.put(("held", held, holder))
    except Interrupted as exc:  # its checkpoint and run file are already written
        sys.exit(exc.code)
    except DiskFullError as exc:  # the main process stops every worker and says so
        messages.put(("disk full", key, str(exc)))
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 (the main process marks the run as failed)
        messages.put(("error", key, one_line(exc), traceback.format_exc()))
        sys.exit(1)


class Workers:
    """Runs in up to `jobs` worker processes, one per run (the CPU's way). Not a
    ProcessPoolExecutor: a worker killed outright (out of memory) breaks such a pool for every
    run; here only its own run fails. A stop request goes on to the workers and starts none."""

    def __init__(self, cfg: Config, folder: ResultsFolder, progress: Progress, jobs: int) -> None:
        self.cfg, self.folder, self.progress, self.jobs = cfg, folder, progress, jobs
        self.ctx = multiprocessing.get_context("spawn")
        self.messages = self.ctx.Queue()
        self.left: dict[RunKey, str] = {}  # runs left to other processes, with their holders
        self.disk_full = ""  # what a worker said when the disk filled

    def train(self, todo: list[RunKey]) -> dict[RunKey, str]:
        """Train the runs in `todo` until each has ended; the runs left to others."""
        running: dict[RunKey, multiprocessing.process.BaseProcess] = {}
        try:
            self.run_until_ended(list(todo), running)
        except BaseException:  # a fault here: no worker goes on training behind the error
            terminate(running.values())
            for process in running.values():
                process.join()
            raise
        if self.disk_full:
            raise DiskFullError(self.disk_full)
        stop_if_requested()
        return self.left

    def run_until_ended(
        self, waiting: list[RunKey], running: dict[RunKey, multiprocessing.process.BaseProcess]
    ) -> None:
        """Start a worker for each run of `waiting` as places free up (`running` holds those in
        flight), until all have ended; after a stop request, start none."""
        forwarded = False
        while waiting or running:
            if STOP_REQUEST and not forwarded:
                forwarded, waiting = True, []
                terminate(running.values())  # SIGTERM ends one still importing, quietly
            while waiting and len(running) < self.jobs:
                threads = threads_for(self.cfg, min(self.jobs, len(running) + len(waiting)))
                key = waiting.pop(0)
                args = (self.cfg, key, self.folder, self.messages, threads)
                process = self.ctx.Process(target=worker, args=args, name=key.stem)
                with ctrl_c_held():  # until worker() takes it
                    process.start()
                running[key] = process
            self.receive(timeout=0.2)
            for key, process in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                self.receive(timeout=0.5)  # what it sent before it ended
                while self.receive(timeout=0):
                    pass
                del running[key]
                # its files say it stopped: on a stop request, or the worker alone signalled
                stopped = STOP_REQUEST or process.exitcode >= 128
                if not stopped and key not in self.left:
                    why = f"its worker process ended with exit status {process.exitcode}"
                    self.fail_if_unfinished(key, f"{why} before the run finished")

    def fail_if_unfinished(self, key: RunKey, why: str, trace: str = "") -> None:
        """Mark the run of a worker that ended before its run did as failed, saying why."""
        lock, holder = self.folder.lock(key)
        try:
            record = self.folder.record_of(key)
            if not holder and record["status"] != "failed" and not ended(record, self.folder.end):
                fail(record, why, trace)
                self.folder.save_run(record)
        finally:
            lock.release()

    def receive(self, timeout: float) -> bool:
        """Handle one message from a worker; False if none came within `timeout`."""
        try:
            message = self.messages.get(timeout=timeout) if timeout else self.messages.get_nowait()
        except queue.Empty:
            return False
        kind, key, *rest = message
        if kind == "held":
            self.left[key] = rest[0]
        elif kind == "disk full":
            self.disk_full = rest[0]
            request_stop(signal.SIGINT, None)  # the other workers save what they can and stop
        elif kind == "error":
            self.fail_if_unfinished(key, *rest)
        else:
            self.progress.show(key, rest[0])
        return True


def terminate(processes: Iterable[multiprocessing.process.BaseProcess]) -> None:
    """Send SIGTERM to each worker process still there: it saves its run and stops."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)


# -------------------------------------------------------------------------------- time estimate
def advance_by(runs: list[Run], steps: int, advance: Advance) -> None:
    """Advance each run by `steps` steps (runs at the same count together); wait for the device."""
    for samples in sorted({run.samples for run in runs}):
        group = [run for run in runs if run.samples == samples]
        advance(group, samples + steps * group[0].batches.batch_size, math.inf)
    for run in runs:
        float(run.loss)  # waits for the device


def seconds_per_step(runs: list[Run], advance: Advance, graph_steps: int = 0) -> float:
    """Seconds per training step of all `runs` together on `advance` (CUDA graphs of
    `graph_steps` steps, or eager steps), timed after a warm-up (first-call allocations, a
    first replay); the runs are then put back."""
    saved = [run_state(run) for run in runs]
    steps = max(ESTIMATE_STEPS, 4 * graph_steps)
    try:
        advance_by(runs, graph_steps or 1, advance)
        start = time.perf_counter()
        advance_by(runs, steps, advance)
        return (time.perf_counter() - start) / steps
    finally:
        for run, state in zip(runs, saved, strict=True):
            load_run_state(run, state)


def seconds_per_evaluation(vae: VAE, data: Data, seed: int) -> float:
    """Seconds of one evaluation point (both whole sets)."""
    start = time.perf_counter()
    evaluate_point(vae, data, seed)
    return time.perf_counter() - start


def seconds_left(cfg: Config, data: Data, done: int, step_s: float, eval_s: float) -> float:
    """Seconds a run at `done` samples still needs: steps, evaluations, its closing log p(x)."""
    points = [p for p in schedule_of(cfg) if p > done]
    if not points:
        return 0.0
    test_share = len(data.test_eval) / (len(data.train_eval) + len(data.test_eval))
    closing = eval_s * cfg.iw_samples * test_share * 2 / 3  # K decodes of 2/3 a pass each
    return (points[-1] - done) / cfg.batch_size * step_s + len(points) * eval_s + closing


def estimate(cfg: Config, data: Data, todo: dict[RunKey, int | None], at_a_time: int) -> float:
    """Seconds to train the runs of `todo` on from the samples each has trained (None: not
    started, pilots to come), `at_a_time` side by side: fresh runs of each kind timed for a few
    steps (on the CPU with the threads each will get, on a GPU all together as they will train),
    one evaluation timed per thread count, the rest counted, and on the CPU the queue of runs
    replayed."""
    timing, threads_now = {"seed": 0, "lr": cfg.timing_lr}, torch.get_num_threads()
    trained = {key: samples or 0 for key, samples in todo.items()}
    pilot_steps = len(LR_CANDIDATES) * cfg.lr_pilot_samples / cfg.batch_size * (cfg.lr == "auto")
    if data.train.device.type == "cuda":
        runs = [new_run(key, timing, cfg, data) for key in todo]
        if not runs:
            return 0.0
        step_s = seconds_per_step(runs, advance_on(runs, cfg), graph_steps=cfg.graph_steps)
        eval_s = seconds_per_evaluation(runs[0].vae, data, cfg.seed)
        steps = max((schedule_of(cfg)[-1] - n) // cfg.batch_size for n in trained.values())
        evaluations = sum(seconds_left(cfg, data, n, 0.0, eval_s) for n in trained.values())
        new_runs = sum(todo[key] is None for key in todo)  # pilots train one by one, eagerly
        pilot_s = seconds_per_step(runs[:1], advance_eagerly) * pilot_steps if pilot_steps else 0
        return steps * step_s + evaluations + new_runs * (pilot_s + eval_s * bool(pilot_steps))
    now, ends, step_s, eval_s = 0.0, [], {}, {}  # ends: the end times of the runs in flight
    try:
        for i, key in enumerate(todo):
            if len(ends) == at_a_time:
                now = min(ends)
            ends = [e for e in ends if e > now]
            threads = threads_for(cfg, in_flight := min(at_a_time, len(ends) + len(todo) - i))
            crowded = max(1.0, in_flight * threads / cpu_count())  # more threads than cores
            kind = (key.method, key.latent_dim, threads)  # seeds of one setting cost the same
            torch.set_num_threads(threads)
            if kind not in step_s:
                run = new_run(key, timing, cfg, data)
                step_s[kind] = seconds_per_step([run], advance_eagerly)
                eval_s.setdefault(threads, seconds_per_evaluation(run.vae, data, cfg.seed))
            seconds = seconds_left(cfg, data, trained[key], step_s[kind], eval_s[threads])
            if seconds and todo[key] is None:  # a new run's pilots, each scored on the train set
                seconds += pilot_steps * step_s[kind] + eval_s[threads] * bool(pilot_steps)
            ends.append(now + seconds * crowded)
    finally:
        torch.set_num_threads(threads_now)
    return max(ends, default=0.0)


def fmt_duration(seconds: float) -> str:
    """A duration as people say it: '45 s', '12 min', '2 h 05 min'."""
    if (whole := round(seconds)) < 90:
        return f"{whole} s"
    minutes = (whole + 30) // 60  # halves up: 90 s is 2 min
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


# -------------------------------------------------------------------------------- command line
def parse_command_line(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The configuration and the verbs; bad values end here with a one-line error, status 2.
    One flag per Config field, each defaulting to its constant, and the verbs that say what
    to do with the configuration."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    with open(__file__, encoding="utf-8") as source:  # each flag's help: its constant's comment
        comments = dict(re.findall(r"^([A-Z][A-Z_0-9]*)\b[^\n]*?  # (.*)$", source.read(), re.M))
    for f in dataclasses.fields(Config):
        kwargs = {"help": comments.get(f.name.upper(), ""), **f.metadata}
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        p.add_argument(f"--{f.name.replace('_', '-')}", default=default, **kwargs)
    verbs = p.add_argument_group("what to do (by default: train the runs left in --out-dir)")
    verbs.add_argument(
        "--plot-only", action="store_true", help="redraw from the files in --out-dir, no training"
    )
    verbs.add_argument(
        "--list-runs", action="store_true", help="print the runs with their indices, no training"
    )
    verbs.add_argument(
        "--run-index",
        type=int,
        help="train only the run of this index in --list-runs (one task of a job array, such as "
        "Slurm's $SLURM_ARRAY_TASK_ID); every task writes the same --out-dir",
    )
    verbs.add_argument(
        "--fresh", action="store_true", help="start over: the earlier files are kept aside"
    )
    a = p.parse_args(argv)
    if a.samples < a.batch_size:
        p.error(
            f"--samples {a.samples} is less than one minibatch ({a.batch_size}); "
            f"ask for at least {a.batch_size}"
        )
    if a.lr == "auto" and a.lr_pilot_samples < a.batch_size:
        p.error(
            f"--lr-pilot-samples {a.lr_pilot_samples} is less than one minibatch ({a.batch_size})"
        )
    if a.seed >= 2**32:
        p.error(f"--seed {a.seed} is too large: give a whole number from 0 to {2**32 - 1}")
    if a.fresh and a.run_index is not None:
        p.error(
            "--fresh with --run-index would set aside the files of the other tasks; empty or "
            "move the folder once before submitting the array instead"
        )
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error(
            "--device cuda was asked for but CUDA is not available here; use --device cpu or auto"
        )
    try:  # a folder that can be created and written, unless nothing is written
        if not (a.plot_only or a.list_runs):
            os.makedirs(a.out_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=a.out_dir).close()
    except OSError as exc:
        why = f"cannot be created or written ({exc.strerror or exc}); choose another folder"
        p.error(f"--out-dir {a.out_dir!r} {why}")
    for name in () if a.fresh else (RUNS_FOLDER, CHECKPOINTS_FOLDER, MODELS_FOLDER):
        if os.path.isfile(path := os.path.join(a.out_dir, name)):  # --fresh moves it aside
            p.error(f"{path!r} is a file where the {name} folder goes; move it away first")
    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(Config)}
    for name in ("latent_dims", "methods"):
        values[name] = tuple(dict.fromkeys(values[name]))  # in order, without repeats
    cfg = Config(**values)
    if a.run_index is not None and not 0 <= a.run_index < (n := len(runs_of(cfg))):
        p.error(
            f"--run-index {a.run_index} is not a run of this configuration, which has {n} "
            f"(0 to {n - 1}); --list-runs lists them"
        )
    return cfg, a


# -------------------------------------------------------------------------------- main
def plot_only(cfg: Config) -> int:
    """--plot-only: rebuild the combined JSON and the figure from the run files in --out-dir
    (in a folder of the combined JSON alone, such as docs/, redraw the figure from it), and
    the samples picture from the models."""
    json_path, png_path = (os.path.join(cfg.out_dir, n) for n in (RESULTS_NAME, FIGURE_NAME))
    runs_dir = os.path.join(cfg.out_dir, RUNS_FOLDER)
    try:
        if names := files_in(runs_dir):
            _, first = load_run_file(os.path.join(runs_dir, names[0]))
            header = {"config": first["config"], "environment": first["environment"]}
            ResultsFolder(cfg.out_dir, first["fingerprint"], header, ()).publish()
        else:
            with open(json_path) as f:
                plot_results(json.load(f), png_path)
    except DiskFullError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except CheckpointError as exc:  # a run file it cannot draw: named, with what to do
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(
            f"error: cannot read the results in {cfg.out_dir} ({exc}); run the training "
            "first or point --out-dir at its folder",
            file=sys.stderr,
        )
        return 2
    print(f"figure: {png_path}" + f"\nresults: {json_path}" * bool(names))
    try:
        if samples_png := draw_samples(cfg):
            print(f"samples: {samples_png}")
    except (OSError, DataError) as exc:  # the samples picture needs the test digits
        print(f"notice: {SAMPLES_NAME} not redrawn: no MNIST test set ({exc})")
    return 0


def train_here_or_in_workers(
    cfg: Config, data: Data, folder: ResultsFolder, todo: dict[RunKey, int | None]
) -> tuple[dict[RunKey, str], float]:
    """Say how long it will take, then train the runs of `todo`: in worker processes side by
    side on a CPU, else all in flight here; the runs left to other processes, and the estimate."""
    at_a_time, threads_before = side_by_side(cfg, data.train.device, len(todo)), None
    if at_a_time == 1:
        threads_before = torch.get_num_threads()  # put back after: main() may be called again
        torch.set_num_threads(cfg.threads or cpu_count())
    progress = Progress()
    try:
        seconds = estimate(cfg, data, todo, at_a_time)
        n, together = len(todo), at_a_time if data.train.device.type == "cpu" else len(todo)
        work = f"{n} run{'s' * (n != 1)} x {cfg.samples:,} samples, {together} at a time"
        log(f"estimate: {work}: about {fmt_duration(seconds)} here")
        if at_a_time > 1:
            return Workers(cfg, folder, progress, at_a_time).train(list(todo)), seconds
        here = dataclasses.replace(folder, show=progress.show)
        return train_in_this_process(list(todo), cfg, data, here), seconds
    finally:
        if threads_before:
            torch.set_num_threads(threads_before)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load MNIST, train the runs left in --out-dir, print the table
    and where the files are. The exit status: 0 all done, 1 bad data, a full disk or a failed
    CUDA graph capture, 2 bad flags or files, 3 some run not done (runs that other processes
    hold aside: a shared folder's own processes finish them), 128 + signal when stopped."""
    cfg, verbs = parse_command_line(argv)
    if verbs.list_runs:
        for i, key in enumerate(runs_of(cfg)):
            print(f"{i} {key.name}")
        return 0
    if verbs.plot_only:
        return plot_only(cfg)
    selected = runs_of(cfg)  # the runs this invocation trains: all, or the one of --run-index
    if verbs.run_index is not None:
        selected = [selected[verbs.run_index]]
    device = resolve_device(cfg.device)
    try:
        data = load_data(cfg.data_dir, device, cfg.binarize, cfg.seed, verify=cfg.verify_data)
        if len(data.train) < cfg.batch_size:
            raise DataError(
                f"the training set holds {len(data.train)} images, fewer than one minibatch "
                f"({cfg.batch_size})"
            )
        folder, todo = open_results(cfg, data, device, selected, verbs.fresh)  # bad files: now
    except (DataError, CheckpointError, DiskFullError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, CheckpointError) else 1
    except KeyboardInterrupt:  # Ctrl-C while the data loads: nothing trained, nothing to keep
        print(
            "stopped by signal 2 before training began: nothing was trained; run the same "
            "command again to start",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT
    json_path, png_path = (os.path.join(cfg.out_dir, n) for n in (RESULTS_NAME, FIGURE_NAME))
    log(f"training on {device}; results: {json_path}")
    started, code, left, estimated_s = time.perf_counter(), 0, {}, 0.0
    try:
        with stop_requests():
            try:
                left, estimated_s = train_here_or_in_workers(cfg, data, folder, todo)
            except Interrupted as exc:
                code = exc.code
            results = folder.publish()  # still under stop_requests: Ctrl-C cannot break it
            samples_png = draw_samples(cfg)
    except (CheckpointError, DiskFullError, CaptureError) as exc:  # the last checkpoints kept
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, CheckpointError) else 1
    ours = [r for r in results["runs"] if RunKey.of(r) in selected]
    if not code and any(r["status"] != "done" for r in ours if RunKey.of(r) not in left):
        code = 3
    print(results_table(results))
    took = time.perf_counter() - started
    estimated = f" (estimated {fmt_duration(estimated_s)})" if estimated_s else ""  # not if stopped
    print(f"wall time: {fmt_duration(took)}{estimated}")
    print(
        f"figure: {png_path}\nresults: {json_path}"
        + f"\nsamples: {samples_png}" * bool(samples_png)
    )
    for key, holder in left.items():
        print(f"left to another process: [{key.name}], held by {holder}")
    if code >= 128:
        print(
            f"stopped by signal {code - 128}: checkpoints are in {folder.checkpoints_dir}; "
            "run the same command again to continue",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
