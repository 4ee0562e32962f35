#!/usr/bin/env python
"""How fast reproduce_fig2.py trains, beside two yardsticks (nanoGPT keeps bench.py beside
train.py the same way): one AEVB N_z = 20 run and every run of the figure in flight, on the
script's own engine (CUDA graphs on a GPU, eager steps on the CPU); the same AEVB step written
as plain PyTorch; the pyautoencoder example's DataLoader loop; one full evaluation; the
machine's matrix product and the peak memory. It prints every number and, with --json, writes
them.

    python tests/benchmark.py --data-dir ../shared/mnist [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reproduce_fig2 as rf  # importable once sys.path holds the script's folder

STEPS = 100  # training steps per timing window
WINDOWS = 5  # timing windows, after one warm-up window


def benchmark(
    cfg: rf.Config, device: torch.device, steps: int, json_path: str = ""
) -> dict[str, float | str | None]:
    """Measure and print the speed of the real engine (one AEVB N_z = 20 run, and every run of
    the configuration in flight), of the plain-PyTorch step and the DataLoader loop beside it,
    an evaluation, the machine's matrix product and the peak memory; JSON too if asked."""
    data, source = benchmark_data(cfg, device)
    threads = torch.get_num_threads()

    def timing_run(key: rf.RunKey) -> rf.Run:
        record = {"seed": rf.run_seed(cfg.seed, *key), "lr": cfg.timing_lr}
        return rf.new_run(key, record, cfg, data)

    one = [timing_run(rf.RunKey("aevb", 20))]
    every = [timing_run(key) for key in rf.runs_of(replace(cfg, seeds=1))]
    advance = rf.advance_on([*one, *every], cfg)  # CUDA graphs captured here, on a GPU
    graphed = advance is not rf.advance_eagerly
    step = f"CUDA graphs of {cfg.graph_steps} steps" if graphed else "eager steps"
    rf.log(f"benchmark: batch {cfg.batch_size}, {source}, {device}, {threads} threads, {step}")
    plain = plain_step(cfg, device, data.train)
    n = steps
    rates = steps_per_second(
        {
            "one run": (lambda: rf.advance_by(one, n, advance), n),
            "plain step": (lambda: plain(n), n),
            "all runs": (lambda: rf.advance_by(every, n, advance), n * len(every)),
            "DataLoader": (dataloader_steps(cfg, device, source, n), n),
        }
    )
    eval_s = statistics.median(
        rf.seconds_per_evaluation(one[0].vae, data, cfg.seed) for _ in range(3)
    )
    gflops = matmul_gflops(device)
    achieved = rates["one run"] * cfg.batch_size * flops_per_training_sample(20, cfg.hidden_size)
    result: dict[str, float | str | None] = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device_name": rf.environment(device)["device_name"],
        "torch": str(torch.__version__),
        "threads": threads,
        "data": source,
        "step": step,
        "steps_per_s_one_run": rates["one run"],
        "steps_per_s_plain_step": rates["plain step"],
        "ratio_one_run_to_plain_step": rates["one run"] / rates["plain step"],
        "steps_per_s_all_runs": rates["all runs"],
        "runs_in_flight": len(every),
        "steps_per_s_dataloader_loop": rates["DataLoader"],
        "ratio_one_run_to_dataloader_loop": rates["one run"] / rates["DataLoader"],
        "eval_seconds": eval_s,
        "matmul_2048_gflops": gflops,
        "training_gflops_one_run": achieved / 1e9,
        "efficiency_training_to_matmul": achieved / 1e9 / gflops,
        "peak_resident_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else None,
    }
    for key, value in result.items():
        rf.log(f"  {key:<36} {value:,.3f}" if isinstance(value, float) else f"  {key:<36} {value}")
    if json_path:
        rf.write_json_atomic(result, json_path)
        rf.log(f"  written to {json_path}")
    return result


def benchmark_data(cfg: rf.Config, device: torch.device) -> tuple[rf.Data, str]:
    """The images to time with and what they are: MNIST from --data-dir (checked, or not with
    --no-verify-data), else random images of MNIST's shape."""
    try:
        data = rf.load_data(cfg.data_dir, device, False, cfg.seed, cfg.verify_data, download=False)
    except rf.DataError:
        train = torch.rand(60_000, 1, 28, 28, device=device)
        return rf.Data(train, train, torch.rand(10_000, 1, 28, 28, device=device)), (
            f"random images of MNIST's shape (no MNIST under {cfg.data_dir})"
        )
    checked = "MNIST (checksums verified)" if cfg.verify_data else "unchecked MNIST-format files"
    return data, f"{checked} from {cfg.data_dir}"


def steps_per_second(timed: dict[str, tuple[Callable[[], Any], int]]) -> dict[str, float]:
    """Median steps/s of each (window, steps per window), timed in interleaved windows after a
    warm-up window, so that all of them see the same machine."""
    rates: dict[str, list[float]] = {name: [] for name in timed}
    for w in range(WINDOWS + 1):
        for name, (window, steps) in timed.items():
            start = time.perf_counter()
            window()
            if w:
                rates[name].append(steps / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def flops_per_training_sample(latent_dim: int, hidden_size: int) -> float:
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


def plain_step(
    cfg: rf.Config, device: torch.device, images: torch.Tensor
) -> Callable[[int], float]:
    """The yardstick: the AEVB step (N_z = 20) written as plain PyTorch, n steps per call.

    Four nn.Linear layers (one holds both Gaussian heads), tanh, the reparameterised sample,
    BCE with logits summed over pixels, the closed-form KL written out, Adagrad with the same
    weight decay (fused on the CPU), random minibatches of resident data.
    """
    h, nz = cfg.hidden_size, 20
    layers = [nn.Linear(784, h), nn.Linear(h, 2 * nz), nn.Linear(nz, h), nn.Linear(h, 784)]
    enc, head, dec1, dec2 = (layer.to(device) for layer in layers)
    params = [p for layer in (enc, head, dec1, dec2) for p in layer.parameters()]
    fused = {"fused": True} if device.type == "cpu" else {"foreach": True}
    opt = torch.optim.Adagrad(params, lr=cfg.timing_lr, weight_decay=rf.WEIGHT_DECAY, **fused)
    flat = rf.pixels(images).flatten(1)  # the plain way: the whole set as float32

    def steps(n: int) -> float:
        for _ in range(n):
            x = flat[torch.randint(len(flat), (cfg.batch_size,), device=device)]
            opt.zero_grad(set_to_none=True)
            mu, log_var = head(torch.tanh(enc(x))).chunk(2, dim=1)
            z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
            rec = binary_cross_entropy_with_logits(dec2(torch.tanh(dec1(z))), x, reduction="sum")
            loss = (rec + 0.5 * (log_var.exp() + mu.pow(2) - 1 - log_var).sum()) / len(x)
            loss.backward()
            opt.step()
        return float(loss.detach())  # waits for the device

    return steps


def dataloader_steps(
    cfg: rf.Config, device: torch.device, source: str, n: int
) -> Callable[[], float]:
    """The pyautoencoder example's loop (DataLoader, ToTensor per image, the library's
    compute_loss), n steps per call."""
    if source.startswith("random"):
        images = (torch.rand(60_000, 28, 28) * 255).to(torch.uint8)
        dataset: Any = torch.utils.data.TensorDataset(images.float().div(255).unsqueeze(1))
    else:
        to_tensor = torchvision.transforms.ToTensor()
        dataset = torchvision.datasets.MNIST(cfg.data_dir, train=True, transform=to_tensor)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True
    )
    vae = rf.build_vae(20, cfg.hidden_size).to(device)
    opt = torch.optim.Adagrad(vae.parameters(), lr=cfg.timing_lr, weight_decay=rf.WEIGHT_DECAY)
    batches = (batch[0] for _ in iter(int, 1) for batch in loader)

    def steps() -> float:
        for _ in range(n):
            x = next(batches).to(device)
            opt.zero_grad()
            loss = vae.compute_loss(x, vae(x), likelihood="bernoulli").objective
            loss.backward()
            opt.step()
        return float(loss.detach())

    return steps


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, time everything, print it (and write it as JSON if asked)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=rf.DATA_DIR, help="folder that holds MNIST/raw/")
    p.add_argument("--no-verify-data", action="store_true", help="skip MNIST's checksums")
    p.add_argument("--device", default=rf.DEVICE, choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core)")
    p.add_argument("--graph-steps", type=int, default=rf.GRAPH_STEPS, help="CUDA graph length")
    p.add_argument("--steps", type=int, default=STEPS, help="training steps per timing window")
    p.add_argument("--json", default="", help="also write the numbers as JSON to this file")
    a = p.parse_args(argv)
    cfg = rf.Config(
        data_dir=a.data_dir,
        verify_data=not a.no_verify_data,
        device=a.device,
        threads=a.threads,
        graph_steps=a.graph_steps,
    )
    torch.set_num_threads(a.threads or rf.cpu_count())
    benchmark(cfg, rf.resolve_device(a.device), a.steps, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
