"""Every core, then every node: the default number of worker processes, and job arrays
(--list-runs, --run-index) whose tasks share one --out-dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import measured, tiny_args

import reproduce_fig2 as rf

CPU, GPU = torch.device("cpu"), torch.device("cuda")
GIB = 2**30


@pytest.mark.parametrize(
    ("cores", "memory_gib", "runs", "jobs", "expected"),
    [
        (2, 16, 10, 0, 2),  # these machines: two workers, as before
        (8, 16, 10, 0, 8),  # a laptop: a worker per core
        (16, 64, 10, 0, 10),  # a workstation: no more workers than runs
        (16, 1, 10, 0, 1),  # little memory: as many workers as it holds, at least one
        (8, 16, 3, 0, 3),  # three runs: three workers, the other cores become their threads
        (8, 16, 10, 3, 3),  # --jobs wins
        (2, 16, 10, 10, 10),  # even beyond the cores
        (8, 16, 1, 0, 1),  # a single run trains in this process
    ],
)
def test_workers_default_to_the_cores_up_to_the_runs_and_the_memory(
    monkeypatch: pytest.MonkeyPatch,
    cores: int,
    memory_gib: int,
    runs: int,
    jobs: int,
    expected: int,
) -> None:
    monkeypatch.setattr(rf, "cpu_count", lambda: cores)
    monkeypatch.setattr(rf, "available_memory", lambda: memory_gib * GIB)
    cfg = rf.Config(jobs=jobs)
    assert rf.side_by_side(cfg, CPU, runs) == expected
    assert rf.side_by_side(cfg, GPU, runs) == 1  # on a GPU the runs are in flight together
    threads = rf.threads_for(cfg, min(expected, runs))
    assert threads == max(1, cores // expected)  # the cores left over go to threads


def test_unknown_memory_caps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rf, "cpu_count", lambda: 4)
    monkeypatch.setattr(rf, "available_memory", lambda: None)  # no /proc/meminfo
    assert rf.side_by_side(rf.Config(), CPU, 10) == 4


def test_list_runs_prints_each_run_with_its_index(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rf.main(tiny_args(mnist_dir, tmp_path / "out", "--seeds", "2", "--list-runs")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["0 aevb N_z=2", "1 aevb N_z=2 seed 1", "2 aevb N_z=3"]
    assert len(lines) == 8 and lines[-1] == "7 wake-sleep N_z=3 seed 1"
    assert not (tmp_path / "out").exists()  # nothing trained, no folder made


def test_an_array_of_run_indices_gives_the_numbers_of_one_invocation(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    array, whole = tmp_path / "array", tmp_path / "whole"
    for index in range(4):  # the tasks of `sbatch --array=0-3`, one after another
        assert rf.main(tiny_args(mnist_dir, array, "--run-index", str(index))) == 0
        out = capsys.readouterr().out
        name = rf.runs_of(rf.parse_command_line(tiny_args(mnist_dir, array))[0])[index].name
        assert f"[{name}] training on" in out and out.count("training on 1 thread") == 1
    assert rf.main([*tiny_args(mnist_dir, array), "--plot-only"]) == 0  # the figure step
    assert rf.main(tiny_args(mnist_dir, whole)) == 0
    assert measured(array / rf.RESULTS_NAME) == measured(whole / rf.RESULTS_NAME)
    runs = json.loads((array / rf.RESULTS_NAME).read_text())["runs"]
    assert [r["status"] for r in runs] == ["done"] * 4
    assert (array / rf.FIGURE_NAME).exists()


def test_a_run_index_out_of_range_is_one_line_before_any_work(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        rf.main(tiny_args(mnist_dir, tmp_path / "out", "--run-index", "4"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--run-index 4 is not a run of this configuration, which has 4 (0 to 3)" in err
    assert "--list-runs" in err


def test_decoding_fewer_draws_at_once_for_memory_gives_the_same_log_px(
    synthetic_data: rf.Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = rf.build_vae(3, hidden_size=32)
    x = synthetic_data.test_eval
    at_once = rf.estimate_log_px(vae, x, k=20, seed=5)
    monkeypatch.setattr(rf, "IW_DECODES_AT_ONCE", 7)  # a few draws of one image at a time
    assert rf.estimate_log_px(vae, x, k=20, seed=5) == at_once


def test_fresh_with_a_run_index_is_refused_before_it_sets_aside_other_tasks_files(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        rf.main(tiny_args(mnist_dir, tmp_path / "out", "--run-index", "0", "--fresh"))
    assert exit_info.value.code == 2
    assert "--fresh with --run-index" in capsys.readouterr().err


def test_the_estimate_counts_workers_beyond_the_cores_as_sharing_them(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rf, "cpu_count", lambda: 2)
    monkeypatch.setattr(rf, "seconds_per_step", lambda runs, advance: 0.01)
    monkeypatch.setattr(rf, "seconds_per_evaluation", lambda vae, data, seed: 0.1)
    cfg = rf.parse_command_line(tiny_args(mnist_dir, tmp_path / "out"))[0]  # one thread per worker
    data = rf.load_data(str(mnist_dir), CPU, False, 0, verify=False)
    keys = rf.runs_of(cfg)  # four runs that cost the same
    one_after_another = rf.estimate(cfg, data, dict.fromkeys(keys, 0), 1)
    # two workers on two cores take half as long; four take as long as two: they share them
    assert rf.estimate(cfg, data, dict.fromkeys(keys, 0), 2) == pytest.approx(one_after_another / 2)
    assert rf.estimate(cfg, data, dict.fromkeys(keys, 0), 4) == pytest.approx(one_after_another / 2)
