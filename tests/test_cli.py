"""The command line and main(): flags, bad values, outputs, time, threads, the benchmark."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import benchmark
import pytest
import torch
from conftest import FINISHED_UMASK, Finished, measured, tiny_args

import reproduce_fig2 as rf


# -------------------------------------------------------------------------------- flags
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
    probe = "import edited; c = edited.parse_command_line([])[0]; print(c.latent_dims, c.samples)"
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


def test_every_flag_defaults_to_its_constant_and_its_help_is_the_constants_comment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for f in dataclasses.fields(rf.Config):
        assert f.default == getattr(rf, f.name.upper()), f.name
    with pytest.raises(SystemExit):
        rf.parse_command_line(["--help"])
    helped = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "--seed SEED master seed; each (method, N_z) run derives its own from it" in helped
    source = Path(rf.__file__).read_text().splitlines()
    for f in dataclasses.fields(rf.Config):
        (line,) = [s for s in source if s.startswith(f"{f.name.upper()}: ")]
        comment = " ".join(line.split("  # ", 1)[1].split())
        assert comment and f"--{f.name.replace('_', '-')}" in helped, f.name
        assert comment in helped, f.name


def test_samples_accepts_both_spellings(tmp_path: Path) -> None:
    assert (
        rf.parse_command_line(["--samples", "1e6", "--out-dir", str(tmp_path)])[0].samples
        == 1_000_000
    )
    assert (
        rf.parse_command_line(["--samples", "1000000", "--out-dir", str(tmp_path)])[0].samples
        == 1_000_000
    )
    assert rf.parse_command_line(["--lr", "auto", "--out-dir", str(tmp_path)])[0].lr == "auto"


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
    ["--graph-steps", "-1"],
    ["--seed", "-1"],
    ["--seed", "1e30"],
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
    assert "Traceback" not in err
    assert "error:" in err.splitlines()[-1] and argv[0] in err.splitlines()[-1]  # names the flag
    assert not (tmp_path / "never-read").exists()  # no data was looked for


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_a_gpu_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        rf.main(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert stop.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_unwritable_out_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as stop:
        rf.main(["--out-dir", str(blocker / "sub")])
    last = capsys.readouterr().err.splitlines()[-1]  # the usage above it names --out-dir too
    assert stop.value.code == 2 and "cannot be created or written" in last


def test_a_file_where_a_results_subfolder_goes_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / rf.RUNS_FOLDER).write_text("")
    with pytest.raises(SystemExit) as stop:
        rf.main(["--out-dir", str(tmp_path)])
    assert (
        stop.value.code == 2 and "is a file where the runs folder goes" in capsys.readouterr().err
    )


# -------------------------------------------------------------------------------- outputs
def test_an_invocation_leaves_results_figure_table_and_models(finished: Finished) -> None:
    out = finished.out
    assert "| AEVB | 2 | 1 | 1,200 |" in finished.printed  # the final table
    assert "| WS | 3 | 1 |" in finished.printed
    results = json.loads((out / rf.RESULTS_NAME).read_text())
    assert results["config"]["samples"] == 1200 and results["config"]["latent_dims"] == [2, 3]
    assert (
        results["config"]["weight_decay"] == rf.WEIGHT_DECAY
        and results["config"]["init_std"] == rf.INIT_STD
    )
    env = results["environment"]
    for key in ("python", "torch", "torchvision", "pyautoencoder", "device"):
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
        # the final model, its log p(x) estimate, loadable with the README's one line
        assert r["log_px"]["k"] == rf.IW_SAMPLES  # with what moves the estimate's noise
        assert r["log_px"]["decodes_per_pass"] == rf.IW_DECODES_PER_PASS
        assert r["evals"][-1]["test_elbo"] - 1 < r["log_px"]["test"] < 0
        saved = torch.load(out / "models" / f"{r['method']}_nz{r['latent_dim']}.pt")
        vae = rf.build_vae(saved["latent_dim"], saved["hidden_size"])
        vae.load_state_dict(saved["model"])
        assert (saved["method"], saved["samples"], saved["diverged"]) == (r["method"], 1200, False)
        assert saved["fingerprint"]["seed"] == rf.SEED and saved["seed"] == r["seed"]
    assert (out / rf.FIGURE_NAME).stat().st_size > 10_000
    assert f"samples: {out / rf.SAMPLES_NAME}" in finished.printed
    assert not (out / "checkpoints").exists()  # finished runs keep no checkpoint, nor folder
    # every file written as a plain one is, under the user's umask (not tempfile's private 0600)
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert len(files) == 3 + 4 + 4  # JSON, figure, samples; four run files, four models
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~FINISHED_UMASK}


def test_plot_only_redraws_from_the_run_files_and_a_rerun_or_fresh_start_loses_nothing(
    finished: Finished, mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = finished.copy(tmp_path / "out")
    before = measured(out / rf.RESULTS_NAME)
    for name in (rf.RESULTS_NAME, rf.FIGURE_NAME, rf.SAMPLES_NAME):
        (out / name).unlink()
    plot_only = ["--plot-only", "--out-dir", str(out), "--data-dir", str(mnist_dir)]
    assert rf.main([*plot_only, "--no-verify-data"]) == 0
    assert (out / rf.FIGURE_NAME).exists() and (out / rf.SAMPLES_NAME).exists()  # from the models
    assert measured(out / rf.RESULTS_NAME) == before  # the combined JSON is rebuilt
    assert json.loads((out / rf.RESULTS_NAME).read_text())["config"]["samples"] == 1200
    # the combined JSON is only an output: cut short, it is no reason to refuse
    (out / rf.RESULTS_NAME).write_text('{"runs": [')
    assert rf.main(tiny_args(mnist_dir, out, "--methods", "aevb")) == 0
    assert "[aevb N_z=3] already done: skipped" in capsys.readouterr().out
    assert measured(out / rf.RESULTS_NAME) == before  # the wake-sleep runs stay in the file
    # --fresh starts over and keeps the earlier results and run files aside
    assert rf.main(tiny_args(mnist_dir, out, "--methods", "aevb", "--fresh")) == 0
    assert len(list(out.glob("vae_mnist_fig2_repro.*.json"))) == 1
    assert len(list(out.glob("runs.*"))) == 1 and len(list(out.glob("models.*"))) == 1
    assert [m[:2] for m in measured(out / rf.RESULTS_NAME)] == [("aevb", 2), ("aevb", 3)]


def test_plot_only_without_results_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rf.main(["--plot-only", "--out-dir", str(tmp_path / "typo")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()  # no folder made where nothing is written


# -------------------------------------------------------------------------------- time
def test_the_time_estimate_is_printed_before_training_and_the_wall_time_after(
    finished: Finished,
) -> None:
    out = finished.printed
    assert re.search(r"estimate: 4 runs x 1,200 samples, 1 at a time: about \d+ s here", out)
    assert out.index("estimate:") < out.index("[aevb N_z=2] samples")
    assert re.search(r"wall time: \d+ s \(estimated \d+ s\)", out)


def test_the_estimate_counts_what_is_left(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step_s = 0.01  # the timings fixed, so that only the counting is tested
    monkeypatch.setattr(rf, "seconds_per_step", lambda runs, advance: step_s)
    monkeypatch.setattr(rf, "seconds_per_evaluation", lambda vae, data, seed: 0.1)
    cfg = rf.parse_command_line(tiny_args(mnist_dir, tmp_path / "out", "--jobs", "2"))[0]
    data = rf.load_data(str(mnist_dir), torch.device("cpu"), False, 0, verify=False)
    keys = [rf.RunKey("aevb", 2), rf.RunKey("aevb", 3)]
    fresh = rf.estimate(cfg, data, dict.fromkeys(keys, 0), 2)
    half = dict.fromkeys(keys, 300)  # checkpoints before the first point, 450
    # the two runs side by side, each 300 samples further: 6 steps fewer, the same evaluations
    saved = 300 // cfg.batch_size * step_s
    assert rf.estimate(cfg, data, half, 2) == pytest.approx(fresh - saved)
    assert rf.estimate(cfg, data, dict.fromkeys(keys, cfg.samples), 2) == 0.0  # nothing left
    # with --lr auto, pilots only for a run not started, not for one stopped after its pilots
    auto = dataclasses.replace(cfg, lr="auto")
    pilots = len(rf.LR_CANDIDATES) * cfg.lr_pilot_samples // cfg.batch_size * step_s + 0.1
    new, after_pilots = (rf.estimate(auto, data, {keys[0]: done}, 1) for done in (None, 0))
    assert new == pytest.approx(after_pilots + pilots) and after_pilots == pytest.approx(fresh)


# -------------------------------------------------------------------------------- the machine
def test_a_lone_run_gets_every_core_and_runs_side_by_side_share_them(
    mnist_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(rf, "cpu_count", lambda: 4)
    shared = ("--methods", "aevb", "--threads", "0", "--jobs", "2")
    lone = tiny_args(mnist_dir, tmp_path / "lone", *shared, "--latent-dims", "2")
    # two runs (a point each) in two worker processes, which get their threads from here
    pair = tiny_args(mnist_dir, tmp_path / "pair", *shared, "--samples", "300")
    assert rf.main(lone) == 0
    assert torch.get_num_threads() == 1  # main() puts back the caller's thread count
    assert rf.main(pair) == 0
    assert "[aevb N_z=2] training on 4 threads" in capsys.readouterr().out

    def threads(out: Path) -> list[int]:
        return [r["threads"] for r in json.loads((out / rf.RESULTS_NAME).read_text())["runs"]]

    assert threads(tmp_path / "lone") == [4] and threads(tmp_path / "pair") == [2, 2]


def test_the_script_trains_with_no_fcntl_to_import(mnist_dir: Path, tmp_path: Path) -> None:
    # Windows has no fcntl: the script must not import it itself, and leaves the locks to
    # filelock, which picks the platform's (here, without fcntl, its soft lock; not Windows')
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


def test_benchmark_smoke_prints_every_field(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--steps", "2", "--data-dir", str(mnist_dir), "--no-verify-data", "--threads", "1"]
    argv += ["--device", "cpu"]  # on a GPU machine too
    assert benchmark.main([*argv, "--json", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    # the synthetic files are not called MNIST's: unchecked, and said to be
    assert f"unchecked MNIST-format files from {mnist_dir}" in out
    saved = json.loads((tmp_path / "bench.json").read_text())
    for key in saved:
        assert f"  {key} " in out  # every number is printed as well as saved
    assert saved["gpu"] is None and saved["torch"] == str(torch.__version__)  # on the CPU
    assert saved["runs_in_flight"] == 10  # the default configuration's ten runs
    for key in ("steps_per_s_one_run", "steps_per_s_all_runs", "eval_seconds"):
        assert saved[key] > 0


def test_files_set_aside_within_one_second_do_not_overwrite_each_other(tmp_path: Path) -> None:
    path = tmp_path / rf.RESULTS_NAME
    for text in ("first", "second"):
        path.write_text(text)
        os.utime(path, (0, 0))  # the same time stamp both times
        rf.move_aside(str(path))
    assert sorted(p.read_text() for p in tmp_path.iterdir()) == ["first", "second"]
