"""Command line, main() end to end, results file, figure, reproducibility and --jobs."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch

import reproduce_fig2 as rf
from conftest import tiny_args


def measured(path: Path) -> list[tuple]:
    """Every evaluation value of a results file, wall-clock fields left out."""
    runs = json.loads(path.read_text())["runs"]
    return [(r["method"], r["latent_dim"], r["status"], [{k: v for k, v in e.items() if k != "wall_seconds"} for e in r["evals"]]) for r in runs]


def fake_results(methods: tuple[str, ...], dims: tuple[int, ...], low: float = -140.0) -> dict:
    runs = []
    for m in methods:
        for d in dims:
            evals = [{"samples": s, "train_elbo": low + i, "test_elbo": low + i - 1} for i, s in enumerate((100_000, 1_000_000, 10_000_000))]
            runs.append({"method": m, "latent_dim": d, "status": "done", "evals": evals})
    return {"config": {}, "environment": {}, "runs": runs}


def test_parser_defaults_are_the_constants() -> None:
    d = rf.build_parser().parse_args([])
    assert tuple(d.latent_dims) == rf.LATENT_DIMS and tuple(d.methods) == rf.METHODS
    assert (d.samples, d.lr, d.batch_size, d.hidden_size, d.seed) == (rf.TARGET_TRAIN_SAMPLES, rf.LEARNING_RATE, rf.BATCH_SIZE, rf.HIDDEN_SIZE, rf.SEED)
    assert (d.evals_per_decade, d.eval_start, d.data_dir, d.out_dir, d.binarize) == (rf.EVALS_PER_DECADE, rf.EVAL_START_SAMPLES, rf.DATA_DIR, rf.OUT_DIR, rf.USE_STOCHASTIC_BINARIZATION)
    assert (d.device, d.threads, d.jobs, d.compile, d.verify_data) == (rf.DEVICE, rf.THREADS, rf.JOBS, rf.COMPILE, rf.VERIFY_DATA)


def test_samples_accepts_both_spellings(tmp_path: Path) -> None:
    assert rf.parse_config(["--samples", "1e6", "--out-dir", str(tmp_path)]).samples == 1_000_000
    assert rf.parse_config(["--samples", "1000000", "--out-dir", str(tmp_path)]).samples == 1_000_000
    assert rf.parse_config(["--lr", "auto", "--out-dir", str(tmp_path)]).lr == "auto"


BAD = [
    ["--latent-dims"],
    ["--latent-dims", "0"],
    ["--latent-dims", "3", "-5"],
    ["--samples", "99"],
    ["--samples", "1.5"],
    ["--samples", "lots"],
    ["--lr", "0"],
    ["--lr", "-0.01"],
    ["--lr", "fast"],
    ["--batch-size", "0"],
    ["--hidden-size", "-1"],
    ["--evals-per-decade", "0"],
    ["--jobs", "0"],
    ["--threads", "-2"],
    ["--methods", "gan"],
    ["--device", "tpu"],
]


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a))
def test_bad_values_exit_2_before_any_work(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        rf.main(["--data-dir", str(tmp_path / "never-read"), "--out-dir", str(tmp_path / "out"), *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert not (tmp_path / "never-read").exists()  # no data was looked for


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        rf.main(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert stop.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_unwritable_out_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as stop:
        rf.main(["--out-dir", str(blocker / "sub")])
    assert stop.value.code == 2 and "--out-dir" in capsys.readouterr().err


def test_main_end_to_end_json_png_and_plot_only(mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert rf.main(tiny_args(mnist_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "| AEVB | 2 |" in printed and "| WS | 3 |" in printed  # the final table
    results = json.loads((out / rf.RESULTS_NAME).read_text())
    assert results["config"]["samples"] == 1200 and results["config"]["latent_dims"] == [2, 3]
    assert results["config"]["weight_decay"] == rf.WEIGHT_DECAY and results["config"]["init_std"] == rf.INIT_STD
    env = results["environment"]
    for key in ("python", "torch", "torchvision", "pyautoencoder", "device", "threads"):
        assert key in env
    assert [(r["method"], r["latent_dim"], r["status"]) for r in results["runs"]] == [
        ("aevb", 2, "done"), ("aevb", 3, "done"), ("wake-sleep", 2, "done"), ("wake-sleep", 3, "done")]
    for r in results["runs"]:
        assert [e["samples"] for e in r["evals"]] == [450, 1000, 1200]  # 10^(8/3), 10^(9/3) in whole minibatches of 50, then the target
        for e in r["evals"]:
            assert set(e) == {"samples", "train_elbo", "test_elbo", "train_log_likelihood", "train_kl", "test_log_likelihood", "test_kl", "wall_seconds"}
            assert e["train_elbo"] == pytest.approx(e["train_log_likelihood"] - e["train_kl"])
    png = out / rf.FIGURE_NAME
    assert png.stat().st_size > 10_000
    png.unlink()
    assert rf.main(["--plot-only", "--out-dir", str(out)]) == 0
    assert png.exists()
    # the same command again finds every run finished and loses nothing
    before = measured(out / rf.RESULTS_NAME)
    assert rf.main(tiny_args(mnist_dir, out, "--methods", "aevb")) == 0
    assert "[aevb N_z=3] already done: skipped" in capsys.readouterr().out
    assert measured(out / rf.RESULTS_NAME) == before  # the wake-sleep runs stay in the file
    assert not list((out / "checkpoints").iterdir())  # finished runs keep no checkpoint
    # --fresh starts over and keeps the earlier results and checkpoints aside
    assert rf.main(tiny_args(mnist_dir, out, "--methods", "aevb", "--fresh")) == 0
    assert len(list(out.glob("vae_mnist_fig2_repro.*.json"))) == 1 and len(list(out.glob("checkpoints.*"))) == 1
    assert [r["method"] for r in json.loads((out / rf.RESULTS_NAME).read_text())["runs"]] == ["aevb", "aevb"]


def test_plot_only_without_results_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rf.main(["--plot-only", "--out-dir", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_same_seed_same_numbers(mnist_dir: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert rf.main(tiny_args(mnist_dir, tmp_path / name, "--latent-dims", "2")) == 0
    a, b = measured(tmp_path / "a" / rf.RESULTS_NAME), measured(tmp_path / "b" / rf.RESULTS_NAME)
    assert a == b and len(a[0][3]) == 3
    assert rf.main(tiny_args(mnist_dir, tmp_path / "c", "--latent-dims", "2", "--seed", "7")) == 0
    assert measured(tmp_path / "c" / rf.RESULTS_NAME) != a


def test_jobs_2_gives_the_numbers_of_jobs_1(mnist_dir: Path, tmp_path: Path) -> None:
    assert rf.main(tiny_args(mnist_dir, tmp_path / "one", "--jobs", "1")) == 0
    assert rf.main(tiny_args(mnist_dir, tmp_path / "two", "--jobs", "2")) == 0
    assert measured(tmp_path / "one" / rf.RESULTS_NAME) == measured(tmp_path / "two" / rf.RESULTS_NAME)


def test_figure_has_one_panel_per_latent_size_with_the_papers_lines(tmp_path: Path) -> None:
    fig = rf.plot_results(fake_results(("aevb", "wake-sleep"), (3, 5, 10)), str(tmp_path / "f.png"))
    assert len(fig.axes) == 3
    for ax, nz in zip(fig.axes, (3, 5, 10)):
        assert ax.get_title() == f"MNIST, $N_z = {nz}$" and ax.get_xscale() == "log"
        styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
        assert styles == {"AEVB (train)": "-", "AEVB (test)": "--", "WS (train)": "-", "WS (test)": "--"}
        colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
        assert colours["AEVB (train)"] == colours["AEVB (test)"] != colours["WS (train)"] == colours["WS (test)"]
        assert ax.get_ylim() == (-150.0, -95.0)  # every point inside: the paper's range
        assert ax.get_xlim()[0] <= 1e5 and ax.get_xlim()[1] >= 1e8
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["AEVB (train)", "AEVB (test)", "WS (train)", "WS (test)"]
    assert fig.axes[0].get_xlabel() == "# Training samples evaluated"
    plt.close(fig)
    assert (tmp_path / "f.png").exists()


def test_figure_widens_the_range_only_to_fit_and_draws_aevb_alone(tmp_path: Path) -> None:
    fig = rf.plot_results(fake_results(("aevb",), (20,), low=-180.0), str(tmp_path / "f.png"))
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["AEVB (train)", "AEVB (test)"]
    lo, hi = ax.get_ylim()
    assert lo < -181 and hi == -95.0
    plt.close(fig)


def test_benchmark_smoke_prints_every_field(mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    argv = ["--benchmark", "--benchmark-steps", "2", "--data-dir", str(mnist_dir), "--no-verify-data", "--out-dir", str(out_dir), "--threads", "1", "--compile", "off"]
    assert rf.main(argv) == 0
    out = capsys.readouterr().out
    assert "real MNIST" in out  # the synthetic files stand in for MNIST here
    for field in ("training samples/s (ours)", "training samples/s (DataLoader loop)", "ratio ours / DataLoader",
                  "seconds per full evaluation", "matmul 2048 GFLOP/s", "efficiency (training / matmul)", "peak resident memory MiB"):
        assert field in out
    assert not list(out_dir.iterdir())  # a benchmark trains no run and writes no results
