#!/usr/bin/env python
"""Reproduce Figure 2 of Kingma & Welling, "Auto-Encoding Variational Bayes" (2013).

Trains the paper's MNIST variational autoencoders (N_z = 3, 5, 10, 20, 200) with AEVB and with
the wake-sleep baseline, tracks the average variational lower bound (ELBO) per datapoint on the
training and test sets against the number of training samples seen, and draws the figure the
way the paper does.

    python reproduce_fig2.py                    # train (MNIST is downloaded to ./data), see PNG
    python reproduce_fig2.py --help             # every constant below as a flag

Read from the top to the MACHINERY banner to learn the experiment: constants, data, the
paper's networks, the ELBO, the AEVB and wake-sleep steps, the training loop, the figure.
Below the banner is what makes long runs safe and fast: checkpoints, resume, worker
processes, the benchmark and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import platform
import queue
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any, NamedTuple

import matplotlib
import numpy as np
import torch
import torchvision
from matplotlib.figure import Figure
from pyautoencoder.variational import VAE
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits
from tqdm import tqdm

# ================================================================================ constants
LATENT_DIMS: tuple[int, ...] = (3, 5, 10, 20, 200)  # latent sizes N_z, one panel each
METHODS: tuple[str, ...] = ("aevb", "wake-sleep")  # training algorithms compared in each panel
HIDDEN_SIZE: int = 500  # hidden units of encoder and decoder (appendix C, MNIST)
BATCH_SIZE: int = 100  # minibatch size M
LEARNING_RATE: float | str = 0.02  # Adagrad global step size, or "auto": pick one by pilot runs
LR_CANDIDATES: tuple[float, ...] = (0.01, 0.02, 0.1)  # step sizes the paper chose from
LR_PILOT_SAMPLES: int = 100_000  # training samples of each pilot run when LEARNING_RATE is "auto"
MC_SAMPLES: int = 1  # z samples per datapoint, L
WEIGHT_DECAY: float = 1 / 60_000  # N(0, I) prior on parameters, per datapoint: 1 / N_train
INIT_STD: float = 0.01  # standard deviation of the N(0, .) initialisation of every parameter
TARGET_TRAIN_SAMPLES: int = 10_000_000  # training samples per (method, N_z) run
EVAL_START_SAMPLES: int = 100_000  # first evaluation point (the paper's axis starts at 1e5)
EVALS_PER_DECADE: int = 10  # log-spaced evaluation points per factor of ten of samples
EVAL_BATCH_SIZE: int = 5_000  # images per forward pass when scoring the ELBO
USE_STOCHASTIC_BINARIZATION: bool = False  # train on Bernoulli samples of the grey levels
DATA_DIR: str = "./data"  # folder that holds MNIST/raw/ (torchvision layout)
VERIFY_DATA: bool = True  # check the files against the standard MNIST SHA-256 digests
OUT_DIR: str = "."  # folder for the PNG and the JSON results
SEED: int = 1926  # master seed; each (method, N_z) run derives its own from it
SEEDS: int = 1  # seeds per (method, N_z); the figure draws their median and range
IW_SAMPLES: int = 100  # K, importance samples per test image of the final log p(x) estimate
IW_DECODES_PER_PASS: int = 50_000  # decoder passes per batch of the log p(x) estimate (memory)
DEVICE: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu" or "cuda"
THREADS: int = 0  # CPU threads per run; 0 means cores / JOBS
JOBS: int = 2  # runs trained side by side in worker processes (2 x 1 thread: fastest on 2 cores)
COMPILE: str = "auto"  # torch.compile the training step: "auto", "on" or "off"
COMPILE_MIN_SAMPLES: int = (
    1_000_000  # "auto" compiles runs of this many samples on CUDA or 2+ threads
)
ESTIMATE_STEPS: int = 20  # timed training steps per setting for the wall-time estimate
COMPILE_SECONDS: float = 20.0  # what compiling one run's step costs, for the estimate
BENCHMARK_STEPS: int = 100  # training steps per timing window of --benchmark
BENCHMARK_WINDOWS: int = 5  # timing windows of --benchmark (after one warm-up window)

FIGURE_NAME = "vae_mnist_fig2_repro.png"  # figure written to OUT_DIR
FIGURE_EVERY_S = 60.0  # while training, the figure is redrawn at most this often (and at the end)
RESULTS_NAME = "vae_mnist_fig2_repro.json"  # results written to OUT_DIR
RUNS_FOLDER = "runs"  # under OUT_DIR: one JSON and one lock file per (method, N_z) run
MODELS_FOLDER = "models"  # under OUT_DIR: the final model of every finished run
SAMPLES_NAME = "vae_mnist_samples.png"  # samples and reconstructions of the final models
SHOW_DIGITS = 10  # digits per row of the samples picture
PAPER_YLIM = (-150.0, -95.0)  # the paper's vertical range; lines that leave it are clipped
PAPER_XLIM = (1e5, 1e8)  # the paper's horizontal range (training samples, log scale)
METHOD_STYLE = {"aevb": ("AEVB", "tab:red"), "wake-sleep": ("WS", "tab:blue")}  # legend, colour


def positive(kind: type) -> Callable[[str], Any]:
    """A command-line value parser for a positive int or float."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def sample_count(text: str) -> int:
    """A command-line value parser for a sample count written as 1000000 or 1e6."""
    try:
        value = float(text)
    except ValueError:
        msg = f"{text!r} is not a number of samples (write 1e6 or 1000000)"
        raise argparse.ArgumentTypeError(msg) from None
    if not math.isfinite(value) or value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number of samples")
    return int(value)


def learning_rate(text: str) -> float | str:
    """A command-line value parser for Adagrad's step size: a positive number or "auto"."""
    return "auto" if text == "auto" else positive(float)(text)


def flag(default: Any, help_text: str, **argparse_kwargs: Any) -> Any:
    """A Config field: its default is a constant, its metadata the arguments of its flag."""
    return field(default=default, metadata={"help": help_text, **argparse_kwargs})


@dataclass(frozen=True)
class Config:
    """Everything that defines an invocation; each field is the flag --field-name."""

    latent_dims: tuple[int, ...] = flag(
        LATENT_DIMS, "latent sizes, one panel each", nargs="+", type=positive(int), metavar="N_Z"
    )
    methods: tuple[str, ...] = flag(METHODS, "training algorithms", nargs="+", choices=METHODS)
    samples: int = flag(
        TARGET_TRAIN_SAMPLES, "training samples per run (1e6 or 1000000)", type=sample_count
    )
    eval_start: int = flag(
        EVAL_START_SAMPLES, "first evaluation point, in samples", type=sample_count
    )
    evals_per_decade: int = flag(
        EVALS_PER_DECADE, "evaluation points per decade of samples", type=positive(int)
    )
    lr: float | str = flag(
        LEARNING_RATE,
        f"Adagrad step size, or 'auto' to pick from {list(LR_CANDIDATES)}",
        type=learning_rate,
    )
    lr_pilot_samples: int = flag(
        LR_PILOT_SAMPLES, "samples per pilot run with --lr auto", type=sample_count
    )
    batch_size: int = flag(BATCH_SIZE, "minibatch size", type=positive(int))
    hidden_size: int = flag(HIDDEN_SIZE, "hidden units of encoder and decoder", type=positive(int))
    binarize: bool = flag(USE_STOCHASTIC_BINARIZATION, "stochastic binarization of the images")
    seed: int = flag(SEED, "master random seed", type=int)
    seeds: int = flag(
        SEEDS, "seeds per (method, N_z): the figure draws median and range", type=positive(int)
    )
    iw_samples: int = flag(
        IW_SAMPLES,
        "K of the importance-weighted log p(x) estimate of a finished run",
        type=positive(int),
    )
    device: str = flag(DEVICE, "where to train", choices=("auto", "cpu", "cuda"))
    threads: int = flag(THREADS, "CPU threads per run (0: cores / jobs)", type=int)
    jobs: int = flag(JOBS, "runs trained side by side in worker processes", type=positive(int))
    compile: str = flag(
        COMPILE,
        f"torch.compile the training step (auto: runs of {COMPILE_MIN_SAMPLES:,}+ samples "
        "on CUDA or with 2+ threads)",
        choices=("auto", "on", "off"),
    )
    data_dir: str = flag(DATA_DIR, "folder that holds MNIST/raw/")
    verify_data: bool = flag(VERIFY_DATA, "check the files against the standard MNIST checksums")
    out_dir: str = flag(OUT_DIR, "folder for the PNG and JSON")
    plot_only: bool = flag(
        False, "redraw the PNG from the JSON in --out-dir, no training", action="store_true"
    )
    fresh: bool = flag(
        False, "start over: keep the earlier results and checkpoints aside", action="store_true"
    )
    benchmark: bool = flag(
        False, "print training and evaluation speed for N_z = 20, no training", action="store_true"
    )
    benchmark_json: str = flag("", "also write the --benchmark numbers as JSON to this file")
    benchmark_steps: int = flag(
        BENCHMARK_STEPS, "steps per timing window of --benchmark", type=positive(int)
    )


# ================================================================================ data
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST_SHA256 = {  # of the decoded uint8 images and labels, from ../shared/mnist/README.md
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
    """The three image sets a run needs, each one float32 tensor [N, 1, 28, 28] on the device."""

    train: torch.Tensor  # what training draws minibatches from (grey levels)
    train_eval: torch.Tensor  # the training set as scored by the evaluator
    test_eval: torch.Tensor  # the test set as scored by the evaluator
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
        train_eval = torch.bernoulli(train, generator=fixed)
        test_eval = torch.bernoulli(test, generator=fixed)
        return Data(train.to(device), train_eval.to(device), test_eval.to(device), digest)
    train = train.to(device)
    return Data(train, train, test.to(device), digest)


def load_split(data_dir: str, split: str, verify: bool = True) -> torch.Tensor:
    """One MNIST split as a CPU float32 tensor [N, 1, 28, 28] in [0, 1]."""
    folder = raw_folder(data_dir)
    for name in MNIST_FILES[split]:
        check_idx_file(os.path.join(folder, name))
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
    return images.unsqueeze(1).to(torch.float32).div_(255)


class Batches:
    """Minibatches of a resident image tensor, from a fresh random permutation each epoch."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        self.images, self.batch_size = images, batch_size
        self.per_epoch = len(images) // batch_size  # the incomplete last batch is dropped
        self.order: torch.Tensor | None = None
        self.pos = self.per_epoch

    def next(self) -> torch.Tensor:
        """The next minibatch, [batch_size, 1, 28, 28]."""
        if self.pos == self.per_epoch:
            perm = torch.randperm(len(self.images), device=self.images.device)
            self.order = perm[: self.per_epoch * self.batch_size].view(self.per_epoch, -1)
            self.pos = 0
        assert self.order is not None
        self.pos += 1
        return self.images[self.order[self.pos - 1]]

    def state(self) -> dict:
        """The current epoch's permutation and the position in it."""
        return {"order": None if self.order is None else self.order.cpu(), "pos": self.pos}

    def load_state(self, state: dict) -> None:
        """Continue from a state() taken earlier."""
        self.order = None if state["order"] is None else state["order"].to(self.images.device)
        self.pos = state["pos"]


# ================================================================================ model
def build_vae(latent_dim: int, hidden_size: int = HIDDEN_SIZE, init_std: float = INIT_STD) -> VAE:
    """The paper's MLP VAE (appendix C) on the CPU, every parameter drawn from N(0, init_std^2)."""
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
@torch.inference_mode()
def evaluate_elbo(
    vae: VAE, images: torch.Tensor, seed: int = SEED, batch_size: int = EVAL_BATCH_SIZE
) -> dict[str, float]:
    """Average per-datapoint ELBO (nats) over `images`, with its log-likelihood and KL parts.

    One z sample per datapoint (MC_SAMPLES), drawn from a generator seeded with `seed`, so
    that every evaluation point scores its model with the same noise and the training random
    stream is left untouched.
    """
    device = images.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for x in images.split(batch_size):
            d = vae.compute_loss(x, vae(x, S=MC_SAMPLES), likelihood="bernoulli").diagnostics
            parts = torch.stack([d["elbo"], d["log_likelihood"], d["kl_divergence"]])
            totals += parts.double() * len(x)
    elbo, ll, kl = (totals / len(images)).tolist()
    return {"elbo": elbo, "log_likelihood": ll, "kl": kl}


@torch.inference_mode()
def estimate_log_px(vae: VAE, images: torch.Tensor, k: int = IW_SAMPLES, seed: int = SEED) -> float:
    """Average log p(x) over `images` by importance weighting (Burda, Grosse & Salakhutdinov
    2015): log of the mean over K draws z ~ q(z|x) of p(x|z) p(z) / q(z|x), per image.

    A lower bound that tightens as K grows (K = 1 gives the ELBO in expectation). Log-weights
    are summed with logsumexp in float64; the noise comes from a generator seeded with `seed`.
    """
    device = images.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    per_pass = max(1, IW_DECODES_PER_PASS // k)  # images per pass: K decodes of each
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for x in images.split(per_pass):
            x = x.flatten(1)
            mu, log_var = vae.sampling_layer.get_params(vae.encoder(x))
            z = mu + torch.exp(0.5 * log_var) * torch.randn(k, *mu.shape, device=device)
            logits = vae.decoder(z.flatten(0, 1)).view(k, len(x), -1)
            bce = binary_cross_entropy_with_logits(logits, x.expand(k, -1, -1), reduction="none")
            log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
            log_w = log_prior - bce.sum(-1) - gaussian_log_density(z, mu, log_var)  # [K, B]
            total += (torch.logsumexp(log_w.double(), dim=0) - math.log(k)).sum()
    return float(total / len(images))


def evaluate_point(vae: VAE, data: Data, seed: int) -> dict[str, float]:
    """The ELBO and its parts on the whole training and test sets, as one evaluation record."""
    train, test = (
        evaluate_elbo(vae, data.train_eval, seed),
        evaluate_elbo(vae, data.test_eval, seed),
    )
    return {
        "train_elbo": train["elbo"],
        "test_elbo": test["elbo"],
        "train_log_likelihood": train["log_likelihood"],
        "train_kl": train["kl"],
        "test_log_likelihood": test["log_likelihood"],
        "test_kl": test["kl"],
    }


# ================================================================================ training
def make_optimizers(vae: VAE, method: str, lr: float, fused: bool) -> list[torch.optim.Adagrad]:
    """Adagrad with the prior's weight decay: one for AEVB, decoder and encoder apart for WS."""
    if method == "aevb":
        groups = [list(vae.parameters())]
    else:
        groups = [list(vae.decoder.parameters()), encoder_parameters(vae)]
    kwargs = {"fused": True} if fused else {"foreach": True}
    return [torch.optim.Adagrad(g, lr=lr, weight_decay=WEIGHT_DECAY, **kwargs) for g in groups]


def reparameterise(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I): MC_SAMPLES draws per datapoint, [B * L, N_z]."""
    if MC_SAMPLES == 1:
        return mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
    eps = torch.randn(len(mu), MC_SAMPLES, mu.shape[-1], device=mu.device, dtype=mu.dtype)
    return (mu.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * eps).flatten(0, 1)


def neg_log_px_given_z(vae: VAE, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) of the Bernoulli decoder, summed over pixels and datapoints, averaged over
    the L draws of z."""
    if MC_SAMPLES == 1:
        return binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="sum")
    x = x.repeat_interleave(MC_SAMPLES, dim=0)
    return binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="sum") / MC_SAMPLES


def kl_to_prior(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) in closed form (the paper's appendix B), summed over datapoints."""
    return 0.5 * (log_var.exp() + mu.pow(2) - 1 - log_var).sum()


def aevb_loss(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """-ELBO per datapoint of minibatch x by the SGVB estimator B: closed-form KL, L z draws.

    The same objective as pyautoencoder's `VAE.compute_loss` (a test holds them equal), taken
    through the model's own encoder, Gaussian head and decoder without its generic sample
    dimension and diagnostics, which cost time at every step.
    """
    mu, log_var = vae.sampling_layer.get_params(vae.encoder(x))
    z = reparameterise(mu, log_var)
    return (neg_log_px_given_z(vae, z, x) + kl_to_prior(mu, log_var)) / len(x)


def aevb_step(vae: VAE, opts: list[torch.optim.Adagrad], x: torch.Tensor) -> torch.Tensor:
    """One AEVB step on minibatch x: Adagrad on encoder and decoder together; returns -ELBO."""
    (opt,) = opts
    opt.zero_grad(set_to_none=True)
    loss = aevb_loss(vae, x)
    loss.backward()
    opt.step()
    return loss.detach()


def wake_step(vae: VAE, opt: torch.optim.Adagrad, x: torch.Tensor) -> torch.Tensor:
    """Wake phase: z ~ q(z|x) held fixed, the decoder climbs log p(x|z); returns -log p(x|z)."""
    with torch.no_grad():
        z = reparameterise(*vae.sampling_layer.get_params(vae.encoder(x)))
    loss = neg_log_px_given_z(vae, z, x) / len(x)  # per datapoint
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def sleep_step(vae: VAE, opt: torch.optim.Adagrad, batch_size: int) -> torch.Tensor:
    """Sleep phase: a fantasy (z, x) from the generative model, the encoder climbs log q(z|x)."""
    with torch.no_grad():
        z = torch.randn(batch_size, vae.latent_dim, device=next(vae.parameters()).device)
        x = torch.bernoulli(torch.sigmoid(vae.decoder(z)))
    mu, log_var = vae.sampling_layer.get_params(vae.encoder(x))
    loss = -gaussian_log_density(z, mu, log_var).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(log_var))) summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (z - mu).pow(2) * torch.exp(-log_var)).sum(-1)


def wake_sleep_step(vae: VAE, opts: list[torch.optim.Adagrad], x: torch.Tensor) -> torch.Tensor:
    """One wake-sleep step on minibatch x (decoder, then encoder); returns the summed losses."""
    dec_opt, enc_opt = opts
    return wake_step(vae, dec_opt, x) + sleep_step(vae, enc_opt, len(x))


Step = Callable[[torch.Tensor], torch.Tensor]  # one training step on a minibatch; returns its loss
STEPS: dict[str, Callable[[VAE, list[torch.optim.Adagrad], torch.Tensor], torch.Tensor]] = {
    "aevb": aevb_step,
    "wake-sleep": wake_sleep_step,
}


def make_step(
    method: str, vae: VAE, lr: float, device: torch.device, compile_step: bool
) -> tuple[Step, list[torch.optim.Adagrad]]:
    """The training step for `method` (compiled when asked) and the optimisers it updates."""
    opts = make_optimizers(vae, method, lr, fused=device.type == "cpu" and not compile_step)
    step_fn = STEPS[method]

    def step(x: torch.Tensor) -> torch.Tensor:
        return step_fn(vae, opts, x)

    return (compiled_step(step, vae, opts) if compile_step else step), opts


def eval_schedule(
    target: int,
    batch_size: int = BATCH_SIZE,
    start: int = EVAL_START_SAMPLES,
    per_decade: int = EVALS_PER_DECADE,
) -> list[int]:
    """Sample counts to evaluate at: 10^(k / per_decade) in whole minibatches, then the target."""
    end = max(batch_size, round(target / batch_size) * batch_size)
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


def setting_seed(seed: int, method: str, latent_dim: int, seed_index: int = 0) -> int:
    """A run's own seed, derived from (seed, method, N_z, seed index) so that no run depends on
    another; the first seed of a setting keeps the derivation of runs made before --seeds."""
    text = f"{seed}/{method}/{latent_dim}" + f"/{seed_index}" * bool(seed_index)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def seed_everything(seed: int) -> None:
    """Seed torch's generators (CPU and every CUDA device): training draws all its noise there."""
    torch.manual_seed(seed)


def train_until(
    target: int, samples: int, step: Step, batches: Batches, binarize: bool
) -> tuple[int, torch.Tensor]:
    """Draw minibatches and step until `target` samples (or a stop request); (samples, loss)."""
    loss = torch.zeros(())
    while samples < target and not STOP_REQUEST:
        x = batches.next()
        loss = step(torch.bernoulli(x) if binarize else x)
        samples += batches.batch_size
    return samples, loss


def train_run(
    key: RunKey,
    cfg: Config,
    data: Data,
    device: torch.device,
    on_eval: Callable[[dict], None],
    progress: bool = True,
    store: Checkpoints | None = None,
    threads: int | None = None,
) -> dict:
    """Train one run (method, N_z, seed), evaluating it along the schedule; returns its record.

    `on_eval` receives the record after every evaluation, so the caller can save it at once.
    With a checkpoint store the run continues from its checkpoint if there is one, writes one
    at every evaluation and on a stop request, and drops it when the run is done. `threads`:
    CPU threads for this run (None: as set now).
    """
    keeper = RunKeeper(key, cfg, device, store, progress, threads)
    run = keeper.begin(keeper.record or new_run_record(key, cfg, data, device))
    seed_everything(run["seed"])
    vae = build_vae(key.latent_dim, cfg.hidden_size).to(device)
    step, opts = make_step(key.method, vae, run["lr"], device, run["compiled"])
    batches = Batches(data.train, cfg.batch_size)
    samples = keeper.restore(vae, opts, batches)  # 0, or where its checkpoint stopped
    for point in [p for p in schedule_of(cfg) if p > samples]:
        samples, loss = train_until(point, samples, step, batches, cfg.binarize)
        if samples == point:  # an evaluation point: score the model on both whole sets
            e = {"samples": samples, **evaluate_point(vae, data, cfg.seed)}
            if not all(math.isfinite(v) for v in [*e.values(), float(loss)]):
                run["status"], run["diverged_at"] = "diverged", samples
                keeper.warn_diverged(samples)
                keeper.keep_model(run, samples)  # its last good state, marked as diverged
                break
            run["evals"].append(e | {"wall_seconds": keeper.elapsed()})
            keeper.show(run["evals"][-1])
        if STOP_REQUEST:
            run["status"] = "interrupted"
        keeper.save(run, samples)  # before the JSON: a kill in between loses nothing
        on_eval(run)
        if STOP_REQUEST:
            keeper.close()
            raise Interrupted(128 + STOP_REQUEST[0])
    else:  # trained to the end: estimate log p(x), keep the model
        k = cfg.iw_samples
        run["log_px"] = {"test": estimate_log_px(vae, data.test_eval, k, cfg.seed), "k": k}
        run["status"] = "done"
        keeper.keep_model(run, samples, vae)
        keeper.remove()
    keeper.close()
    on_eval(run)
    return run


def new_run_record(key: RunKey, cfg: Config, data: Data, device: torch.device) -> dict:
    """A fresh run's record: its derived seed and its step size (chosen by pilots if "auto")."""
    run = pending_run(key) | {"seed": setting_seed(cfg.seed, *key), "status": "running"}
    if cfg.lr == "auto":
        run["lr"], run["lr_pilot_scores"] = pick_lr(key, cfg, data, device)
    else:
        run["lr"] = float(cfg.lr)
    return run


def pick_lr(
    key: RunKey, cfg: Config, data: Data, device: torch.device
) -> tuple[float, dict[str, float | None]]:
    """The paper's step-size choice: the candidate whose short pilot scores the best train ELBO."""
    scores: dict[str, float | None] = {}  # None: the pilot diverged (scored worst)
    for lr in LR_CANDIDATES:
        seed_everything(setting_seed(cfg.seed, *key))
        vae = build_vae(key.latent_dim, cfg.hidden_size).to(device)
        step, _ = make_step(key.method, vae, lr, device, compile_step=False)
        pilot = eval_schedule(cfg.lr_pilot_samples, cfg.batch_size, cfg.lr_pilot_samples)[-1]
        _, loss = train_until(pilot, 0, step, Batches(data.train, cfg.batch_size), cfg.binarize)
        if STOP_REQUEST:
            raise Interrupted(128 + STOP_REQUEST[0])
        finite = bool(torch.isfinite(loss))
        score = evaluate_elbo(vae, data.train_eval, cfg.seed)["elbo"] if finite else math.nan
        scores[repr(lr)] = score if math.isfinite(score) else None
        log(f"[{key.name}] pilot lr {lr}: train ELBO {score:.3f} after {pilot:,} samples")
    best = max(LR_CANDIDATES, key=lambda lr: -math.inf if (s := scores[repr(lr)]) is None else s)
    log(f"[{key.name}] chose lr {best}")
    return best, scores


# ================================================================================ figure
def plot_results(results: dict, path: str) -> Figure:
    """Draw Figure 2 in the paper's frame: one panel per N_z, train solid, test dashed; with
    several seeds the median is the line and the range a light band. Lines leave the frame
    clipped at its edge, as in the paper; the JSON keeps the full range."""
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
    fig.savefig(path, dpi=120)
    return fig


def seed_band(runs: list[dict], field: str) -> tuple[list[int], list, list, list]:
    """Samples, minimum, median and maximum of `field` over runs of several seeds, at the
    evaluation points that all of them reached."""
    reached = [{e["samples"]: e[field] for e in r["evals"]} for r in runs]
    xs = sorted(set.intersection(*(set(values) for values in reached)))
    columns = [[values[x] for values in reached] for x in xs]
    return (
        xs,
        [min(c) for c in columns],
        [statistics.median(c) for c in columns],
        [max(c) for c in columns],
    )


def results_table(results: dict) -> str:
    """The final train and test ELBO and the test log p(x) of every (method, N_z), as Markdown;
    with several seeds, the median and (in brackets) the range."""
    lines = [
        "| method | N_z | seeds | samples | train ELBO | test ELBO | test log p(x) | gap "
        "| status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["method"], r["latent_dim"]), []).append(r)
    for (method, latent_dim), runs in groups.items():
        last = [r["evals"][-1] for r in runs if r["evals"]]
        iw = [(r["log_px"]["test"], r["evals"][-1]["test_elbo"]) for r in runs if r.get("log_px")]
        cells = [
            spread([e["samples"] for e in last], "{:,.0f}"),
            spread([e["train_elbo"] for e in last]),
            spread([e["test_elbo"] for e in last]),
            spread([log_px for log_px, _ in iw]),
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
def plot_samples(models: dict[RunKey, dict], digits: torch.Tensor, path: str, seed: int) -> Figure:
    """What the final models learned: for each N_z, a row of decoder means for z ~ N(0, I)
    (the same z for every model of that N_z) and a row of reconstructions (decoder means at
    the posterior mean) of fixed test digits, shown once on top; methods side by side."""
    dims = sorted({key.latent_dim for key in models})
    methods = [m for m in METHODS if any(key.method == m for key in models)]
    fig = Figure(figsize=(4.4 * max(1, len(methods)), 0.62 * (1 + 2 * len(dims)) + 0.2))
    grid = fig.add_gridspec(1 + 2 * len(dims), max(1, len(methods)))
    digits = digits[:SHOW_DIGITS].cpu()
    show_strip(fig.add_subplot(grid[0, :]), digits, "test digits")
    for row, nz in enumerate(dims):
        z = torch.randn(SHOW_DIGITS, nz, generator=torch.Generator().manual_seed(seed + nz))
        for col, method in enumerate(methods):
            top, bottom = (
                fig.add_subplot(grid[1 + 2 * row, col]),
                fig.add_subplot(grid[2 + 2 * row, col]),
            )
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
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def show_strip(ax: Any, images: torch.Tensor, title: str) -> None:
    """A row of 28 x 28 images side by side, titled."""
    ax.imshow(
        torch.cat(list(images.reshape(-1, 28, 28)), dim=1).numpy(), cmap="gray", vmin=0, vmax=1
    )
    ax.set_title(title, fontsize=7, loc="left", pad=2)
    ax.axis("off")


# ################################################################################################
# MACHINERY: everything below serves long runs (stopping and resuming, checkpoints, worker
# processes, the compiled step, the benchmark, the command line). The experiment is above.
# ################################################################################################


def log(message: str) -> None:
    """Print one line of ours at once, without breaking the progress bars."""
    tqdm.write(message)
    sys.stdout.flush()


# -------------------------------------------------------------------------------- stop requests
STOP_REQUEST: list[int] = []  # signals received; training stops at the next step boundary


def request_stop(signum: int, frame: object) -> None:
    """Signal handler: stop after the current step (further signals change nothing)."""
    if not STOP_REQUEST:
        STOP_REQUEST.append(signum)


class Interrupted(BaseException):
    """Training stopped on request (Ctrl-C or SIGTERM); `code` is the exit status, 128 + signal."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


# -------------------------------------------------------------------------------- data files
def raw_folder(data_dir: str) -> str:
    """The folder where torchvision keeps the uncompressed MNIST files."""
    return os.path.join(data_dir, "MNIST", "raw")


def check_idx_file(path: str) -> None:
    """Raise DataError unless `path` is a complete IDX file of unsigned bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
        ndim = head[3] if len(head) == 4 else 0
        dims_raw = f.read(4 * ndim)
    if (
        len(head) < 4
        or head[:3] != b"\x00\x00\x08"
        or not 1 <= ndim <= 3
        or len(dims_raw) < 4 * ndim
    ):
        raise DataError(
            f"{path} is not an IDX file of unsigned bytes (bad header): "
            "replace it with the original MNIST file"
        )
    dims = struct.unpack(f">{ndim}I", dims_raw)
    expected, actual = 4 + 4 * ndim + math.prod(dims), os.path.getsize(path)
    if actual != expected:
        raise DataError(
            f"{path} is truncated or malformed: {actual} bytes where its header {list(dims)} "
            f"needs {expected}; replace it with the original MNIST file"
        )


def ensure_mnist(data_dir: str, download: bool = True) -> None:
    """Make sure the four raw MNIST files are under `data_dir`, downloading them if allowed."""
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
            quiet = io.StringIO()
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                torchvision.datasets.MNIST(data_dir, train=True, download=True)
            return
        except Exception as exc:  # noqa: BLE001 (any download failure becomes one readable line)
            first = str(exc).strip().splitlines()
            reason = f"the download failed ({type(exc).__name__}: {first[-1] if first else exc})"
        finally:
            socket.setdefaulttimeout(old_timeout)
    raise DataError(
        f"MNIST not found: {os.path.abspath(folder)} lacks {', '.join(missing)} and {reason}. "
        f"Put the four files {', '.join(names)} in MNIST/raw/ under a folder and pass it "
        "with --data-dir"
    )


def sha256_of(t: torch.Tensor) -> str:
    """SHA-256 of a uint8 tensor's bytes, as ../shared/mnist/README.md lists them."""
    return hashlib.sha256(t.to(torch.uint8).numpy().tobytes()).hexdigest()


def files_digest(data_dir: str) -> str:
    """SHA-256 of the four raw MNIST files, in a fixed order."""
    h = hashlib.sha256()
    for name in (n for pair in MNIST_FILES.values() for n in pair):
        with open(os.path.join(raw_folder(data_dir), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# -------------------------------------------------------------------------------- compiled step
def compiled_step(step: Step, vae: VAE, opts: list[torch.optim.Adagrad]) -> Step:
    """`step` under torch.compile; if compiling fails, a one-line notice and the eager step."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True  # eager's random numbers, from the same generator
    compiled = torch.compile(step)
    state: dict[str, Step] = {}

    def first_call(x: torch.Tensor) -> torch.Tensor:
        params = [p.detach().clone() for p in vae.parameters()]
        opt_states = [copy.deepcopy(o.state_dict()) for o in opts]
        rng = rng_state(x.device)
        try:
            out = compiled(x)
            state["fn"] = compiled
            return out
        except Exception as exc:  # noqa: BLE001 (a compiler problem must never end the run)
            first_line = (str(exc).strip().splitlines() or [""])[0]
            log(
                f"notice: torch.compile failed ({type(exc).__name__}: {first_line}); "
                "training eagerly instead"
            )
            with torch.no_grad():  # undo whatever part of the step ran
                for p, saved in zip(vae.parameters(), params, strict=True):
                    p.copy_(saved)
                    p.grad = None
            for o, saved in zip(opts, opt_states, strict=True):
                o.load_state_dict(saved)
            set_rng_state(rng, x.device)
            state["fn"] = step
            return step(x)

    state["fn"] = first_call
    return lambda x: state["fn"](x)


def use_compile(cfg: Config, threads: int, device: torch.device) -> bool:
    """Whether a run's step is compiled: "auto" compiles long runs on CUDA or with 2+ threads.

    With one CPU thread, compiling was measured to gain nothing on the 2-core machines the
    README reports (and about 10 % with two), while costing about 20 s per run.
    """
    if cfg.compile != "auto":
        return cfg.compile == "on"
    return cfg.samples >= COMPILE_MIN_SAMPLES and (device.type == "cuda" or threads > 1)


# -------------------------------------------------------------------------------- checkpoints
def rng_state(device: torch.device) -> dict:
    """Torch's CPU (and CUDA, when used) generator states: all the noise training draws."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what rng_state() took."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_atomic(path: str, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write a file through `write` so that a reader, or a kill, finds the old file or the new one.

    Hand-written because the standard library has no atomic replace with fsync.
    """
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a plainly written file, not 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(obj: dict, path: str) -> None:
    """Write `obj` as JSON to `path`, atomically."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, worded as one line for the user."""


@dataclass(frozen=True)
class Checkpoints:
    """One checkpoint file per (method, N_z) run in OUT_DIR/checkpoints/, tied to a fingerprint."""

    folder: str
    fingerprint: dict

    def path(self, key: RunKey) -> str:
        """Where the checkpoint of one run lives."""
        return os.path.join(self.folder, f"{key.stem}.pt")

    def save(self, key: RunKey, state: dict) -> None:
        """Write a checkpoint atomically."""
        os.makedirs(self.folder, exist_ok=True)
        payload = {"fingerprint": self.fingerprint} | state
        write_atomic(self.path(key), lambda f: torch.save(payload, f))

    def load(self, key: RunKey) -> dict | None:
        """The run's checkpoint, or None; CheckpointError if unreadable or from other settings."""
        path = self.path(key)
        if not os.path.exists(path):
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            fingerprint = state["fingerprint"]
        except Exception as exc:  # noqa: BLE001 (truncated, foreign or corrupt: say which file)
            raise unreadable(f"checkpoint {path} ({type(exc).__name__})") from None
        check_settings(f"checkpoint {path}", fingerprint, self.fingerprint)
        return state

    @property
    def models(self) -> str:
        """Where the final models go: OUT_DIR/models/."""
        return os.path.join(os.path.dirname(os.path.abspath(self.folder)), MODELS_FOLDER)

    def save_model(self, key: RunKey, payload: dict) -> None:
        """Write a run's final model atomically, with what rebuilding it needs."""
        os.makedirs(self.models, exist_ok=True)
        payload = payload | {"fingerprint": self.fingerprint}
        write_atomic(os.path.join(self.models, f"{key.stem}.pt"), lambda f: torch.save(payload, f))

    def remove(self, key: RunKey) -> None:
        """Drop a finished run's checkpoint (its evaluations are all in its run file), and the
        checkpoint folder once it is empty."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))
        with contextlib.suppress(OSError):  # not empty: other runs still have checkpoints
            os.rmdir(self.folder)


class RunKeeper:
    """The machinery of one run that the training loop hooks into: checkpoint, clock, progress."""

    def __init__(
        self,
        key: RunKey,
        cfg: Config,
        device: torch.device,
        store: Checkpoints | None,
        progress: bool,
        threads: int | None = None,
    ) -> None:
        self.key, self.name, self.cfg, self.device = key, key.name, cfg, device
        self.store, self.progress = store, progress
        self.threads = threads or torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.checkpoint = store.load(key) if store else None
        self.record = self.checkpoint["run"] | {"status": "running"} if self.checkpoint else None
        if self.checkpoint and "compiled" not in self.record:  # made before runs recorded it
            self.record["compiled"] = bool(self.checkpoint["fingerprint"].get("compiled"))
        self.bar = tqdm(
            total=schedule_of(cfg)[-1],
            unit="samples",
            unit_scale=True,
            desc=self.name,
            disable=None if progress else True,
            mininterval=1.0,
            leave=False,
        )
        self.start = time.perf_counter()
        self.parts: tuple[VAE, list[torch.optim.Adagrad], Batches] | None = None

    def begin(self, run: dict) -> dict:
        """Record the run's threads and step mode (kept from its first start), and say them."""
        run["threads"] = self.threads
        run.setdefault("compiled", use_compile(self.cfg, self.threads, self.device))
        where = str(self.device)
        if self.device.type == "cpu":
            where = f"{self.threads} thread{'s' * (self.threads > 1)}"
        log(f"[{self.name}] training on {where}, {'compiled' if run['compiled'] else 'eager'} step")
        return run

    def restore(self, vae: VAE, opts: list[torch.optim.Adagrad], batches: Batches) -> int:
        """Load the checkpoint, if any, into the run's parts; the samples it had trained."""
        self.parts, samples, wall = (vae, opts, batches), 0, 0.0
        if ckpt := self.checkpoint:
            vae.load_state_dict(ckpt["model"])
            for opt, state in zip(opts, ckpt["optimizers"], strict=True):
                opt.load_state_dict(state)
            batches.load_state(ckpt["batches"])
            set_rng_state(ckpt["rng"], self.device)
            evals = ckpt["run"]["evals"]
            samples = ckpt["samples"]
            wall = ckpt.get("wall_seconds", evals[-1]["wall_seconds"] if evals else 0.0)
            log(f"[{self.name}] resumed from its checkpoint at {samples:,} samples")
        self.bar.update(samples)
        self.start = time.perf_counter() - wall
        return samples

    def elapsed(self) -> float:
        """Wall seconds the run has trained, across stops and resumes."""
        return time.perf_counter() - self.start

    def show(self, e: dict) -> None:
        """Advance the progress bar to an evaluation and print its line."""
        self.bar.update(e["samples"] - self.bar.n)
        self.bar.set_postfix(test_elbo=f"{e['test_elbo']:.2f}")
        if self.progress:
            log(fmt_eval(self.name, e))

    def save(self, run: dict, samples: int) -> None:
        """Write the run's checkpoint (model, optimisers, data order, random state)."""
        if self.store is None or self.parts is None:
            return
        vae, opts, batches = self.parts
        self.store.save(
            self.key,
            {
                "run": copy.deepcopy(run),
                "samples": samples,
                "wall_seconds": self.elapsed(),
                "model": vae.state_dict(),
                "optimizers": [o.state_dict() for o in opts],
                "batches": batches.state(),
                "rng": rng_state(self.device),
            },
        )

    def keep_model(self, run: dict, samples: int, vae: VAE | None = None) -> None:
        """Write the run's final model to OUT_DIR/models/; without `vae` (a diverged run), the
        last good state from its checkpoint, marked as diverged."""
        if self.store is None:
            return
        diverged = vae is None
        if diverged:
            if (ckpt := self.store.load(self.key)) is None:
                return  # it diverged before its first evaluation: no good state to keep
            state, samples = ckpt["model"], ckpt["samples"]
        else:
            state = {name: t.detach().cpu() for name, t in vae.state_dict().items()}
        self.store.save_model(
            self.key,
            {
                "model": state,
                "method": self.key.method,
                "latent_dim": self.key.latent_dim,
                "seed_index": self.key.seed_index,
                "hidden_size": self.cfg.hidden_size,
                "seed": run["seed"],
                "samples": samples,
                "diverged": diverged,
            },
        )

    def remove(self) -> None:
        """Drop the checkpoint of a finished run."""
        if self.store:
            self.store.remove(self.key)

    def warn_diverged(self, samples: int) -> None:
        """Say that the run diverged and stops; its last good checkpoint stays."""
        print(
            f"warning: [{self.name}] diverged (non-finite loss or ELBO) at {samples:,} samples; "
            "this run stops here, its last good checkpoint is kept",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


def fmt_eval(name: str, e: dict) -> str:
    """One plain log line for an evaluation point of the run called `name`."""
    return (
        f"[{name}] samples {e['samples']:>11,}  "
        f"train ELBO {e['train_elbo']:9.3f}  "
        f"test ELBO {e['test_elbo']:9.3f}  (test log p(x|z) {e['test_log_likelihood']:9.3f}, "
        f"KL {e['test_kl']:7.3f})  {e['wall_seconds']:8.1f} s"
    )


def fixed_constants() -> dict:
    """The constants that change the numbers but have no flag, for results and fingerprints."""
    return {
        "mc_samples": MC_SAMPLES,
        "weight_decay": WEIGHT_DECAY,
        "init_std": INIT_STD,
        "lr_candidates": list(LR_CANDIDATES),
        "eval_batch_size": EVAL_BATCH_SIZE,
    }


def fingerprint(cfg: Config, data: Data, device: torch.device) -> dict:
    """Everything that changes a run's numbers: settings, constants, data and package versions."""
    import pyautoencoder

    return {
        "samples": cfg.samples,
        "eval_start": cfg.eval_start,
        "evals_per_decade": cfg.evals_per_decade,
        "lr": cfg.lr,
        "lr_pilot_samples": cfg.lr_pilot_samples,
        "batch_size": cfg.batch_size,
        "hidden_size": cfg.hidden_size,
        "binarize": cfg.binarize,
        "seed": cfg.seed,
        "device": device.type,
        "threads": cfg.threads,  # 0: each run gets the cores shared among the runs in flight
        "compiled": cfg.compile,  # each run records its own choice; a resumed run keeps it
        **fixed_constants(),
        "data_sha256": data.digest,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "pyautoencoder": str(pyautoencoder.__version__),
        "numpy": str(np.__version__),
    }


def same_settings(old: dict, new: dict) -> bool:
    """Whether results made under fingerprint `old` may be continued under `new`."""
    return upgraded(old, new) == new


def upgraded(old: dict, new: dict) -> dict:
    """An earlier version's fingerprint in today's terms.

    Before, threads and compiling were settings of the whole invocation (an int and a bool);
    now each run chooses and records its own, so those two entries no longer tie a folder.
    """
    if isinstance(old.get("compiled"), bool):
        return old | {"threads": new.get("threads"), "compiled": new.get("compiled")}
    return old


def unreadable(what: str) -> CheckpointError:
    """The one-line refusal of a results file or checkpoint that cannot be read."""
    return CheckpointError(
        f"{what} cannot be read; pass --fresh to start over (the old files are kept aside)"
    )


def check_settings(what: str, old: dict, new: dict) -> None:
    """Refuse, in one line naming the differing settings, a file made with other settings."""
    if not same_settings(old, new):
        raise CheckpointError(
            f"{what} was made with other settings: {fingerprint_difference(old, new)}; pass "
            "--fresh to start over (the old files are kept aside), or use another --out-dir"
        )


def fingerprint_difference(old: dict, new: dict) -> str:
    """The settings that differ between two fingerprints, as 'name old -> new'."""
    old = upgraded(old, new)
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "none"


# -------------------------------------------------------------------------------- results file
def environment(device: torch.device, threads: int) -> dict:
    """Versions and machine facts that a reader of the results needs."""
    import pyautoencoder

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pyautoencoder": pyautoencoder.__version__,
        "numpy": np.__version__,
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "cpu_count": cpu_count(),
        "threads": threads,
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def results_header(cfg: Config, device: torch.device) -> dict:
    """What the combined results say besides the runs: the config as used, the environment."""
    config = asdict(cfg) | fixed_constants() | {"eval_schedule": schedule_of(cfg)}
    return {"config": config, "environment": environment(device, cfg.threads)}


def pending_run(key: RunKey) -> dict:
    """The record of a run that no process has started."""
    return {
        "method": key.method,
        "latent_dim": key.latent_dim,
        "seed_index": key.seed_index,
        "status": "pending",
        "evals": [],
    }


def figure_order(run: dict) -> tuple[int, int, int]:
    """Sort key of a run record: methods in METHODS order, then N_z, then seed index."""
    order = METHODS.index(run["method"]) if run["method"] in METHODS else len(METHODS)
    return order, run["latent_dim"], run.get("seed_index", 0)


class RunLock:
    """The lock on one run, held by the process that trains it.

    fcntl.flock on a lock file: the operating system releases it when that process ends,
    however it ends, so no stale lock survives a kill. The file names the holder.
    """

    def __init__(self, path: str) -> None:
        self.path, self.fd = path, -1

    def acquire(self) -> str | None:
        """Take the lock: None when taken, else who holds it ("host pid N")."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            return holder or "another process"
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        """Let the run go."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lock_holder(path: str) -> str | None:
    """Who holds the lock at `path` now, or None when nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ResultsFolder:
    """OUT_DIR's results: one file per run under runs/, the source of truth, and the combined
    JSON and figure, rebuilt from every run file in the folder.

    A run's file is rewritten atomically after each evaluation by the process that trains it,
    which holds the run's lock, so invocations (or machines) that share the folder neither
    train a run twice at once nor drop each other's results.
    """

    out_dir: str
    fingerprint: dict
    header: dict
    settings: tuple[RunKey, ...]  # this invocation's runs, in figure order

    @property
    def folder(self) -> str:
        """Where the run files and their locks live."""
        return os.path.join(self.out_dir, RUNS_FOLDER)

    def path(self, key: RunKey, ext: str = ".json") -> str:
        """The run file (or with ext=".lock", the lock file) of one run."""
        return os.path.join(self.folder, f"{key.stem}{ext}")

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the folder's own lock: rebuilding the combined results and taking a run's lock
        happen one process at a time, so a probe of a lock never makes another process skip."""
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(os.path.join(self.folder, ".folder.lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def lock(self, key: RunKey) -> tuple[RunLock, str | None]:
        """Try to take one run's lock: the lock, and None or who holds it instead."""
        lock = RunLock(self.path(key, ".lock"))
        with self.exclusive():
            return lock, lock.acquire()

    def read(self) -> dict[RunKey, dict]:
        """Every run file in the folder by (method, N_z); CheckpointError for one that is
        unreadable or was made with other settings."""
        names = sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else []
        runs = {}
        for name in (n for n in names if n.endswith(".json")):
            path = os.path.join(self.folder, name)
            try:
                with open(path) as f:
                    saved = json.load(f)
                run, fp = saved["run"], saved["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError):
                raise unreadable(path) from None
            check_settings(path, fp, self.fingerprint)
            runs[_key(run)] = run
        return runs

    def save_run(self, run: dict) -> None:
        """Write one run's file atomically, then rebuild the combined results (and, at most
        every FIGURE_EVERY_S seconds, the figure)."""
        self.write_run(run)
        png = os.path.join(self.out_dir, FIGURE_NAME)
        stale = not os.path.exists(png) or time.time() - os.path.getmtime(png) > FIGURE_EVERY_S
        self.publish(figure=stale)

    def write_run(self, run: dict) -> None:
        """Write one run's file atomically: its fingerprint, this process's environment, it."""
        os.makedirs(self.folder, exist_ok=True)
        saved = {"fingerprint": self.fingerprint, "environment": self.header["environment"]}
        write_json_atomic(saved | {"run": run}, self.path(_key(run)))

    def publish(self, figure: bool = True) -> dict:
        """Rebuild the combined JSON (and the figure) from all the run files; returns it."""
        with self.exclusive():
            on_disk = self.read()
            runs = [on_disk.pop(key, pending_run(key)) for key in self.settings]
            runs += sorted(on_disk.values(), key=figure_order)  # runs of other settings stay
            results = self.header | {"fingerprint": self.fingerprint}
            results["runs"] = [self.shown(run) for run in runs]
            write_json_atomic(results, os.path.join(self.out_dir, RESULTS_NAME))
        if figure:
            plot_results(results, os.path.join(self.out_dir, FIGURE_NAME))
        return results

    def shown(self, run: dict) -> dict:
        """A run as the combined file shows it: "running" only while a process holds it."""
        if run["status"] == "running" and lock_holder(self.path(_key(run), ".lock")) is None:
            return run | {"status": "interrupted"}
        return run

    def migrate(self, json_path: str) -> None:
        """Check an earlier combined JSON and give each of its runs without a run file one.

        Raises CheckpointError when it is unreadable or was made with other settings.
        """
        if not os.path.exists(json_path):
            return
        try:
            with open(json_path) as f:
                old = json.load(f)
        except ValueError:
            raise unreadable(json_path) from None
        check_settings(json_path, old.get("fingerprint") or {}, self.fingerprint)
        on_disk = self.read()
        moved = [r for r in old["runs"] if _key(r) not in on_disk]
        for run in (r for r in moved if r["evals"] or r["status"] in FINISHED):
            if run["status"] == "running":
                run = run | {"status": "interrupted"}
            self.write_run(run)
            log(f"[{_key(run).name}] moved from {json_path} into {RUNS_FOLDER}/")


def _key(run: dict) -> RunKey:
    """A run record's key (records made before --seeds are the first seed)."""
    return RunKey(run["method"], run["latent_dim"], run.get("seed_index", 0))


def load_models(out_dir: str) -> dict[RunKey, dict]:
    """The final models in OUT_DIR/models/ (first seed of each setting), by run."""
    folder = os.path.join(out_dir, MODELS_FOLDER)
    models = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".pt"):
            saved = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)
            key = RunKey(saved["method"], saved["latent_dim"], saved["seed_index"])
            if key.seed_index == 0:
                models[key] = saved
    return models


def draw_samples(out_dir: str, digits: torch.Tensor, seed: int) -> str | None:
    """Draw the samples picture from the saved models; its path, or None without models."""
    models = load_models(out_dir)
    if not models:
        return None
    path = os.path.join(out_dir, SAMPLES_NAME)
    plot_samples(models, digits, path, seed)
    return path


def redraw(out_dir: str) -> bool:
    """--plot-only: rebuild the combined JSON and the figure from the run files alone, or
    redraw the figure from the combined JSON of a folder without run files; True if the JSON
    was rebuilt."""
    json_path, runs_dir = os.path.join(out_dir, RESULTS_NAME), os.path.join(out_dir, RUNS_FOLDER)
    names = (
        sorted(n for n in os.listdir(runs_dir) if n.endswith(".json"))
        if os.path.isdir(runs_dir)
        else []
    )
    if not names:
        with open(json_path) as f:
            plot_results(json.load(f), os.path.join(out_dir, FIGURE_NAME))
        return False
    header = {"config": {}, "environment": {}}
    if os.path.exists(json_path):
        with open(json_path) as f:
            header |= {k: v for k, v in json.load(f).items() if k in ("config", "environment")}
    with open(os.path.join(runs_dir, names[0])) as f:
        fp = json.load(f)["fingerprint"]
    ResultsFolder(out_dir, fp, header, ()).publish()
    return True


def keep_aside(path: str) -> None:
    """Move an earlier results file or checkpoint folder out of the way, time-stamped."""
    if os.path.exists(path):
        stem, ext = os.path.splitext(path)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
        aside = f"{stem}.{stamp}{ext}"
        os.replace(path, aside)
        print(f"kept {path} aside as {aside}")


# -------------------------------------------------------------------------------- every setting
FINISHED = ("done", "diverged")  # statuses of runs that a rerun skips


def settings_of(cfg: Config) -> list[RunKey]:
    """The runs of a configuration, in figure order."""
    return [RunKey(m, d, i) for m in cfg.methods for d in cfg.latent_dims for i in range(cfg.seeds)]


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


def threads_for(cfg: Config, in_flight: int) -> int:
    """CPU threads for a run that starts now: --threads, or the cores shared among the runs
    that will be in flight with it (so a lone run gets every core)."""
    return cfg.threads or max(1, cpu_count() // max(1, in_flight))


def run_all(
    cfg: Config,
    data: Data,
    device: torch.device,
    folder: ResultsFolder,
    store: Checkpoints,
    todo: list[RunKey],
) -> dict[RunKey, str]:
    """Train the unfinished runs in `todo` that no other process holds, here or in worker
    processes; returns the runs left to other processes, with who holds them."""
    if cfg.jobs == 1 or len(todo) <= 1:
        left = {}
        for key in todo:
            holder = train_locked(key, cfg, data, device, folder, store, threads_for(cfg, 1))
            if holder:
                left[key] = holder
            if STOP_REQUEST:
                break
    else:
        left = Workers(cfg, folder, store, schedule_of(cfg)[-1]).run(todo)
    if STOP_REQUEST:
        raise Interrupted(128 + STOP_REQUEST[0])
    return left


def train_locked(
    key: RunKey,
    cfg: Config,
    data: Data,
    device: torch.device,
    folder: ResultsFolder,
    store: Checkpoints,
    threads: int,
    on_eval: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> str | None:
    """Train one run while holding its lock, saving its file after every evaluation; returns
    None, or who holds the run instead (it is then left to them)."""
    name = key.name
    lock, holder = folder.lock(key)
    if holder:
        log(f"[{name}] skipped: {holder} is training it")
        return holder
    try:
        run = folder.read().get(key)  # another process may have finished it meanwhile
        if run and run["status"] in FINISHED:
            log(f"[{name}] already {run['status']}: skipped")
            return None

        def save(run: dict) -> None:
            folder.save_run(run)
            if on_eval:
                on_eval(run)

        try:
            train_run(key, cfg, data, device, save, progress, store, threads)
        except Exception as exc:  # noqa: BLE001 (one broken run must not cost the others)
            run = folder.read().get(key) or pending_run(key)
            fail(run, f"{type(exc).__name__}: {exc}", traceback.format_exc())
            folder.save_run(run)
        return None
    finally:
        lock.release()


def _worker(
    cfg: Config,
    key: RunKey,
    folder: ResultsFolder,
    store: Checkpoints,
    messages: multiprocessing.Queue,
    threads: int,
) -> None:
    """One (method, N_z) run in its own process; it writes its run file, and tells the main
    process each evaluation, or that another process holds the run."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    quiet_third_party()
    try:
        torch.set_num_threads(threads)
        device = resolve_device(cfg.device)
        data = load_data(cfg.data_dir, device, cfg.binarize, cfg.seed, verify=cfg.verify_data)

        def send(run: dict) -> None:
            messages.put(("run", copy.deepcopy(run)))

        holder = train_locked(key, cfg, data, device, folder, store, threads, send, False)
        if holder:
            messages.put(("held", key, holder))
    except Interrupted:
        pass  # its checkpoint and run file are already written
    except Exception as exc:  # noqa: BLE001 (the main process marks the run as failed)
        error = f"{type(exc).__name__}: {exc}"
        messages.put(("error", key, error, traceback.format_exc()))
        sys.exit(1)


class Workers:
    """Runs settings in up to cfg.jobs worker processes, one process per setting.

    Hand-written rather than a ProcessPoolExecutor: a worker killed outright (a crash, an
    out-of-memory kill) breaks such a pool for every run, while here it fails only its own
    run and the others go on. Each worker writes its run file and tells the main process each
    evaluation, which it prints and shows on that setting's progress bar. On a stop request no
    new worker starts and the running ones get the same signal, so each saves and stops.
    """

    def __init__(self, cfg: Config, folder: ResultsFolder, store: Checkpoints, total: int) -> None:
        self.cfg, self.folder, self.store, self.total = cfg, folder, store, total
        self.ctx = multiprocessing.get_context("spawn")
        self.messages = self.ctx.Queue()
        self.bars: dict[RunKey, tqdm] = {}
        self.left: dict[RunKey, str] = {}
        self.seen: dict[RunKey, int] = {}

    def run(self, todo: list[RunKey]) -> dict[RunKey, str]:
        """Train the settings in `todo` until each has ended; the runs left to others."""
        waiting, running, forwarded = list(todo), {}, False
        while waiting or running:
            if STOP_REQUEST and not forwarded:
                forwarded, waiting = True, []
                for process in running.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, STOP_REQUEST[0])
            while waiting and len(running) < self.cfg.jobs:
                threads = threads_for(self.cfg, min(self.cfg.jobs, len(running) + len(waiting)))
                key = waiting.pop(0)
                args = (self.cfg, key, self.folder, self.store, self.messages, threads)
                name = key.stem
                running[key] = self.ctx.Process(target=_worker, args=args, name=name)
                running[key].start()
            self.receive(timeout=0.2)
            for key, process in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                self.receive(timeout=0.5)  # what it sent before it ended
                while self.receive(timeout=0):
                    pass
                del running[key]
                if not STOP_REQUEST and key not in self.left:  # else: interrupted, or not ours
                    code = process.exitcode
                    self.fail_if_unfinished(
                        key,
                        f"its worker process ended with exit status {code} before the run finished",
                    )
        for bar in self.bars.values():
            bar.close()
        return self.left

    def fail_if_unfinished(self, key: RunKey, why: str, trace: str = "") -> None:
        """Mark the run of a worker that ended before its run did as failed, saying why."""
        lock, holder = self.folder.lock(key)
        try:
            run = self.folder.read().get(key) or pending_run(key)
            if holder is None and run["status"] not in (*FINISHED, "failed"):
                fail(run, why, trace)
                self.folder.save_run(run)
        finally:
            lock.release()

    def receive(self, timeout: float) -> bool:
        """Handle one message from a worker; False if none came within `timeout`."""
        try:
            message = self.messages.get(timeout=timeout) if timeout else self.messages.get_nowait()
        except queue.Empty:
            return False
        if message[0] == "held":
            self.left[message[1]] = message[2]
        elif message[0] == "error":
            _, key, error, trace = message
            self.fail_if_unfinished(key, error, trace)
        else:
            run = message[1]
            key, evals = _key(run), run["evals"]
            if key not in self.bars:
                self.bars[key] = tqdm(
                    total=self.total,
                    unit="samples",
                    unit_scale=True,
                    desc=key.name,
                    position=len(self.bars),
                    disable=None,
                    leave=False,
                )
            if evals and len(evals) > self.seen.get(key, 0):
                self.seen[key] = len(evals)
                log(fmt_eval(key.name, evals[-1]))
                self.bars[key].update(evals[-1]["samples"] - self.bars[key].n)
                self.bars[key].set_postfix(test_elbo=f"{evals[-1]['test_elbo']:.2f}")
        return True


def fail(run: dict, error: str, trace: str = "") -> None:
    """Mark a run as failed, keeping what it measured, and say so."""
    run["status"], run["error"] = "failed", error
    if trace:
        print(trace, file=sys.stderr, end="")
    name = _key(run).name
    print(f"error: [{name}] failed: {error}; the other runs go on", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------- quiet logs
def quiet_third_party() -> None:
    """Silence, at their source, third-party notices that say nothing to our user."""
    # "No CUDA runtime is found, using CUDA_HOME=..." when inductor compiles on a CPU machine
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # "Profiler record function ... will be ignored": dynamo tracing the optimiser's step
    for name in ("torch._dynamo.variables.ctx_manager", "torch._dynamo.variables.torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -------------------------------------------------------------------------------- time estimate
def estimate_seconds(
    cfg: Config, data: Data, device: torch.device, todo: list[RunKey], runs: dict
) -> float:
    """Wall time of training `todo` as run_all will, from a short timed warm-up of each setting.

    Each setting takes ESTIMATE_STEPS eager steps at the thread count it will get, and one
    full evaluation is timed per thread count (the final log p(x) estimate is costed from
    it); the queue of cfg.jobs slots is then replayed.
    """
    step_s: dict[tuple[str, int, int], float] = {}
    eval_s: dict[int, float] = {}
    lr = LR_CANDIDATES[0] if cfg.lr == "auto" else float(cfg.lr)

    def duration(run_key: RunKey, threads: int) -> float:
        method, latent_dim = run_key.method, run_key.latent_dim
        key = (method, latent_dim, threads)  # seeds of one setting cost the same
        torch.set_num_threads(threads)
        timed = key in step_s and threads in eval_s
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if not timed:
                vae = build_vae(latent_dim, cfg.hidden_size).to(device)
                step, _ = make_step(method, vae, lr, device, compile_step=False)
                batches = Batches(data.train, cfg.batch_size)
            if key not in step_s:
                float(step(batches.next()))  # warm-up: first-call allocations
                start = time.perf_counter()
                for _ in range(ESTIMATE_STEPS):
                    loss = step(batches.next())
                float(loss)
                step_s[key] = (time.perf_counter() - start) / ESTIMATE_STEPS
            if threads not in eval_s:
                start = time.perf_counter()
                evaluate_point(vae, data, cfg.seed)
                eval_s[threads] = time.perf_counter() - start
        evals = runs.get(run_key, pending_run(run_key))["evals"]
        done = evals[-1]["samples"] if evals else 0
        points = [p for p in schedule_of(cfg) if p > done]
        if not points:  # evaluated to the end; another process is finishing it
            return 0.0
        seconds = (points[-1] - done) / cfg.batch_size * step_s[key] + len(points) * eval_s[threads]
        if cfg.lr == "auto" and not evals:  # the pilots, each scored on the training set
            pilot = cfg.lr_pilot_samples / cfg.batch_size * step_s[key] + eval_s[threads] * 0.9
            seconds += len(LR_CANDIDATES) * pilot
        # the final log p(x): K decodes of each test image, each about 2/3 of a full pass
        test_share = len(data.test_eval) / (len(data.train_eval) + len(data.test_eval))
        seconds += eval_s[threads] * cfg.iw_samples * test_share * 2 / 3
        if use_compile(cfg, threads, device):
            seconds += COMPILE_SECONDS
        return seconds

    jobs = 1 if cfg.jobs == 1 or len(todo) <= 1 else cfg.jobs
    now, ends = 0.0, []  # the end times of the runs in flight
    for i, run_key in enumerate(todo):
        if len(ends) == jobs:
            now = min(ends)
        ends = [e for e in ends if e > now]
        threads = threads_for(cfg, min(jobs, len(ends) + len(todo) - i))
        ends.append(now + duration(run_key, threads))
    return max(ends, default=0.0)


def fmt_duration(seconds: float) -> str:
    """A duration as people say it: '45 s', '12 min', '2 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


# -------------------------------------------------------------------------------- benchmark
def flops_per_training_sample(latent_dim: int, hidden_size: int = HIDDEN_SIZE) -> float:
    """FLOPs of one SGVB training step per sample: 2 x multiply-adds of the forward pass x 2.5."""
    macs = 784 * hidden_size + hidden_size * 2 * latent_dim + latent_dim * hidden_size
    return 2 * (macs + hidden_size * 784) * 2.5


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a size x size float32 matrix product on `device` (median of `repeats`)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        float((a @ b)[0, 0])  # the read synchronises a GPU
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times[1:]) / 1e9


def samples_per_second(
    steps_by_name: dict[str, Callable[[], torch.Tensor]], steps: int, windows: int, batch_size: int
) -> dict[str, float]:
    """Median training samples/s of each step function, timed in interleaved windows of `steps`
    steps after one warm-up window, so that all of them see the same machine."""
    rates: dict[str, list[float]] = {name: [] for name in steps_by_name}
    for w in range(windows + 1):
        for name, one_step in steps_by_name.items():
            start = time.perf_counter()
            for _ in range(steps):
                last = one_step()
            float(last)  # waits for the device
            if w:
                rates[name].append(steps * batch_size / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def plain_step(cfg: Config, device: torch.device, batches: Batches) -> Callable[[], torch.Tensor]:
    """The yardstick: the same AEVB step (N_z = 20) written as plain PyTorch, one step per call.

    Four nn.Linear layers (one holds both Gaussian heads), tanh, the reparameterised sample,
    BCE with logits summed over pixels, the closed-form KL, Adagrad with the same weight decay
    (fused on the CPU), data resident.
    """
    h, nz = cfg.hidden_size, 20
    layers = [nn.Linear(784, h), nn.Linear(h, 2 * nz), nn.Linear(nz, h), nn.Linear(h, 784)]
    enc, head, dec1, dec2 = (layer.to(device) for layer in layers)
    params = [p for layer in (enc, head, dec1, dec2) for p in layer.parameters()]
    fused = {"fused": True} if device.type == "cpu" else {"foreach": True}
    opt = torch.optim.Adagrad(params, lr=float(LEARNING_RATE), weight_decay=WEIGHT_DECAY, **fused)

    def step() -> torch.Tensor:
        x = batches.next().flatten(1)
        opt.zero_grad(set_to_none=True)
        mu, log_var = head(torch.tanh(enc(x))).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        rec = binary_cross_entropy_with_logits(dec2(torch.tanh(dec1(z))), x, reduction="sum")
        loss = (rec + 0.5 * (log_var.exp() + mu.pow(2) - 1 - log_var).sum()) / len(x)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


class _ToTensorImages(torch.utils.data.Dataset):
    """Synthetic uint8 images served one at a time through transforms.ToTensor, as MNIST is."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.to_tensor = images.squeeze(1).numpy(), torchvision.transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.to_tensor(self.images[i]), 0


def dataloader_step(cfg: Config, device: torch.device, real: bool) -> Callable[[], torch.Tensor]:
    """The pyautoencoder example's loop, one step per call: DataLoader, ToTensor, batch 100."""
    to_tensor = torchvision.transforms.ToTensor()
    if real:
        dataset: torch.utils.data.Dataset = torchvision.datasets.MNIST(
            cfg.data_dir, train=True, transform=to_tensor
        )
    else:
        dataset = _ToTensorImages((torch.rand(60_000, 1, 28, 28) * 255).to(torch.uint8))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True
    )
    seed_everything(cfg.seed)
    vae = build_vae(20, cfg.hidden_size).to(device)
    opt = torch.optim.Adagrad(vae.parameters(), lr=float(LEARNING_RATE), weight_decay=WEIGHT_DECAY)

    def batches() -> Iterator[torch.Tensor]:
        while True:
            for x, _ in loader:
                yield x

    stream = batches()

    def step() -> torch.Tensor:
        x = next(stream).to(device)
        opt.zero_grad()
        loss = vae.compute_loss(x, vae(x), likelihood="bernoulli").objective
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def benchmark(
    cfg: Config, device: torch.device, steps: int, windows: int = BENCHMARK_WINDOWS
) -> dict[str, float | str]:
    """Measure and print training speed, the DataLoader baseline, evaluation time and memory."""
    try:
        data = load_data(
            cfg.data_dir, device, False, cfg.seed, verify=cfg.verify_data, download=False
        )
        source = "real MNIST"
    except DataError:
        train = torch.rand(60_000, 1, 28, 28, device=device)
        data = Data(train, train, torch.rand(10_000, 1, 28, 28, device=device))
        source = f"synthetic data of MNIST's shape (no MNIST under {cfg.data_dir})"
    threads = torch.get_num_threads()
    long_run = replace(cfg, samples=max(cfg.samples, COMPILE_MIN_SAMPLES))
    compiled = use_compile(long_run, threads, device)
    mode = "compiled" if compiled else "eager"
    log(
        f"benchmark: N_z = 20, batch {cfg.batch_size}, {source}, {device}, "
        f"{threads} threads, step {mode}"
    )
    gflops = matmul_gflops(device)
    seed_everything(cfg.seed)
    vae = build_vae(20, cfg.hidden_size).to(device)
    step, _ = make_step("aevb", vae, float(LEARNING_RATE), device, compiled)
    batches = Batches(data.train, cfg.batch_size)
    yardstick = plain_step(cfg, device, Batches(data.train, cfg.batch_size))
    timed = {"ours": lambda: step(batches.next()), "plain": yardstick}
    if compiled:  # the same step, eager, for the fast step's gain
        twin = build_vae(20, cfg.hidden_size).to(device)
        eager_step, _ = make_step("aevb", twin, float(LEARNING_RATE), device, compile_step=False)
        timed["eager"] = lambda: eager_step(batches.next())
    rates = samples_per_second(timed, steps, windows, cfg.batch_size)
    ours, plain = rates["ours"], rates["plain"]
    eager = rates.get("eager", ours)
    every_run = all_runs_step(cfg, device, data, compiled and device.type == "cuda")
    per_run = samples_per_second({"all": every_run}, steps, windows, cfg.batch_size)["all"]
    all_runs = per_run * len(METHODS) * len(LATENT_DIMS)  # the ten together
    loader_step = dataloader_step(cfg, device, source == "real MNIST")
    baseline = samples_per_second({"loader": loader_step}, steps, windows, cfg.batch_size)["loader"]
    eval_times = []
    for _ in range(3):
        start = time.perf_counter()
        evaluate_elbo(vae, data.train_eval)
        evaluate_elbo(vae, data.test_eval)
        eval_times.append(time.perf_counter() - start)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    achieved = ours * flops_per_training_sample(20, cfg.hidden_size) / 1e9
    result: dict[str, float | str] = {
        "data": source,
        "training samples/s (ours)": ours,
        "training samples/s (ours, eager)": eager,
        "training samples/s (plain PyTorch step)": plain,
        "ratio ours / plain step": ours / plain,
        "training samples/s (DataLoader loop)": baseline,
        "ratio ours / DataLoader": ours / baseline,
        "seconds per full evaluation (60,000 + 10,000)": statistics.median(eval_times),
        "matmul 2048 GFLOP/s": gflops,
        "training GFLOP/s": achieved,
        "efficiency (training / matmul)": achieved / gflops,
        "peak resident memory MiB": peak,
        "training steps/s, one run": ours / cfg.batch_size,
        "training steps/s, all ten runs in flight": all_runs / cfg.batch_size,
    }
    if device.type == "cuda":
        result["peak CUDA memory MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    for key, value in result.items():
        log(f"  {key:<48} {value:,.3f}" if isinstance(value, float) else f"  {key:<48} {value}")
    if cfg.benchmark_json:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        summary = {
            "gpu": gpu,
            "device": str(device),
            "device_name": gpu or environment(device, threads)["device_name"],
            "torch": str(torch.__version__),
            "threads": threads,
            "fast_step": mode,
            "steps_per_s_one_run": ours / cfg.batch_size,
            "steps_per_s_one_run_eager": eager / cfg.batch_size,
            "steps_per_s_all_runs": all_runs / cfg.batch_size,
            "eval_seconds": statistics.median(eval_times),
            "peak_memory_mib": result.get("peak CUDA memory MiB", peak),
            "printed": result,
        }
        write_json_atomic(summary, cfg.benchmark_json)
        log(f"  written to {cfg.benchmark_json}")
    return result


def all_runs_step(
    cfg: Config, device: torch.device, data: Data, compiled: bool
) -> Callable[[], torch.Tensor]:
    """One step of each of the default figure's ten runs per call, round robin, as if all ten
    were in flight on this device (a wake-sleep step counts as one): each call advances every
    run by one minibatch."""
    steps = []
    for method in METHODS:
        for latent_dim in LATENT_DIMS:
            vae = build_vae(latent_dim, cfg.hidden_size).to(device)
            step, _ = make_step(method, vae, float(LEARNING_RATE), device, compiled)
            steps.append((step, Batches(data.train, cfg.batch_size)))

    def every_run() -> torch.Tensor:
        for step, batches in steps:
            loss = step(batches.next())
        return loss

    return every_run


# -------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per Config field, each defaulting to its constant."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(Config):
        kwargs = dict(f.metadata)
        if f.type == "bool" and "action" not in kwargs:
            kwargs["action"] = argparse.BooleanOptionalAction
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        p.add_argument(f"--{f.name.replace('_', '-')}", default=default, **kwargs)
    return p


def check_out_dir(path: str) -> str | None:
    """None if `path` can be created and written, else why not."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        why = exc.strerror or exc
        return f"--out-dir {path!r} cannot be created or written ({why}); choose another folder"
    return None


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse and check the command line; bad values end here with a one-line error, status 2."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.samples < a.batch_size:
        parser.error(
            f"--samples {a.samples} is less than one minibatch ({a.batch_size}); "
            f"ask for at least {a.batch_size}"
        )
    if a.lr == "auto" and a.lr_pilot_samples < a.batch_size:
        parser.error(
            f"--lr-pilot-samples {a.lr_pilot_samples} is less than one minibatch ({a.batch_size})"
        )
    if a.threads < 0:
        parser.error(
            f"--threads {a.threads} is negative; use 0 for cores / jobs, or a positive count"
        )
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda was asked for but CUDA is not available here; use --device cpu or auto"
        )
    if (problem := check_out_dir(a.out_dir)) is not None:
        parser.error(problem)
    values = {f.name: getattr(a, f.name) for f in dataclasses.fields(Config)}
    for name in ("latent_dims", "methods"):
        values[name] = tuple(dict.fromkeys(values[name]))  # in order, without repeats
    return Config(**values)


# -------------------------------------------------------------------------------- main
def plot_only(cfg: Config) -> int:
    """--plot-only: redraw the figure and the samples picture from the files in --out-dir."""
    try:
        results = redraw(cfg.out_dir)
    except (OSError, ValueError, KeyError, CheckpointError) as exc:
        print(
            f"error: cannot read the results in {cfg.out_dir} ({exc}); run the training "
            "first or point --out-dir at its folder",
            file=sys.stderr,
        )
        return 2
    json_path, png_path = (os.path.join(cfg.out_dir, n) for n in (RESULTS_NAME, FIGURE_NAME))
    print(f"figure: {png_path}" + f"\nresults: {json_path}" * bool(results))
    if load_models(cfg.out_dir):  # the samples picture needs the test digits
        try:
            digits = load_split(cfg.data_dir, "test", cfg.verify_data)
            print(f"samples: {draw_samples(cfg.out_dir, digits, cfg.seed)}")
        except (OSError, DataError) as exc:
            print(f"notice: {SAMPLES_NAME} not redrawn: no MNIST test set ({exc})")
    return 0


def open_results(
    cfg: Config, data: Data, device: torch.device
) -> tuple[ResultsFolder, Checkpoints, dict[RunKey, dict], list[RunKey]]:
    """The results folder and checkpoints of this configuration (old ones set aside with
    --fresh), what they already hold, and the runs left to train; raises CheckpointError for an
    unreadable or foreign run file or checkpoint, before any work."""
    fp = fingerprint(cfg, data, device)
    store = Checkpoints(os.path.join(cfg.out_dir, "checkpoints"), fp)
    folder = ResultsFolder(cfg.out_dir, fp, results_header(cfg, device), tuple(settings_of(cfg)))
    json_path = os.path.join(cfg.out_dir, RESULTS_NAME)
    if cfg.fresh:
        pictures = os.path.join(cfg.out_dir, SAMPLES_NAME)
        for path in (json_path, folder.folder, store.folder, store.models, pictures):
            keep_aside(path)
    folder.migrate(json_path)
    on_disk = folder.read()  # refuses a run file that is unreadable or from other settings
    for key in folder.settings:
        store.load(key)  # refuses an unreadable or foreign checkpoint before any work
    todo = []
    for key in folder.settings:
        status = on_disk.get(key, pending_run(key))["status"]
        if status in FINISHED:
            log(f"[{key.name}] already {status}: skipped")
        else:
            todo.append(key)
    return folder, store, on_disk, todo


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load MNIST, train every setting, save the JSON, draw the figure."""
    cfg = parse_config(argv)
    if cfg.plot_only:
        return plot_only(cfg)
    device = resolve_device(cfg.device)
    quiet_third_party()
    if cfg.benchmark:  # one run: all cores unless --threads says otherwise
        torch.set_num_threads(cfg.threads or cpu_count())
        benchmark(
            replace(cfg, jobs=1, threads=torch.get_num_threads()), device, cfg.benchmark_steps
        )
        return 0
    try:
        data = load_data(cfg.data_dir, device, cfg.binarize, cfg.seed, verify=cfg.verify_data)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if len(data.train) < cfg.batch_size:
        print(
            f"error: the training set holds {len(data.train)} images, fewer than one "
            f"minibatch ({cfg.batch_size})",
            file=sys.stderr,
        )
        return 1
    try:
        folder, store, on_disk, todo = open_results(cfg, data, device)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json_path, png_path = (os.path.join(cfg.out_dir, n) for n in (RESULTS_NAME, FIGURE_NAME))
    at_a_time = min(cfg.jobs, len(todo)) or 1
    threads = f"{cfg.threads} threads per run" if cfg.threads else "cores shared among them"
    log(f"training on {device}, {at_a_time} run(s) at a time ({threads}); results: {json_path}")
    started = time.perf_counter()
    estimate = estimate_seconds(cfg, data, device, todo, on_disk)
    work = (
        f"{len(todo)} run{'s' * (len(todo) != 1)} x {cfg.samples:,} samples, {at_a_time} at a time"
    )
    log(f"estimate: {work}: about {fmt_duration(estimate)} here")
    STOP_REQUEST.clear()
    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    code, left = 0, {}
    try:
        try:
            left = run_all(cfg, data, device, folder, store, todo)
        except Interrupted as exc:
            code = exc.code
        results = folder.publish()  # still under request_stop: Ctrl-C cannot break it
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    ours = [r for r in results["runs"] if _key(r) in folder.settings and _key(r) not in left]
    if not code and any(r["status"] != "done" for r in ours):
        code = 3
    pictures = draw_samples(cfg.out_dir, data.test_eval, cfg.seed)
    print(results_table(results))
    took = time.perf_counter() - started
    print(f"wall time: {fmt_duration(took)} (estimated {fmt_duration(estimate)})")
    print(f"figure: {png_path}\nresults: {json_path}" + f"\nsamples: {pictures}" * bool(pictures))
    for key, holder in left.items():
        print(f"left to another process: [{key.name}], held by {holder}")
    if code >= 128:
        print(
            f"stopped by signal {code - 128}: checkpoints are in {store.folder}; "
            "run the same command again to continue",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
