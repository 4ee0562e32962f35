"""Command line and main(): defaults, bad values, the end-to-end run, reproducibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import measured, tiny_args

import reproduce_fig2 as rf


def test_editing_a_constant_changes_the_default_run(tmp_path: Path) -> None:
    # "edit the constants at the top of the file" is the interface: a copy of the script with
    # two constants changed trains other runs by default, and says so in --help
    script = Path(rf.__file__).read_text()
    edits = {
        "LATENT_DIMS: tuple[int, ...] = (3, 5, 10, 20, 200)": "LATENT_DIMS = (4, 7)",
        "SAMPLES: int = 10_000_000": "SAMPLES: int = 123_400",
    }
    for old, new in edits.items():
        assert script.count(old) == 1
        script = script.replace(old, new)
    (tmp_path / "edited.py").write_text(script)
    probe = "import edited; c = edited.parse_config([]); print(c.latent_dims, c.samples)"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert done.stdout.split("\n")[0] == "(4, 7) 123400"
    wide = os.environ | {"COLUMNS": "300"}  # one line per flag
    helped = subprocess.run(
        [sys.executable, "edited.py", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=wide,
    ).stdout
    assert "(default: [4, 7])" in helped and "(default: 123400)" in helped


def test_samples_accepts_both_spellings(tmp_path: Path) -> None:
    assert rf.parse_config(["--samples", "1e6", "--out-dir", str(tmp_path)]).samples == 1_000_000
    assert (
        rf.parse_config(["--samples", "1000000", "--out-dir", str(tmp_path)]).samples == 1_000_000
    )
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
    ["--jobs", "-1"],
    ["--threads", "-2"],
    ["--methods", "gan"],
    ["--device", "tpu"],
]


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a))
def test_bad_values_exit_2_before_any_work(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        rf.main(
            ["--data-dir", str(tmp_path / "never-read"), "--out-dir", str(tmp_path / "out"), *argv]
        )
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


def test_main_writes_json_png_table_and_plot_only_redraws(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert rf.main(tiny_args(mnist_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "| AEVB | 2 | 1 | 1,200 |" in printed and "| WS | 3 | 1 |" in printed  # final table
    results = json.loads((out / rf.RESULTS_NAME).read_text())
    assert results["config"]["samples"] == 1200 and results["config"]["latent_dims"] == [2, 3]
    assert (
        results["config"]["weight_decay"] == rf.WEIGHT_DECAY
        and results["config"]["init_std"] == rf.INIT_STD
    )
    env = results["environment"]
    for key in ("python", "torch", "torchvision", "pyautoencoder", "device", "threads"):
        assert key in env
    assert [(r["method"], r["latent_dim"], r["status"]) for r in results["runs"]] == [
        ("aevb", 2, "done"),
        ("aevb", 3, "done"),
        ("wake-sleep", 2, "done"),
        ("wake-sleep", 3, "done"),
    ]
    for r in results["runs"]:
        # 10^(8/3) and 10^(9/3) in whole minibatches of 50, then the target
        assert [e["samples"] for e in r["evals"]] == [450, 1000, 1200]
        for e in r["evals"]:
            assert set(e) == {
                "samples",
                "train_elbo",
                "test_elbo",
                "train_log_likelihood",
                "train_kl",
                "test_log_likelihood",
                "test_kl",
                "wall_seconds",
            }
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
    assert not (out / "checkpoints").exists()  # finished runs keep no checkpoint, nor folder
    # --fresh starts over and keeps the earlier results and run files aside
    assert rf.main(tiny_args(mnist_dir, out, "--methods", "aevb", "--fresh")) == 0
    assert len(list(out.glob("vae_mnist_fig2_repro.*.json"))) == 1
    assert len(list(out.glob("runs.*"))) == 1 and len(list(out.glob("models.*"))) == 1
    assert [r["method"] for r in json.loads((out / rf.RESULTS_NAME).read_text())["runs"]] == [
        "aevb",
        "aevb",
    ]


def test_plot_only_without_results_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rf.main(["--plot-only", "--out-dir", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_same_seed_gives_the_same_numbers_and_another_seed_others(
    mnist_dir: Path, tmp_path: Path
) -> None:
    for name in ("a", "b"):
        assert rf.main(tiny_args(mnist_dir, tmp_path / name, "--latent-dims", "2")) == 0
    a, b = measured(tmp_path / "a" / rf.RESULTS_NAME), measured(tmp_path / "b" / rf.RESULTS_NAME)
    assert a == b and len(a[0][3]) == 3
    assert rf.main(tiny_args(mnist_dir, tmp_path / "c", "--latent-dims", "2", "--seed", "7")) == 0
    assert measured(tmp_path / "c" / rf.RESULTS_NAME) != a


def test_a_finished_run_leaves_its_model_log_px_and_pictures(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert rf.main(tiny_args(mnist_dir, out)) == 0
    assert f"samples: {out / rf.SAMPLES_NAME}" in capsys.readouterr().out
    runs = json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    for run in runs:
        assert run["log_px"]["k"] == rf.IW_SAMPLES
        assert run["evals"][-1]["test_elbo"] - 1 < run["log_px"]["test"] < 0
        saved = torch.load(out / "models" / f"{run['method']}_nz{run['latent_dim']}.pt")
        vae = rf.build_vae(saved["latent_dim"], saved["hidden_size"])
        vae.load_state_dict(saved["model"])  # the README's one line
        assert (saved["method"], saved["samples"], saved["diverged"]) == (
            run["method"],
            1200,
            False,
        )
        assert saved["fingerprint"]["seed"] == rf.SEED and saved["seed"] == run["seed"]
    (out / rf.SAMPLES_NAME).unlink()
    assert (
        rf.main(
            ["--plot-only", "--out-dir", str(out), "--data-dir", str(mnist_dir), "--no-verify-data"]
        )
        == 0
    )
    assert (out / rf.SAMPLES_NAME).exists()  # redrawn from the saved models


def test_seeds_give_one_record_each_and_a_band(mnist_dir: Path, tmp_path: Path) -> None:
    args = ["--latent-dims", "2", "--methods", "aevb"]
    assert rf.main(tiny_args(mnist_dir, tmp_path / "one", *args)) == 0
    assert rf.main(tiny_args(mnist_dir, tmp_path / "three", *args, "--seeds", "3")) == 0
    runs = json.loads((tmp_path / "three" / rf.RESULTS_NAME).read_text())["runs"]
    assert [r["seed_index"] for r in runs] == [0, 1, 2] and len({r["seed"] for r in runs}) == 3
    finals = [r["evals"][-1]["test_elbo"] for r in runs]
    assert len(set(finals)) == 3  # three different runs
    # the first seed is the run a single-seed invocation makes
    assert (
        measured(tmp_path / "one" / rf.RESULTS_NAME)[0][3]
        == measured(tmp_path / "three" / rf.RESULTS_NAME)[0][3]
    )
    table = rf.results_table({"runs": runs})
    median = sorted(finals)[1]
    assert (
        "| AEVB | 2 | 3 | 1,200 |" in table
        and f"{median:.2f} ({min(finals):.2f} to {max(finals):.2f})" in table
    )
    fig = rf.plot_results({"runs": runs}, str(tmp_path / "f.png"))
    assert len(fig.axes[0].collections) == 2  # a train and a test band
    assert sorted(p.name for p in (tmp_path / "three" / "runs").glob("*.json")) == [
        "aevb_nz2.json",
        "aevb_nz2_seed1.json",
        "aevb_nz2_seed2.json",
    ]


def test_the_script_imports_and_trains_without_fcntl(mnist_dir: Path, tmp_path: Path) -> None:
    # Windows has no fcntl: the locks come from filelock, which works there without it
    out = tmp_path / "out"
    code = (
        "import sys; sys.modules['fcntl'] = None; sys.path.insert(0, sys.argv[1]); "
        "import reproduce_fig2 as rf; sys.exit(rf.main(sys.argv[2:]))"
    )
    root = str(Path(rf.__file__).parent)
    args = tiny_args(mnist_dir, out, "--latent-dims", "2", "--methods", "aevb")
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code, root, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (run,) = json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    assert run["status"] == "done"
