#!/usr/bin/env python
"""Reproduce Figure 2 of Kingma & Welling, "Auto-Encoding Variational Bayes" (2013).

Trains the paper's MNIST variational autoencoders (N_z = 3, 5, 10, 20, 200) with AEVB and
with the wake-sleep baseline, tracks the average variational lower bound (ELBO) per datapoint
on the training and test sets against the number of training samples seen, and draws the
figure the way the paper does.

    python reproduce_fig2.py --data-dir ../shared/mnist      # train, then read the PNG
    python reproduce_fig2.py --help                          # every constant as a flag

The constants below are the interface: each command-line flag defaults to one of them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import platform
import queue
import random
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterable, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402
from pyautoencoder.loss import log_likelihood  # noqa: E402
from pyautoencoder.variational import VAE  # noqa: E402
from tqdm import tqdm  # noqa: E402

# ---------------------------------------------------------------------------- constants
LATENT_DIMS: tuple[int, ...] = (3, 5, 10, 20, 200)  # latent sizes N_z, one panel each
METHODS: tuple[str, ...] = ("aevb", "wake-sleep")  # training algorithms compared in each panel
HIDDEN_SIZE: int = 500  # hidden units of encoder and decoder (appendix C, MNIST)
BATCH_SIZE: int = 100  # minibatch size M
LEARNING_RATE: float | str = 0.02  # Adagrad global step size, or "auto" to pick one by pilot runs
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
DEVICE: str = "auto"  # "auto" (CUDA when available, else CPU), "cpu" or "cuda"
THREADS: int = 0  # CPU threads per run; 0 means cores / JOBS
JOBS: int = 2  # (method, N_z) runs trained side by side in worker processes (2 x 1 thread was fastest on 2 cores)
COMPILE: str = "auto"  # torch.compile the training step: "auto" (long runs on CUDA or with 2+ threads), "on", "off"
COMPILE_MIN_SAMPLES: int = 1_000_000  # "auto" compiles runs of at least this many samples
BENCHMARK_STEPS: int = 100  # training steps per timing window of --benchmark
BENCHMARK_WINDOWS: int = 5  # timing windows of --benchmark (after one warm-up window)

FIGURE_NAME = "vae_mnist_fig2_repro.png"  # figure written to OUT_DIR
RESULTS_NAME = "vae_mnist_fig2_repro.json"  # results written to OUT_DIR
PAPER_YLIM = (-150.0, -95.0)  # the paper's vertical range, widened only to fit measured points
PAPER_XLIM = (1e5, 1e8)  # the paper's horizontal range, widened only to fit measured points
METHOD_STYLE = {"aevb": ("AEVB", "tab:red"), "wake-sleep": ("WS", "tab:blue")}  # legend, colour

# ---------------------------------------------------------------------------- data
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


def raw_folder(data_dir: str) -> str:
    """The folder where torchvision keeps the uncompressed MNIST files."""
    return os.path.join(data_dir, "MNIST", "raw")


def check_idx_file(path: str) -> None:
    """Raise DataError unless `path` is a complete IDX file of unsigned bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
        ndim = head[3] if len(head) == 4 else 0
        dims_raw = f.read(4 * ndim)
    if len(head) < 4 or head[:3] != b"\x00\x00\x08" or not 1 <= ndim <= 3 or len(dims_raw) < 4 * ndim:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad header): replace it with the original MNIST file")
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
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                torchvision.datasets.MNIST(data_dir, train=True, download=True)
            return
        except Exception as exc:  # any failure of the download becomes one readable line
            first = str(exc).strip().splitlines()
            reason = f"the download failed ({type(exc).__name__}: {first[-1] if first else exc})"
        finally:
            socket.setdefaulttimeout(old_timeout)
    raise DataError(
        f"MNIST not found: {os.path.abspath(folder)} lacks {', '.join(missing)} and {reason}. "
        f"Put the four files {', '.join(names)} in MNIST/raw/ under a folder and pass it with --data-dir"
    )


def sha256_of(t: torch.Tensor) -> str:
    """SHA-256 of a uint8 tensor's bytes, as ../shared/mnist/README.md lists them."""
    return hashlib.sha256(t.to(torch.uint8).numpy().tobytes()).hexdigest()


def load_split(data_dir: str, split: str, verify: bool = True) -> torch.Tensor:
    """One MNIST split as a CPU float32 tensor [N, 1, 28, 28] in [0, 1]."""
    folder = raw_folder(data_dir)
    for name in MNIST_FILES[split]:
        check_idx_file(os.path.join(folder, name))
    ds = torchvision.datasets.MNIST(data_dir, train=split == "train", download=False)
    images, labels = ds.data, ds.targets
    if images.dim() != 3 or tuple(images.shape[1:]) != (28, 28) or len(images) != len(labels):
        raise DataError(f"{folder}: the {split} files hold {tuple(images.shape)} images and {len(labels)} labels, not N x 28 x 28 with N labels")
    if verify and (sha256_of(images), sha256_of(labels)) != MNIST_SHA256[split]:
        raise DataError(
            f"{folder}: the {split} split does not match the standard MNIST checksums; "
            "replace the files with the originals, or pass --no-verify-data for other data"
        )
    return images.unsqueeze(1).to(torch.float32).div_(255)


def files_digest(data_dir: str) -> str:
    """SHA-256 of the four raw MNIST files, in a fixed order."""
    h = hashlib.sha256()
    for name in (n for pair in MNIST_FILES.values() for n in pair):
        with open(os.path.join(raw_folder(data_dir), name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def load_data(data_dir: str, device: torch.device, binarize: bool, seed: int, verify: bool = True, download: bool = True) -> Data:
    """Both MNIST splits, resident on `device`; evaluation sets binarized once when `binarize`."""
    ensure_mnist(data_dir, download=download)
    train, test = load_split(data_dir, "train", verify), load_split(data_dir, "test", verify)
    digest = files_digest(data_dir)
    if binarize:
        fixed = torch.Generator().manual_seed(seed)  # the same binary evaluation sets every time
        train_eval, test_eval = torch.bernoulli(train, generator=fixed), torch.bernoulli(test, generator=fixed)
        return Data(train.to(device), train_eval.to(device), test_eval.to(device), digest)
    train = train.to(device)
    return Data(train, train, test.to(device), digest)


# ---------------------------------------------------------------------------- model
def build_vae(latent_dim: int, hidden_size: int = HIDDEN_SIZE, init_std: float = INIT_STD) -> VAE:
    """The paper's MLP VAE (appendix C) on the CPU, every parameter drawn from N(0, init_std^2)."""
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden_size), nn.Tanh())
    decoder = nn.Sequential(
        nn.Linear(latent_dim, hidden_size), nn.Tanh(),
        nn.Linear(hidden_size, 28 * 28), nn.Unflatten(1, (1, 28, 28)),
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


# ---------------------------------------------------------------------------- ELBO evaluator
@torch.inference_mode()
def evaluate_elbo(vae: VAE, images: torch.Tensor, seed: int = SEED, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, float]:
    """Average per-datapoint ELBO (nats) over `images`, with its log-likelihood and KL parts.

    One z sample per datapoint (MC_SAMPLES), drawn from a generator seeded with `seed`, so
    that every evaluation point scores its model with the same noise and the training
    random stream is left untouched.
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


# ---------------------------------------------------------------------------- training
def setting_seed(seed: int, method: str, latent_dim: int) -> int:
    """A run's own seed, derived from (seed, method, N_z) so that no run depends on another."""
    digest = hashlib.sha256(f"{seed}/{method}/{latent_dim}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def make_optimizers(vae: VAE, method: str, lr: float, fused: bool) -> list[torch.optim.Adagrad]:
    """Adagrad with the prior's weight decay: one for AEVB, decoder and encoder apart for WS."""
    groups = [list(vae.parameters())] if method == "aevb" else [list(vae.decoder.parameters()), encoder_parameters(vae)]
    kwargs = {"fused": True} if fused else {"foreach": True}
    return [torch.optim.Adagrad(g, lr=lr, weight_decay=WEIGHT_DECAY, **kwargs) for g in groups]


def aevb_step(vae: VAE, opts: list[torch.optim.Adagrad], x: torch.Tensor) -> torch.Tensor:
    """One SGVB step (estimator B: closed-form KL) on minibatch x; returns the loss, -ELBO."""
    (opt,) = opts
    opt.zero_grad(set_to_none=True)
    loss = vae.compute_loss(x, vae(x, S=MC_SAMPLES), likelihood="bernoulli").objective
    loss.backward()
    opt.step()
    return loss.detach()


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(log_var))) summed over the last dimension."""
    return -0.5 * (math.log(2 * math.pi) + log_var + (z - mu).pow(2) * torch.exp(-log_var)).sum(-1)


def wake_step(vae: VAE, opt: torch.optim.Adagrad, x: torch.Tensor) -> torch.Tensor:
    """Wake phase: z ~ q(z|x) held fixed, the decoder climbs log p(x|z); returns -log p(x|z)."""
    with torch.no_grad():
        mu, log_var = vae.sampling_layer.get_params(vae.encoder(x))
        z = vae.sampling_layer.reparametrize(mu, log_var, S=MC_SAMPLES)
    logits = vae._decode(z).x_hat  # [B, S, 1, 28, 28]
    log_px_z = log_likelihood(x.unsqueeze(1).expand_as(logits), logits, likelihood="bernoulli")
    loss = -log_px_z.flatten(2).sum(-1).mean()  # per datapoint, averaged over the S samples
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


def wake_sleep_step(vae: VAE, opts: list[torch.optim.Adagrad], x: torch.Tensor) -> torch.Tensor:
    """One wake-sleep step on minibatch x (decoder, then encoder); returns the summed losses."""
    dec_opt, enc_opt = opts
    return wake_step(vae, dec_opt, x) + sleep_step(vae, enc_opt, len(x))


STEPS: dict[str, Callable[[VAE, list[torch.optim.Adagrad], torch.Tensor], torch.Tensor]] = {
    "aevb": aevb_step,
    "wake-sleep": wake_sleep_step,
}


def compiled_step(step: Callable[[torch.Tensor], torch.Tensor], vae: VAE, opts: list[torch.optim.Adagrad]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`step` under torch.compile; if compiling fails, a one-line notice and the eager step."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True  # the same random numbers as the eager step, from the same generator
    compiled = torch.compile(step)
    state: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def first_call(x: torch.Tensor) -> torch.Tensor:
        params = [p.detach().clone() for p in vae.parameters()]
        opt_states = [{k: v.clone() for k, v in st.items()} for o in opts for st in o.state.values()]
        rng = rng_state(x.device)
        try:
            out = compiled(x)
            state["fn"] = compiled
            return out
        except Exception as exc:  # a compiler problem must never end the run: undo, then go eager
            first_line = (str(exc).strip().splitlines() or [""])[0]
            print(f"notice: torch.compile failed ({type(exc).__name__}: {first_line}); training eagerly instead", flush=True)
            with torch.no_grad():
                for p, saved in zip(vae.parameters(), params):
                    p.copy_(saved)
                    p.grad = None
                for st, saved in zip((st for o in opts for st in o.state.values()), opt_states):
                    for k, v in saved.items():
                        st[k].copy_(v)
            set_rng_state(rng, x.device)
            state["fn"] = step
            return step(x)

    state["fn"] = first_call
    return lambda x: state["fn"](x)


def make_step(method: str, vae: VAE, lr: float, device: torch.device, compile_step: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.optim.Adagrad]]:
    """The training step for `method` (compiled when asked) and the optimisers it updates."""
    opts = make_optimizers(vae, method, lr, fused=device.type == "cpu" and not compile_step)
    step_fn = STEPS[method]

    def step(x: torch.Tensor) -> torch.Tensor:
        return step_fn(vae, opts, x)

    return (compiled_step(step, vae, opts) if compile_step else step), opts


def eval_schedule(target: int, batch_size: int = BATCH_SIZE, start: int = EVAL_START_SAMPLES, per_decade: int = EVALS_PER_DECADE) -> list[int]:
    """Sample counts to evaluate at: 10^(k / per_decade) in whole minibatches, ending at the target."""
    end = max(batch_size, round(target / batch_size) * batch_size)
    k = math.ceil(per_decade * math.log10(min(start, end)) - 1e-9)
    points = []
    while (s := 10 ** (k / per_decade)) < end:
        points.append(max(batch_size, round(s / batch_size) * batch_size))
        k += 1
    return sorted({p for p in points if p < end} | {end})


STOP_REQUEST: list[int] = []  # signals received; training stops at the next step boundary


def request_stop(signum: int, frame: object) -> None:
    """Signal handler: ask training to stop after the current step (further signals change nothing)."""
    if not STOP_REQUEST:
        STOP_REQUEST.append(signum)


class Interrupted(BaseException):
    """Training stopped on request (Ctrl-C or SIGTERM); `code` is the exit status, 128 + signal."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Batches:
    """Minibatches of a resident image tensor, from a fresh random permutation each epoch."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        self.images, self.batch_size = images, batch_size
        self.per_epoch = len(images) // batch_size  # the incomplete last batch of an epoch is dropped
        self.order: torch.Tensor | None = None
        self.pos = self.per_epoch

    def next(self) -> torch.Tensor:
        """The next minibatch, [batch_size, 1, 28, 28]."""
        if self.pos == self.per_epoch:
            perm = torch.randperm(len(self.images), device=self.images.device)
            self.order, self.pos = perm[: self.per_epoch * self.batch_size].view(self.per_epoch, self.batch_size), 0
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


def train_steps(step: Callable[[torch.Tensor], torch.Tensor], batches: Batches, schedule: Iterable[int], binarize: bool, samples: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Training steps from `samples` on; yields (samples, last loss) at each schedule point, or early on a stop request."""
    loss = torch.zeros(())
    for target in schedule:
        while samples < target:
            x = batches.next()
            loss = step(torch.bernoulli(x) if binarize else x)
            samples += batches.batch_size
            if STOP_REQUEST:
                yield samples, loss
                return
        yield samples, loss


@dataclass(frozen=True)
class Config:
    """Everything that defines a run; each field is a command-line flag defaulting to its constant."""

    latent_dims: tuple[int, ...] = LATENT_DIMS
    methods: tuple[str, ...] = METHODS
    samples: int = TARGET_TRAIN_SAMPLES
    eval_start: int = EVAL_START_SAMPLES
    evals_per_decade: int = EVALS_PER_DECADE
    lr: float | str = LEARNING_RATE
    lr_pilot_samples: int = LR_PILOT_SAMPLES
    batch_size: int = BATCH_SIZE
    hidden_size: int = HIDDEN_SIZE
    binarize: bool = USE_STOCHASTIC_BINARIZATION
    seed: int = SEED
    device: str = DEVICE
    threads: int = THREADS
    jobs: int = JOBS
    compile: str = COMPILE
    data_dir: str = DATA_DIR
    verify_data: bool = VERIFY_DATA
    out_dir: str = OUT_DIR
    plot_only: bool = False
    fresh: bool = False
    benchmark: bool = False
    benchmark_steps: int = BENCHMARK_STEPS


def schedule_of(cfg: Config) -> list[int]:
    """The evaluation points of every run of a configuration."""
    return eval_schedule(cfg.samples, cfg.batch_size, cfg.eval_start, cfg.evals_per_decade)


def fixed_constants() -> dict:
    """The constants that change the numbers but have no flag, as recorded in results and fingerprints."""
    return {"mc_samples": MC_SAMPLES, "weight_decay": WEIGHT_DECAY, "init_std": INIT_STD, "lr_candidates": list(LR_CANDIDATES), "eval_batch_size": EVAL_BATCH_SIZE}


def use_compile(cfg: Config) -> bool:
    """Whether training steps are compiled: "auto" compiles long runs on CUDA or with several threads.

    With one CPU thread per run, compiling was measured to gain nothing on the 2-core machine
    the README reports, while costing about 30 s per run.
    """
    if cfg.compile != "auto":
        return cfg.compile == "on"
    return cfg.samples >= COMPILE_MIN_SAMPLES and (resolve_device(cfg.device).type == "cuda" or threads_per_run(cfg) > 1)


def fmt_eval(method: str, latent_dim: int, e: dict) -> str:
    """One plain log line for an evaluation point."""
    return (
        f"[{method} N_z={latent_dim}] samples {e['samples']:>11,}  train ELBO {e['train_elbo']:9.3f}  "
        f"test ELBO {e['test_elbo']:9.3f}  (test log p(x|z) {e['test_log_likelihood']:9.3f}, KL {e['test_kl']:7.3f})  "
        f"{e['wall_seconds']:8.1f} s"
    )


def pick_lr(method: str, latent_dim: int, cfg: Config, data: Data, device: torch.device) -> tuple[float, dict[str, float]]:
    """The paper's step-size choice: the candidate whose short pilot reaches the best training ELBO."""
    scores: dict[str, float | None] = {}  # None: the pilot diverged (scored worst)
    for lr in LR_CANDIDATES:
        seed_everything(setting_seed(cfg.seed, method, latent_dim))
        vae = build_vae(latent_dim, cfg.hidden_size).to(device)
        step, _ = make_step(method, vae, lr, device, compile_step=False)
        pilot = eval_schedule(cfg.lr_pilot_samples, cfg.batch_size, cfg.lr_pilot_samples)
        for _, loss in train_steps(step, Batches(data.train, cfg.batch_size), pilot, cfg.binarize):
            pass
        if STOP_REQUEST:
            raise Interrupted(128 + STOP_REQUEST[0])
        score = evaluate_elbo(vae, data.train_eval, cfg.seed)["elbo"] if bool(torch.isfinite(loss)) else math.nan
        scores[repr(lr)] = score if math.isfinite(score) else None
        print(f"[{method} N_z={latent_dim}] pilot lr {lr}: train ELBO {score:.3f} after {pilot[-1]:,} samples", flush=True)
    best = max(LR_CANDIDATES, key=lambda lr: -math.inf if scores[repr(lr)] is None else scores[repr(lr)])  # type: ignore[operator]
    print(f"[{method} N_z={latent_dim}] chose lr {best}", flush=True)
    return best, scores


def train_run(method: str, latent_dim: int, cfg: Config, data: Data, device: torch.device, on_eval: Callable[[dict], None], progress: bool = True, store: "Checkpoints | None" = None) -> dict:
    """Train one (method, N_z) setting and evaluate it along the schedule; returns its run record.

    `on_eval` receives the record after every evaluation, so the caller can save it at once.
    With a checkpoint store, the run continues from its checkpoint if there is one, writes a
    new one at every evaluation and on a stop request, and drops it once the run is done.
    """
    ckpt = store.load(method, latent_dim) if store else None
    if ckpt is not None:
        run = ckpt["run"] | {"status": "running"}
    else:
        run = {"method": method, "latent_dim": latent_dim, "seed": setting_seed(cfg.seed, method, latent_dim), "status": "running", "evals": []}
        if cfg.lr == "auto":
            run["lr"], run["lr_pilot_scores"] = pick_lr(method, latent_dim, cfg, data, device)
        else:
            run["lr"] = float(cfg.lr)
    seed_everything(run["seed"])
    vae = build_vae(latent_dim, cfg.hidden_size).to(device)
    step, opts = make_step(method, vae, run["lr"], device, use_compile(cfg))
    batches, samples, wall_offset = Batches(data.train, cfg.batch_size), 0, 0.0
    if ckpt is not None:
        vae.load_state_dict(ckpt["model"])
        for opt, state in zip(opts, ckpt["optimizers"]):
            opt.load_state_dict(state)
        batches.load_state(ckpt["batches"])
        set_rng_state(ckpt["rng"], device)
        samples, wall_offset = ckpt["samples"], ckpt.get("wall_seconds", run["evals"][-1]["wall_seconds"] if run["evals"] else 0.0)
        print(f"[{method} N_z={latent_dim}] resumed from its checkpoint at {samples:,} samples", flush=True)

    def save_checkpoint() -> None:
        if store:
            store.save(method, latent_dim, {"run": copy.deepcopy(run), "samples": samples, "wall_seconds": time.perf_counter() - start, "model": vae.state_dict(),
                                            "optimizers": [o.state_dict() for o in opts], "batches": batches.state(), "rng": rng_state(device)})

    schedule = schedule_of(cfg)
    bar = tqdm(total=schedule[-1], initial=samples, unit="samples", unit_scale=True, desc=f"{method} N_z={latent_dim}", disable=None if progress else True, mininterval=1.0, leave=False)
    start = time.perf_counter() - wall_offset
    done = samples
    for samples, loss in train_steps(step, batches, [p for p in schedule if p > samples], cfg.binarize, samples):
        bar.update(samples - done)
        done = samples
        if samples in schedule:
            train_m = evaluate_elbo(vae, data.train_eval, cfg.seed)
            test_m = evaluate_elbo(vae, data.test_eval, cfg.seed)
            values = [*train_m.values(), *test_m.values(), float(loss)]
            if not all(math.isfinite(v) for v in values):
                run["status"], run["diverged_at"] = "diverged", samples
                tqdm.write(f"warning: [{method} N_z={latent_dim}] diverged (non-finite loss or ELBO) at {samples:,} samples; this run stops here, its last good checkpoint is kept", file=sys.stderr)
                break
            e = {
                "samples": samples,
                "train_elbo": train_m["elbo"], "test_elbo": test_m["elbo"],
                "train_log_likelihood": train_m["log_likelihood"], "train_kl": train_m["kl"],
                "test_log_likelihood": test_m["log_likelihood"], "test_kl": test_m["kl"],
                "wall_seconds": time.perf_counter() - start,
            }
            run["evals"].append(e)
            bar.set_postfix(test_elbo=f"{e['test_elbo']:.2f}")
            if progress:
                tqdm.write(fmt_eval(method, latent_dim, e))
        if STOP_REQUEST or samples in schedule:
            save_checkpoint()  # written before the JSON: a kill in between loses nothing
            on_eval(run)
        if STOP_REQUEST:
            bar.close()
            raise Interrupted(128 + STOP_REQUEST[0])
    else:
        run["status"] = "done"
        if store:
            store.remove(method, latent_dim)
    bar.close()
    on_eval(run)
    return run


def rng_state(device: torch.device) -> dict:
    """Python, numpy and torch (CPU, and CUDA when used) random states, as plain tensors and lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what rng_state() took."""
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_atomic(path: str, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write a file through `write` so that a reader, or a kill at any instant, finds the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # the permissions of a plainly written file, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, worded as one line for the user."""


@dataclass(frozen=True)
class Checkpoints:
    """One checkpoint file per (method, N_z) run under OUT_DIR/checkpoints/, tied to a fingerprint."""

    folder: str
    fingerprint: dict

    def path(self, method: str, latent_dim: int) -> str:
        """Where the checkpoint of one run lives."""
        return os.path.join(self.folder, f"{method}_nz{latent_dim}.pt")

    def save(self, method: str, latent_dim: int, state: dict) -> None:
        """Write a checkpoint atomically: a kill at any instant leaves the old file or the new one."""
        os.makedirs(self.folder, exist_ok=True)
        write_atomic(self.path(method, latent_dim), lambda f: torch.save({"fingerprint": self.fingerprint} | state, f))

    def load(self, method: str, latent_dim: int) -> dict | None:
        """The run's checkpoint, None if it has none; CheckpointError if unreadable or from other settings."""
        path = self.path(method, latent_dim)
        if not os.path.exists(path):
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            fingerprint = state["fingerprint"]
        except Exception as exc:  # truncated, foreign or corrupt: say which file and why
            raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}); pass --fresh to start over (the old files are kept aside)") from None
        if fingerprint != self.fingerprint:
            raise CheckpointError(f"checkpoint {path} was made with other settings: {fingerprint_difference(fingerprint, self.fingerprint)}; pass --fresh to start over, or use another --out-dir")
        return state

    def remove(self, method: str, latent_dim: int) -> None:
        """Drop a finished run's checkpoint: its evaluations are all in the JSON."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(method, latent_dim))


def fingerprint(cfg: Config, data: Data, device: torch.device) -> dict:
    """Everything that changes a run's numbers: settings, constants, data and package versions."""
    import pyautoencoder

    return {
        "samples": cfg.samples, "eval_start": cfg.eval_start, "evals_per_decade": cfg.evals_per_decade, "lr": cfg.lr,
        "lr_pilot_samples": cfg.lr_pilot_samples, "batch_size": cfg.batch_size,
        "hidden_size": cfg.hidden_size, "binarize": cfg.binarize, "seed": cfg.seed, "device": device.type,
        "threads": threads_per_run(cfg), "compiled": use_compile(cfg), **fixed_constants(), "data_sha256": data.digest,
        "torch": str(torch.__version__), "torchvision": str(torchvision.__version__), "pyautoencoder": str(pyautoencoder.__version__), "numpy": str(np.__version__),
    }


def fingerprint_difference(old: dict, new: dict) -> str:
    """The settings that differ between two fingerprints, as 'name old -> new'."""
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "none"


# ---------------------------------------------------------------------------- running every setting
def settings_of(cfg: Config) -> list[tuple[str, int]]:
    """The (method, N_z) runs of a configuration, in figure order."""
    return [(m, d) for m in cfg.methods for d in cfg.latent_dims]


def resolve_device(name: str) -> torch.device:
    """The torch device for "auto", "cpu" or "cuda"."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_count() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_run(cfg: Config) -> int:
    """Torch CPU threads for each run: --threads, or the cores shared among the jobs."""
    return cfg.threads or max(1, cpu_count() // cfg.jobs)


FINISHED = ("done", "diverged")  # statuses of runs that a rerun skips


def _worker(cfg: Config, method: str, latent_dim: int, store: Checkpoints | None, messages: "multiprocessing.Queue") -> None:
    """One (method, N_z) run in its own process; its records and any error go back through `messages`."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    try:
        torch.set_num_threads(threads_per_run(cfg))
        device = resolve_device(cfg.device)
        data = load_data(cfg.data_dir, device, cfg.binarize, cfg.seed, verify=cfg.verify_data)
        train_run(method, latent_dim, cfg, data, device, lambda run: messages.put(("run", copy.deepcopy(run))), progress=False, store=store)
    except Interrupted:
        pass  # its checkpoint and record are already written and sent
    except Exception as exc:
        messages.put(("error", (method, latent_dim), f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        sys.exit(1)


def run_all(cfg: Config, data: Data, device: torch.device, results: dict, save: Callable[[], None], store: Checkpoints | None = None) -> None:
    """Train every unfinished (method, N_z) setting, here or in cfg.jobs worker processes, saving after each evaluation."""
    runs = {(r["method"], r["latent_dim"]): r for r in results["runs"]}
    todo = [key for key in settings_of(cfg) if runs[key]["status"] not in FINISHED]
    for method, latent_dim in settings_of(cfg):
        if (method, latent_dim) not in todo:
            print(f"[{method} N_z={latent_dim}] already {runs[(method, latent_dim)]['status']}: skipped", flush=True)

    def update(run: dict) -> None:
        runs[(run["method"], run["latent_dim"])].update(run)
        save()

    if cfg.jobs == 1 or len(todo) <= 1:
        for method, latent_dim in todo:
            runs[(method, latent_dim)]["status"] = "running"
            try:
                train_run(method, latent_dim, cfg, data, device, update, store=store)
            except Exception as exc:  # one broken run must not cost the others
                fail(runs[(method, latent_dim)], f"{type(exc).__name__}: {exc}", traceback.format_exc())
                save()
        return
    total = schedule_of(cfg)[-1]
    Workers(cfg, store, runs, update, save, total).run(todo)
    if STOP_REQUEST:
        raise Interrupted(128 + STOP_REQUEST[0])


class Workers:
    """Runs settings in up to cfg.jobs worker processes, one process per setting.

    Each worker sends its run record after every evaluation; the main process saves it and
    advances that setting's progress bar. A worker that raises, or dies outright (a crash, an
    out-of-memory kill), marks only its own run as failed; the others go on. On a stop request
    no new worker starts and the running ones get the same signal, so each writes its
    checkpoint at a step boundary and stops.
    """

    def __init__(self, cfg: Config, store: Checkpoints | None, runs: dict, update: Callable[[dict], None], save: Callable[[], None], total: int) -> None:
        self.cfg, self.store, self.runs, self.update, self.save, self.total = cfg, store, runs, update, save, total
        self.ctx = multiprocessing.get_context("spawn")
        self.messages = self.ctx.Queue()
        self.bars: dict[tuple[str, int], tqdm] = {}

    def run(self, todo: list[tuple[str, int]]) -> None:
        """Train the settings in `todo` until each has ended."""
        waiting, running, forwarded = list(todo), {}, False
        while waiting or running:
            if STOP_REQUEST and not forwarded:
                forwarded, waiting = True, []
                for process in running.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, STOP_REQUEST[0])
            while waiting and len(running) < self.cfg.jobs:
                key = waiting.pop(0)
                running[key] = self.ctx.Process(target=_worker, args=(self.cfg, *key, self.store, self.messages), name=f"{key[0]}-nz{key[1]}")
                running[key].start()
                self.runs[key]["status"] = "running"
            self.receive(timeout=0.2)
            for key, process in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                self.receive(timeout=0.5)  # what it sent before it ended
                while self.receive(timeout=0):
                    pass
                del running[key]
                if self.runs[key]["status"] == "running" and not STOP_REQUEST:  # after a stop request it is interrupted
                    fail(self.runs[key], f"its worker process ended with exit status {process.exitcode} before the run finished")
                    self.save()
        for bar in self.bars.values():
            bar.close()

    def receive(self, timeout: float) -> bool:
        """Handle one message from a worker; False if none came within `timeout`."""
        try:
            message = self.messages.get(timeout=timeout) if timeout else self.messages.get_nowait()
        except queue.Empty:
            return False
        if message[0] == "error":
            _, key, error, trace = message
            fail(self.runs[key], error, trace)
            self.save()
            return True
        run = message[1]
        key, last = (run["method"], run["latent_dim"]), run["evals"][-1] if run["evals"] else None
        if key not in self.bars:
            self.bars[key] = tqdm(total=self.total, unit="samples", unit_scale=True, desc=f"{key[0]} N_z={key[1]}", position=len(self.bars), disable=None, leave=False)
        if last and last not in self.runs[key]["evals"]:
            tqdm.write(fmt_eval(*key, last))
            self.bars[key].update(last["samples"] - self.bars[key].n)
            self.bars[key].set_postfix(test_elbo=f"{last['test_elbo']:.2f}")
        self.update(run)
        return True


def fail(run: dict, error: str, trace: str = "") -> None:
    """Mark a run as failed, keeping what it measured, and say so."""
    run["status"], run["error"] = "failed", error
    if trace:
        print(trace, file=sys.stderr, end="")
    print(f"error: [{run['method']} N_z={run['latent_dim']}] failed: {error}; the other runs go on", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- plotting
def plot_results(results: dict, path: str) -> plt.Figure:
    """Draw Figure 2 from a results dict: one panel per N_z, train solid, test dashed; save it to `path`."""
    runs = [r for r in results["runs"] if r["evals"]]
    dims = list(dict.fromkeys(r["latent_dim"] for r in results["runs"]))
    fig, axes = plt.subplots(1, max(1, len(dims)), figsize=(3.0 * max(1, len(dims)), 3.3), sharey=True, squeeze=False)
    values, xs_all = [], []
    for ax, nz in zip(axes[0], dims):
        for run in (r for r in runs if r["latent_dim"] == nz):
            label, colour = METHOD_STYLE.get(run["method"], (run["method"], None))
            xs = [e["samples"] for e in run["evals"]]
            for split, style in (("train", "-"), ("test", "--")):
                ys = [e[f"{split}_elbo"] for e in run["evals"]]
                ax.plot(xs, ys, style, color=colour, linewidth=1.2, label=f"{label} ({split})")
                values += ys
            xs_all += xs
        ax.set_xscale("log")
        ax.set_title(f"MNIST, $N_z = {nz}$")
        ax.set_xlabel("# Training samples evaluated")
        ax.grid(True, which="major", alpha=0.3)
        if ax.lines:
            ax.legend(loc="lower right", fontsize=7)
    axes[0][0].set_ylabel(r"$\mathcal{L}$")
    lo, hi = PAPER_YLIM
    if values:
        span = max(values) - min(values)
        lo, hi = min(lo, min(values) - 0.03 * span), max(hi, max(values) + 0.03 * span)
    axes[0][0].set_ylim(lo, hi)
    x_lo, x_hi = PAPER_XLIM
    if xs_all:
        x_lo, x_hi = min(x_lo, min(xs_all) / 1.2), max(x_hi, max(xs_all) * 1.2)
    for ax in axes[0]:
        ax.set_xlim(x_lo, x_hi)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def results_table(results: dict) -> str:
    """The final train and test ELBO of every run, as a Markdown table."""
    lines = ["| method | N_z | samples | train ELBO | test ELBO | status |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results["runs"]:
        e = r["evals"][-1] if r["evals"] else None
        cells = [f"{e['samples']:,}", f"{e['train_elbo']:.2f}", f"{e['test_elbo']:.2f}"] if e else ["-", "-", "-"]
        lines.append(f"| {METHOD_STYLE.get(r['method'], (r['method'],))[0]} | {r['latent_dim']} | {' | '.join(cells)} | {r['status']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- results file
def write_json_atomic(obj: dict, path: str) -> None:
    """Write `obj` as JSON to `path`, atomically."""
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def environment(device: torch.device, threads: int) -> dict:
    """Versions and machine facts that a reader of the results needs."""
    import pyautoencoder

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "pyautoencoder": pyautoencoder.__version__, "numpy": np.__version__, "matplotlib": matplotlib.__version__,
        "platform": platform.platform(), "device": str(device), "device_name": name, "cpu_count": cpu_count(),
        "threads": threads, "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def new_results(cfg: Config, device: torch.device) -> dict:
    """The results skeleton: config as used, environment, one pending run per setting."""
    config = asdict(cfg) | fixed_constants() | {"compiled": use_compile(cfg), "eval_schedule": schedule_of(cfg)}
    runs = [{"method": m, "latent_dim": d, "status": "pending", "evals": []} for m, d in settings_of(cfg)]
    return {"config": config, "environment": environment(device, threads_per_run(cfg)), "runs": runs}


# ---------------------------------------------------------------------------- benchmark
def flops_per_training_sample(latent_dim: int, hidden_size: int = HIDDEN_SIZE) -> float:
    """FLOPs of one SGVB training step per sample: 2 x multiply-adds of the forward pass x 2.5."""
    macs = 784 * hidden_size + hidden_size * 2 * latent_dim + latent_dim * hidden_size + hidden_size * 784
    return 2 * macs * 2.5


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a size x size float32 matrix product on `device` (median of `repeats`)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        float((a @ b)[0, 0])  # the read synchronises a GPU
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times[1:]) / 1e9


def windows_per_second(batches: Iterator[object], steps: int, windows: int, batch_size: int) -> float:
    """Median training samples/s over `windows` windows of `steps` steps, after one warm-up window.

    `batches` runs one training step per item and yields something whose float() waits for it.
    """
    rates = []
    for w in range(windows + 1):
        start = time.perf_counter()
        for _ in range(steps):
            last = next(batches)
        float(last)  # type: ignore[arg-type]
        if w:
            rates.append(steps * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


class _ToTensorImages(torch.utils.data.Dataset):
    """Synthetic uint8 images served one at a time through transforms.ToTensor, as MNIST would be."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.to_tensor = images.squeeze(1).numpy(), torchvision.transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.to_tensor(self.images[i]), 0


def dataloader_steps(cfg: Config, device: torch.device, real: bool) -> Iterator[torch.Tensor]:
    """The pyautoencoder example's loop: DataLoader over MNIST with ToTensor, batch 100, shuffled."""
    to_tensor = torchvision.transforms.ToTensor()
    if real:
        dataset: torch.utils.data.Dataset = torchvision.datasets.MNIST(cfg.data_dir, train=True, transform=to_tensor)
    else:
        dataset = _ToTensorImages((torch.rand(60_000, 1, 28, 28) * 255).to(torch.uint8))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    seed_everything(cfg.seed)
    vae = build_vae(20, cfg.hidden_size).to(device)
    opt = torch.optim.Adagrad(vae.parameters(), lr=float(LEARNING_RATE), weight_decay=WEIGHT_DECAY)
    while True:
        for x, _ in loader:
            x = x.to(device)
            opt.zero_grad()
            loss = vae.compute_loss(x, vae(x), likelihood="bernoulli").objective
            loss.backward()
            opt.step()
            yield loss.detach()


def benchmark(cfg: Config, device: torch.device, steps: int, windows: int = BENCHMARK_WINDOWS) -> dict[str, float | str]:
    """Measure and print training speed, the DataLoader baseline, evaluation time, efficiency and memory (N_z = 20)."""
    try:
        data, source = load_data(cfg.data_dir, device, False, cfg.seed, verify=cfg.verify_data, download=False), "real MNIST"
    except DataError:
        train, test = torch.rand(60_000, 1, 28, 28, device=device), torch.rand(10_000, 1, 28, 28, device=device)
        data, source = Data(train, train, test), f"synthetic data of MNIST's shape (no MNIST under {cfg.data_dir})"
    compiled = use_compile(replace(cfg, samples=max(cfg.samples, COMPILE_MIN_SAMPLES)))
    print(f"benchmark: N_z = 20, batch {cfg.batch_size}, {source}, {device}, {torch.get_num_threads()} threads, step {'compiled' if compiled else 'eager'}", flush=True)
    gflops = matmul_gflops(device)
    seed_everything(cfg.seed)
    vae = build_vae(20, cfg.hidden_size).to(device)
    step, _ = make_step("aevb", vae, float(LEARNING_RATE), device, compiled)
    every_step = itertools.count(cfg.batch_size, cfg.batch_size)
    ours_steps = (loss for _, loss in train_steps(step, Batches(data.train, cfg.batch_size), every_step, False))
    ours = windows_per_second(ours_steps, steps, windows, cfg.batch_size)
    baseline = windows_per_second(dataloader_steps(cfg, device, source == "real MNIST"), steps, windows, cfg.batch_size)
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
        "data": source, "training samples/s (ours)": ours, "training samples/s (DataLoader loop)": baseline,
        "ratio ours / DataLoader": ours / baseline, "seconds per full evaluation (60,000 + 10,000)": statistics.median(eval_times),
        "matmul 2048 GFLOP/s": gflops, "training GFLOP/s": achieved, "efficiency (training / matmul)": achieved / gflops,
        "peak resident memory MiB": peak,
    }
    if device.type == "cuda":
        result["peak CUDA memory MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["training steps/s (ours)"] = ours / cfg.batch_size
    for key, value in result.items():
        print(f"  {key:<48} {value:,.3f}" if isinstance(value, float) else f"  {key:<48} {value}")
    return result


# ---------------------------------------------------------------------------- command line
def positive(kind: type) -> Callable[[str], int | float]:
    """An argparse type for a positive int or float."""

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
    """An argparse type for a sample count written as 1000000 or 1e6."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of samples (write 1e6 or 1000000)") from None
    if not math.isfinite(value) or value != int(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number of samples")
    return int(value)


def learning_rate(text: str) -> float | str:
    """An argparse type for Adagrad's step size: a positive number or "auto"."""
    return "auto" if text == "auto" else positive(float)(text)


def build_parser() -> argparse.ArgumentParser:
    """The command line, every default taken from the constants at the top of this file."""
    d = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--latent-dims", type=positive(int), nargs="+", default=list(d.latent_dims), metavar="N_Z", help="latent sizes, one panel each")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(d.methods), help="training algorithms")
    p.add_argument("--samples", type=sample_count, default=d.samples, help="training samples per run (1e6 or 1000000)")
    p.add_argument("--eval-start", type=sample_count, default=d.eval_start, help="first evaluation point, in samples")
    p.add_argument("--evals-per-decade", type=positive(int), default=d.evals_per_decade, help="evaluation points per decade of samples")
    p.add_argument("--lr", type=learning_rate, default=d.lr, help=f"Adagrad step size, or 'auto' to pick from {list(LR_CANDIDATES)}")
    p.add_argument("--lr-pilot-samples", type=sample_count, default=d.lr_pilot_samples, help="samples per pilot run with --lr auto")
    p.add_argument("--batch-size", type=positive(int), default=d.batch_size, help="minibatch size")
    p.add_argument("--hidden-size", type=positive(int), default=d.hidden_size, help="hidden units of encoder and decoder")
    p.add_argument("--seed", type=int, default=d.seed, help="master random seed")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device, help="where to train")
    p.add_argument("--data-dir", default=d.data_dir, help="folder that holds MNIST/raw/")
    p.add_argument("--verify-data", action=argparse.BooleanOptionalAction, default=d.verify_data, help="check the files against the standard MNIST checksums")
    p.add_argument("--out-dir", default=d.out_dir, help="folder for the PNG and JSON")
    p.add_argument("--binarize", action=argparse.BooleanOptionalAction, default=d.binarize, help="stochastic binarization of the images")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads per run (0: cores / jobs)")
    p.add_argument("--jobs", type=positive(int), default=d.jobs, help="runs trained side by side in worker processes")
    p.add_argument("--compile", choices=["auto", "on", "off"], default=d.compile, help=f"torch.compile the training step (auto: runs of at least {COMPILE_MIN_SAMPLES:,} samples)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON in --out-dir, no training")
    p.add_argument("--fresh", action="store_true", help="start over: keep the earlier results and checkpoints aside instead of continuing them")
    p.add_argument("--benchmark", action="store_true", help="print training and evaluation speed for N_z = 20, no training run")
    p.add_argument("--benchmark-steps", type=positive(int), default=BENCHMARK_STEPS, help="steps per timing window of --benchmark")
    return p


def check_out_dir(path: str) -> str | None:
    """None if `path` can be created and written, else why not."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"--out-dir {path!r} cannot be created or written ({exc.strerror or exc}); choose another folder"
    return None


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse and check the command line; bad values end here with argparse's error and status 2."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.samples < a.batch_size:
        parser.error(f"--samples {a.samples} is less than one minibatch ({a.batch_size}); ask for at least {a.batch_size}")
    if a.lr == "auto" and a.lr_pilot_samples < a.batch_size:
        parser.error(f"--lr-pilot-samples {a.lr_pilot_samples} is less than one minibatch ({a.batch_size})")
    if a.threads < 0:
        parser.error(f"--threads {a.threads} is negative; use 0 for cores / jobs, or a positive count")
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available here; use --device cpu or auto")
    if (problem := check_out_dir(a.out_dir)) is not None:
        parser.error(problem)
    return Config(
        latent_dims=tuple(dict.fromkeys(a.latent_dims)), methods=tuple(dict.fromkeys(a.methods)), samples=a.samples,
        eval_start=a.eval_start, evals_per_decade=a.evals_per_decade, lr=a.lr, lr_pilot_samples=a.lr_pilot_samples,
        batch_size=a.batch_size, hidden_size=a.hidden_size, binarize=a.binarize, seed=a.seed, device=a.device,
        threads=a.threads, jobs=a.jobs, compile=a.compile, data_dir=a.data_dir, verify_data=a.verify_data, out_dir=a.out_dir,
        plot_only=a.plot_only, fresh=a.fresh, benchmark=a.benchmark, benchmark_steps=a.benchmark_steps,
    )


# ---------------------------------------------------------------------------- main
def keep_aside(path: str) -> None:
    """Move an earlier results file or checkpoint folder out of the way (time-stamped) rather than delete it."""
    if os.path.exists(path):
        stem, ext = os.path.splitext(path)
        aside = f"{stem}.{time.strftime('%Y%m%d-%H%M%S', time.localtime(os.path.getmtime(path)))}{ext}"
        os.replace(path, aside)
        print(f"kept {path} aside as {aside}")


def resume_results(cfg: Config, device: torch.device, fp: dict, json_path: str, store: Checkpoints) -> dict:
    """The results to continue: the earlier file's runs when made with the same fingerprint, else new ones.

    Raises CheckpointError, naming the file and the differing settings, when the earlier results
    or a checkpoint cannot be used.
    """
    results = new_results(cfg, device) | {"fingerprint": fp}
    old = None
    if os.path.exists(json_path):
        try:
            with open(json_path) as f:
                old = json.load(f)
        except ValueError:
            raise CheckpointError(f"{json_path} cannot be read; pass --fresh to start over (the old files are kept aside)") from None
        if old.get("fingerprint") != fp:
            raise CheckpointError(
                f"{json_path} was made with other settings: {fingerprint_difference(old.get('fingerprint') or {}, fp)}; "
                "pass --fresh to start over (the old files are kept aside), or use another --out-dir"
            )
    for method, latent_dim in settings_of(cfg):
        store.load(method, latent_dim)  # refuses an unreadable or foreign checkpoint before any work
    if old:
        earlier = {(r["method"], r["latent_dim"]): r for r in old["runs"]}
        now = [earlier.pop((r["method"], r["latent_dim"]), r) for r in results["runs"]]
        results["runs"] = now + list(earlier.values())  # runs of other settings stay in the file
    return results


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load MNIST, train every setting, save the JSON and draw the figure."""
    cfg = parse_config(argv)
    json_path, png_path = os.path.join(cfg.out_dir, RESULTS_NAME), os.path.join(cfg.out_dir, FIGURE_NAME)
    if cfg.plot_only:
        try:
            with open(json_path) as f:
                results = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"error: cannot read {json_path} ({exc}); run the training first or point --out-dir at its folder", file=sys.stderr)
            return 2
        plt.close(plot_results(results, png_path))
        print(f"figure: {png_path}")
        return 0
    device = resolve_device(cfg.device)
    torch.set_num_threads(threads_per_run(cfg))
    if cfg.benchmark:  # one run: all cores unless --threads says otherwise
        torch.set_num_threads(cfg.threads or cpu_count())
        benchmark(replace(cfg, jobs=1, threads=torch.get_num_threads()), device, cfg.benchmark_steps)
        return 0
    try:
        data = load_data(cfg.data_dir, device, cfg.binarize, cfg.seed, verify=cfg.verify_data)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if len(data.train) < cfg.batch_size:
        print(f"error: the training set holds {len(data.train)} images, fewer than one minibatch ({cfg.batch_size})", file=sys.stderr)
        return 1
    store = Checkpoints(os.path.join(cfg.out_dir, "checkpoints"), fingerprint(cfg, data, device))
    if cfg.fresh:
        keep_aside(json_path)
        keep_aside(store.folder)
    try:
        results = resume_results(cfg, device, store.fingerprint, json_path, store)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"training {len(settings_of(cfg))} runs of {cfg.samples:,} samples on {device} ({threads_per_run(cfg)} threads per run, {cfg.jobs} job(s)); results: {json_path}", flush=True)
    STOP_REQUEST.clear()
    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            run_all(cfg, data, device, results, lambda: write_json_atomic(results, json_path), store)
            code = 3 if any(r["status"] != "done" for r in results["runs"]) else 0
        except Interrupted as exc:
            code = exc.code
            for r in results["runs"]:
                if r["status"] == "running":
                    r["status"] = "interrupted"
        write_json_atomic(results, json_path)  # still under request_stop: a second Ctrl-C cannot break it
        plt.close(plot_results(results, png_path))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print(results_table(results))
    print(f"figure: {png_path}\nresults: {json_path}")
    if code >= 128:
        print(f"stopped by signal {code - 128}: checkpoints are in {store.folder}; run the same command again to continue", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
