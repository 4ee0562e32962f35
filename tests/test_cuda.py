"""The CUDA path: the CPU tests' guarantees on a GPU. Skipped, with the reason, without one."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import measured, tiny_args, tiny_config, train_n_z3
from test_machinery import resumable_args, stop_at_first_checkpoint

import reproduce_fig2 as rf

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none here"),
]
CUDA = torch.device("cuda")


def on_cuda(data: rf.Data) -> rf.Data:
    """The same images, resident on the GPU."""
    return rf.Data(data.train.to(CUDA), data.train_eval.to(CUDA), data.test_eval.to(CUDA))


def test_cuda_evaluator_equals_the_hand_computation(synthetic_data: rf.Data) -> None:
    torch.manual_seed(3)
    vae = rf.build_vae(latent_dim=2, hidden_size=8, init_std=0.3).to(CUDA)
    x = synthetic_data.test_eval.to(CUDA)
    got = rf.evaluate_elbo(vae, x, seed=11)
    d = {k: v.double().cpu() for k, v in vae.state_dict().items()}
    xf = x.flatten(1).double().cpu()
    h = torch.tanh(xf @ d["encoder.1.weight"].T + d["encoder.1.bias"])
    mu = h @ d["sampling_layer.mu.weight"].T + d["sampling_layer.mu.bias"]
    lv = h @ d["sampling_layer.log_var.weight"].T + d["sampling_layer.log_var.bias"]
    torch.manual_seed(11)  # the evaluator's noise, drawn by the GPU's generator
    eps = torch.randn(len(x), 1, 2, device=CUDA).squeeze(1).double().cpu()
    z = mu + torch.exp(0.5 * lv) * eps
    hidden = torch.tanh(z @ d["decoder.0.weight"].T + d["decoder.0.bias"])
    y = torch.sigmoid(hidden @ d["decoder.2.weight"].T + d["decoder.2.bias"])
    ll = (xf * torch.log(y) + (1 - xf) * torch.log(1 - y)).sum(1).mean()
    kl = (0.5 * (lv.exp() + mu**2 - 1 - lv)).sum(1).mean()
    assert got["elbo"] == pytest.approx(float(ll - kl), rel=1e-5)
    assert got["kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("method", rf.METHODS)
def test_cuda_training_raises_the_elbo(synthetic_data: rf.Data, method: str) -> None:
    data, cfg = on_cuda(synthetic_data), tiny_config(methods=(method,), device="cuda")
    start = rf.evaluate_elbo(rf.build_vae(3, cfg.hidden_size).to(CUDA), data.train_eval)["elbo"]
    run = train_n_z3(cfg, data, method, CUDA)
    assert run["status"] == "done" and run["evals"][-1]["train_elbo"] > start + 100


def test_cuda_fast_step_gives_the_eager_steps_numbers(synthetic_data: rf.Data) -> None:
    x = synthetic_data.train[:50].to(CUDA)

    def three_steps(compile_step: bool) -> list[float]:
        torch.manual_seed(0)
        vae = rf.build_vae(3, 16).to(CUDA)
        step, _ = rf.make_step("aevb", vae, 0.02, CUDA, compile_step=compile_step)
        losses = [float(step(x)) for _ in range(3)]
        return losses + [float(p.detach().sum()) for p in vae.parameters()]

    assert three_steps(True) == pytest.approx(three_steps(False), rel=1e-4, abs=1e-5)


def test_cuda_sigint_then_resume_gives_the_uninterrupted_numbers(
    mnist_dir: Path, tmp_path: Path
) -> None:
    # identical is expected (no atomics in these kernels); 1e-6 relative is what the test allows
    args = ["--device", "cuda"]
    assert rf.main(resumable_args(mnist_dir, tmp_path / "reference", *args)) == 0
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "aevb_nz2.pt"
    assert (
        stop_at_first_checkpoint(resumable_args(mnist_dir, out, *args), ckpt, signal.SIGINT)[0]
        == 130
    )
    assert rf.main(resumable_args(mnist_dir, out, *args)) == 0
    (_, _, _, got), (_, _, _, want) = (
        measured(out / rf.RESULTS_NAME)[0],
        measured(tmp_path / "reference" / rf.RESULTS_NAME)[0],
    )
    assert [e["samples"] for e in got] == [e["samples"] for e in want]
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-6)


def test_cuda_checkpoint_is_refused_on_the_cpu_with_one_line(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "aevb_nz2.pt"
    stop_at_first_checkpoint(
        resumable_args(mnist_dir, out, "--device", "cuda"), ckpt, signal.SIGINT
    )
    assert rf.main(resumable_args(mnist_dir, out, "--device", "cpu")) == 2
    err = capsys.readouterr().err
    assert (
        "device 'cuda' -> 'cpu'" in err and "--fresh" in err and len(err.strip().splitlines()) == 1
    )
    cpu_out = tmp_path / "cpu"
    stop_at_first_checkpoint(
        resumable_args(mnist_dir, cpu_out, "--device", "cpu"),
        cpu_out / "checkpoints" / "aevb_nz2.pt",
        signal.SIGINT,
    )
    assert rf.main(resumable_args(mnist_dir, cpu_out, "--device", "cuda")) == 2
    assert "device 'cpu' -> 'cuda'" in capsys.readouterr().err


def test_cuda_jobs_give_each_run_its_numbers_alone(mnist_dir: Path, tmp_path: Path) -> None:
    for jobs in ("1", "2"):
        args = tiny_args(mnist_dir, tmp_path / jobs, "--device", "cuda", "--jobs", jobs)
        assert rf.main(args) == 0
    assert measured(tmp_path / "1" / rf.RESULTS_NAME) == measured(tmp_path / "2" / rf.RESULTS_NAME)
    runs = json.loads((tmp_path / "2" / rf.RESULTS_NAME).read_text())["runs"]
    assert all(r["status"] == "done" for r in runs)
