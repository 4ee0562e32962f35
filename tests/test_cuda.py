"""The CUDA path: the CPU tests' guarantees on a GPU. Skipped, with the reason, without one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import benchmark
import pytest
import torch
from conftest import (
    ROOT,
    hand_elbo,
    measured,
    resumable_args,
    step_counters,
    stop_at_first_checkpoint,
    tiny_config,
    without_wall,
)

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
    torch.manual_seed(11)  # the evaluator's noise, drawn by the GPU's generator
    ll, kl = hand_elbo(vae, x, torch.randn(len(x), 1, 2, device=CUDA).squeeze(1))
    assert got["elbo"] == pytest.approx(ll - kl, rel=1e-5)
    assert got["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-5)


def cuda_runs(cfg: rf.Config, data: rf.Data, keys: list[rf.RunKey]) -> list[rf.Run]:
    """Fresh runs of `keys` on the GPU."""
    return [rf.start_run(key, cfg, data, None) for key in keys]


def evals_of(run: rf.Run) -> list[dict]:
    """A run's evaluations without their wall-clock times."""
    return [without_wall(e) for e in run.record["evals"]]


@pytest.mark.parametrize("method", rf.METHODS)
def test_cuda_graphs_train_and_raise_the_elbo(synthetic_data: rf.Data, method: str) -> None:
    data, cfg = on_cuda(synthetic_data), tiny_config(methods=(method,), device="cuda")
    (run,) = cuda_runs(cfg, data, [rf.RunKey(method, 3)])
    start = rf.evaluate_elbo(run.vae, data.train_eval, cfg.seed)["elbo"]
    engine = rf.CudaGraphs(steps=7)
    assert rf.train([run], cfg, data, lambda run: None, engine.advance)
    assert set(engine.graphs[id(run)].graphs) == {7, 1}  # the long graph and the one-step
    assert run.status == "done" and run.record["evals"][-1]["train_elbo"] > start + 100


def same_evals(got: list[dict], want: list[dict], rel: float = 1e-6) -> None:
    """Two runs' evaluations agree point by point (one record at a time: pytest.approx takes
    no lists of dicts)."""
    assert [e["samples"] for e in got] == [e["samples"] for e in want]
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=rel)


def test_cuda_graphs_give_the_eager_steps_numbers(synthetic_data: rf.Data) -> None:
    data = on_cuda(synthetic_data)
    cfg = tiny_config(methods=rf.METHODS, device="cuda", samples=2500)  # crosses epochs
    keys = [rf.RunKey("aevb", 3), rf.RunKey("wake-sleep", 3)]
    graphed, eager = cuda_runs(cfg, data, keys), cuda_runs(cfg, data, keys)
    assert rf.train(graphed, cfg, data, lambda run: None, rf.CudaGraphs(steps=7).advance)
    assert rf.train(eager, cfg, data, lambda run: None, rf.advance_eagerly)
    for g, e in zip(graphed, eager, strict=True):
        same_evals(evals_of(g), evals_of(e))
        assert step_counters(g) == step_counters(e) == [50.0] * len(step_counters(e))


def test_cuda_a_run_beside_nine_others_gives_its_numbers_alone(synthetic_data: rf.Data) -> None:
    data = on_cuda(synthetic_data)
    cfg = tiny_config(methods=rf.METHODS, latent_dims=(2, 3, 5, 8, 20), device="cuda")
    together = cuda_runs(cfg, data, rf.runs_of(cfg))
    assert rf.train(together, cfg, data, lambda run: None, rf.CudaGraphs(steps=7).advance)
    for run in together:
        (alone,) = cuda_runs(cfg, data, [run.key])
        assert rf.train([alone], cfg, data, lambda run: None, rf.CudaGraphs(steps=7).advance)
        assert evals_of(alone) == evals_of(run), run.key.name


SYNC_IN_CAPTURE = """
import sys
sys.path.insert(0, {root!r})
import reproduce_fig2 as rf

capture_graphs = rf.CudaGraphs.capture_graphs

def syncing_capture(self, run, saved):
    step = run.step

    def syncing():
        loss = step()
        float(loss)  # a host synchronisation, which a capture cannot hold
        return loss

    run.step = syncing
    return capture_graphs(self, run, saved)

rf.CudaGraphs.capture_graphs = syncing_capture
sys.exit(rf.main(sys.argv[1:]))
"""


def test_cuda_a_failed_capture_stops_in_one_line_and_graph_steps_0_trains(
    mnist_dir: Path, tmp_path: Path
) -> None:
    # in a process of its own: a capture that fails partway can leave torch's generators
    # marked as capturing, which the invocation does not outlive
    script = tmp_path / "sync_in_capture.py"
    script.write_text(SYNC_IN_CAPTURE.format(root=str(ROOT)))
    out, args = tmp_path / "out", ["--device", "cuda", "--graph-steps", "3"]  # an epoch: 8
    failed = subprocess.run(
        [sys.executable, str(script), *resumable_args(mnist_dir, out, *args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == 1, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr
    # its wording is test_numbers' (over stand-in graphs); here: it stops main before any file
    assert errors[0].startswith("error: [aevb N_z=2] its training step could not be captured")
    assert not list(out.glob("runs/*.json")) and not list(out.glob("checkpoints/*.pt"))
    assert rf.main(resumable_args(mnist_dir, out, *args, "--graph-steps", "0")) == 0
    assert rf.main(resumable_args(mnist_dir, tmp_path / "graphs", *args)) == 0
    (*_, eager), (*_, graphs) = (
        measured(folder / rf.RESULTS_NAME)[0] for folder in (out, tmp_path / "graphs")
    )
    same_evals(eager, graphs)


def test_cuda_benchmark_names_the_gpu(mnist_dir: Path, tmp_path: Path) -> None:
    argv = ["--steps", "60", "--data-dir", str(mnist_dir), "--no-verify-data", "--device", "cuda"]
    assert benchmark.main([*argv, "--json", str(tmp_path / "b.json")]) == 0
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["gpu"] == torch.cuda.get_device_name() and saved["steps_per_s_all_runs"] > 0


def test_cuda_sigint_then_resume_gives_the_uninterrupted_numbers(
    mnist_dir: Path, tmp_path: Path
) -> None:
    # identical is expected (no atomics in these kernels); 1e-6 relative is what the test allows
    args = ["--device", "cuda", "--graph-steps", "3"]  # an epoch is 8 steps: long graphs too
    assert rf.main(resumable_args(mnist_dir, tmp_path / "reference", *args)) == 0
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "aevb_nz2.pt"
    assert (
        stop_at_first_checkpoint(resumable_args(mnist_dir, out, *args), ckpt, signal.SIGINT)[0]
        == 130
    )
    assert rf.main(resumable_args(mnist_dir, out, *args)) == 0
    (*_, got), (*_, want) = (
        measured(out / rf.RESULTS_NAME)[0],
        measured(tmp_path / "reference" / rf.RESULTS_NAME)[0],
    )
    same_evals(got, want)


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
