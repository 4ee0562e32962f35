"""Machinery: checkpoints, resume after SIGKILL or a signal, fingerprints, divergence,
atomic saves, worker processes and the benchmark (tests/benchmark.py)."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import benchmark
import pytest
import torch
from conftest import measured, tiny_args, tiny_config, train_n_z3, without_wall

import reproduce_fig2 as rf

SCRIPT = str(Path(rf.__file__))


def resumable_args(mnist_dir: Path, out: Path, *extra: str) -> list[str]:
    """A run of a few seconds whose first checkpoint comes early."""
    return tiny_args(
        mnist_dir,
        out,
        "--latent-dims",
        "2",
        "--methods",
        "aevb",
        "--hidden-size",
        "64",
        "--samples",
        "40000",
        *extra,
    )


def stop_at_first_checkpoint(args: list[str], checkpoint: Path, sig: int) -> tuple[int, str, str]:
    """Run the script with `args`, send `sig` once `checkpoint` exists; (status, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists():
            assert proc.poll() is None, (
                f"the run ended (status {proc.returncode}) before {checkpoint} appeared"
            )
            assert time.monotonic() < deadline, f"{checkpoint} did not appear"
            time.sleep(0.01)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, stdout, stderr


@pytest.fixture
def reference(mnist_dir: Path, tmp_path: Path) -> list[tuple]:
    """The evaluation values of the same run, uninterrupted."""
    assert rf.main(resumable_args(mnist_dir, tmp_path / "reference")) == 0
    return measured(tmp_path / "reference" / rf.RESULTS_NAME)


def test_sigkill_then_resume_gives_the_uninterrupted_numbers(
    mnist_dir: Path, tmp_path: Path, reference: list[tuple], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    stop_at_first_checkpoint(
        resumable_args(mnist_dir, out), out / "checkpoints" / "aevb_nz2.pt", signal.SIGKILL
    )
    assert rf.main(resumable_args(mnist_dir, out)) == 0
    printed = capsys.readouterr().out
    assert "[aevb N_z=2] resumed from its checkpoint at" in printed
    assert measured(out / rf.RESULTS_NAME) == reference
    assert not (out / "checkpoints" / "aevb_nz2.pt").exists()  # a finished run drops its checkpoint
    # the evaluations from before the kill are not printed again
    lines = [line for line in printed.splitlines() if line.startswith("[aevb N_z=2] samples")]
    (_, _, _, evals) = reference[0]
    resumed_at = int(re.search(r"checkpoint at ([\d,]+)", printed).group(1).replace(",", ""))
    assert len(lines) == len([e for e in evals if e["samples"] > resumed_at])


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_saves_and_resumes_exactly(
    sig: int, code: int, mnist_dir: Path, tmp_path: Path, reference: list[tuple]
) -> None:
    out = tmp_path / "out"
    status, stdout, stderr = stop_at_first_checkpoint(
        resumable_args(mnist_dir, out, "--latent-dims", "2", "3"),
        out / "checkpoints" / "aevb_nz2.pt",
        sig,
    )
    assert status == code, stderr
    assert "run the same command again to continue" in stderr and "Traceback" not in stderr
    # the wall time so far, without an estimate that the stop left unknown
    assert re.search(r"^wall time: \d+ s$", stdout, re.MULTILINE), stdout
    runs = json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    # both runs were in flight together: both are interrupted, the first after an evaluation
    assert [r["status"] for r in runs] == ["interrupted", "interrupted"] and runs[0]["evals"]
    assert (out / rf.FIGURE_NAME).exists() and (out / "checkpoints" / "aevb_nz2.pt").exists()
    assert rf.main(resumable_args(mnist_dir, out, "--latent-dims", "2", "3")) == 0
    assert measured(out / rf.RESULTS_NAME)[:1] == reference


def test_other_settings_refuse_to_resume(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert rf.main(tiny_args(mnist_dir, out)) == 0
    assert rf.main(tiny_args(mnist_dir, out, "--seed", "7")) == 2
    err = capsys.readouterr().err
    assert "seed 1926 -> 7" in err and "--fresh" in err and len(err.strip().splitlines()) == 1
    assert rf.main(tiny_args(mnist_dir, out, "--seed", "7", "--fresh")) == 0


def test_an_unreadable_checkpoint_is_reported_not_discarded(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    ckpt = out / "checkpoints" / "aevb_nz2.pt"
    assert stop_at_first_checkpoint(resumable_args(mnist_dir, out), ckpt, signal.SIGINT)[0] == 130
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    assert rf.main(resumable_args(mnist_dir, out)) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "cannot be read" in err and "--fresh" in err
    assert ckpt.stat().st_size == 1000  # still there, untouched
    assert rf.main(resumable_args(mnist_dir, out, "--fresh")) == 0
    assert [p.name for p in out.glob("checkpoints.*/aevb_nz2.pt")] == ["aevb_nz2.pt"]  # kept aside


def test_divergence_stops_that_run_only_and_exits_3(
    mnist_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    original = rf.aevb_step

    def poisoned(vae: rf.VAE, opts: list, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        loss = original(vae, opts, x, gen)
        if vae.latent_dim == 2:
            with torch.no_grad():
                vae.decoder[2].weight.mul_(float("nan"))
        return loss

    monkeypatch.setitem(rf.STEPS, "aevb", poisoned)
    out = tmp_path / "out"
    assert rf.main(tiny_args(mnist_dir, out)) == 3
    runs = {
        (r["method"], r["latent_dim"]): r
        for r in json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    }
    assert runs[("aevb", 2)]["status"] == "diverged" and runs[("aevb", 2)]["diverged_at"] == 450
    assert all(r["status"] == "done" for k, r in runs.items() if k != ("aevb", 2))
    assert "warning: [aevb N_z=2] diverged" in capsys.readouterr().err
    fig_lines = (
        rf.plot_results(json.loads((out / rf.RESULTS_NAME).read_text()), str(tmp_path / "f.png"))
        .axes[0]
        .get_lines()
    )
    assert len(fig_lines) == 2  # WS drawn; the diverged AEVB run has no good point to draw


SAVE_THEN_HANG = """
import os, sys, torch
sys.path.insert(0, {root!r})
import reproduce_fig2 as rf
store = rf.ResultsFolder({folder!r}, {{"x": 1}})
key, json_path = rf.RunKey("aevb", 3), {json!r}
rf.write_json_atomic({{"version": 1}}, json_path)
store.save_state(key, {{"version": 1, "model": torch.zeros(3)}})


def hang(fd):  # the new file is written but not yet in place: the kill comes now
    print("saving", flush=True)
    while True:
        pass


os.fsync = hang
{save}
"""


@pytest.mark.parametrize(
    "save",
    [
        "rf.write_json_atomic({'version': 2, 'data': list(range(20000))}, json_path)",
        "store.save_state(key, {'version': 2, 'model': torch.randn(300, 300)})",
    ],
)
def test_a_kill_during_a_save_leaves_the_previous_file_whole(tmp_path: Path, save: str) -> None:
    paths = {"folder": str(tmp_path), "json": str(tmp_path / "r.json")}
    code = SAVE_THEN_HANG.format(root=str(Path(SCRIPT).parent), save=save, **paths)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "saving"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert json.loads((tmp_path / "r.json").read_text()) == {"version": 1}
    assert (
        rf.ResultsFolder(str(tmp_path), {"x": 1}).load_state(rf.RunKey("aevb", 3))["version"] == 1
    )


def test_results_are_written_with_the_usual_file_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        rf.write_json_atomic({"x": 1}, str(tmp_path / "r.json"))
    finally:
        os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644  # not tempfile's private 0600


def test_a_resumed_run_counts_the_time_it_trained_before_its_stop(
    synthetic_data: rf.Data, tmp_path: Path
) -> None:
    cfg = tiny_config()
    folder = rf.ResultsFolder(str(tmp_path), {"test": True})
    with pytest.raises(rf.Interrupted):
        try:
            train_n_z3(
                cfg,
                synthetic_data,
                on_keep=lambda key, run: rf.request_stop(signal.SIGINT, None),
                folder=folder,
            )
        finally:
            rf.STOP_REQUEST.clear()
    ckpt = folder.load_state(rf.RunKey("aevb", 3))
    assert ckpt is not None and ckpt["wall_seconds"] >= ckpt["run"]["evals"][-1]["wall_seconds"]
    ckpt["wall_seconds"] = 1000.0  # as if it had trained for a long time after its last evaluation
    folder.save_state(rf.RunKey("aevb", 3), {k: v for k, v in ckpt.items() if k != "fingerprint"})
    run = train_n_z3(cfg, synthetic_data, folder=folder)
    assert (
        run["status"] == "done"
        and run["evals"][0]["wall_seconds"] < 1000 < run["evals"][-1]["wall_seconds"]
    )


def worker_pids(parent: int) -> list[int]:
    """Pids of the multiprocessing workers of `parent` (its children running spawn_main)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == parent and b"spawn_main" in cmdline:
                pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker processes"
)
def test_a_worker_killed_outright_fails_only_its_run(mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = resumable_args(mnist_dir, out, "--latent-dims", "2", "3", "--jobs", "2")
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not list((out / "checkpoints").glob("*.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        victim = worker_pids(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, stderr
    runs = json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    assert sorted(r["status"] for r in runs) == ["done", "failed"]
    failed = next(r for r in runs if r["status"] == "failed")
    assert "exit status -9" in failed["error"] and f"N_z={failed['latent_dim']}] failed" in stderr


def test_jobs_2_gives_the_numbers_of_jobs_1(mnist_dir: Path, tmp_path: Path) -> None:
    assert rf.main(tiny_args(mnist_dir, tmp_path / "one", "--jobs", "1")) == 0
    assert rf.main(tiny_args(mnist_dir, tmp_path / "two", "--jobs", "2")) == 0
    assert measured(tmp_path / "one" / rf.RESULTS_NAME) == measured(
        tmp_path / "two" / rf.RESULTS_NAME
    )


def test_benchmark_smoke_prints_every_field(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--steps", "2", "--data-dir", str(mnist_dir), "--no-verify-data", "--threads", "1"]
    assert benchmark.main([*argv, "--json", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    # the synthetic files are not called MNIST's: unchecked, and said to be
    assert f"unchecked MNIST-format files from {mnist_dir}" in out
    saved = json.loads((tmp_path / "bench.json").read_text())
    for key in saved:
        assert f"  {key} " in out  # every number is printed as well as saved
    assert saved["gpu"] is None and saved["torch"] == str(torch.__version__)  # no GPU here
    assert saved["runs_in_flight"] == 10  # the default configuration's ten runs
    for key in ("steps_per_s_one_run", "steps_per_s_all_runs", "eval_seconds"):
        assert saved[key] > 0


def test_threads_are_the_cores_shared_among_the_runs_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rf, "cpu_count", lambda: 8)
    auto = rf.Config(threads=0, jobs=2)
    assert rf.threads_for(auto, 1) == 8  # a lone run gets every core
    assert rf.threads_for(auto, 2) == 4
    assert rf.threads_for(auto, 16) == 1
    assert rf.threads_for(rf.Config(threads=3, jobs=2), 1) == 3  # --threads overrides


def test_a_lone_run_trains_on_every_core_and_says_so(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(rf, "cpu_count", lambda: 3)
    out = tmp_path / "out"
    args = tiny_args(mnist_dir, out, "--latent-dims", "2", "--methods", "aevb", "--threads", "0")
    try:
        assert rf.main([*args, "--jobs", "2"]) == 0
    finally:
        torch.set_num_threads(1)
    (run,) = json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    assert run["threads"] == 3
    assert "[aevb N_z=2] training on 3 threads" in capsys.readouterr().out


def test_the_time_estimate_is_printed_before_training_and_the_wall_time_after(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert rf.main(tiny_args(mnist_dir, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert re.search(r"estimate: 4 runs x 1,200 samples, 1 at a time: about \d+ s here", out)
    assert out.index("estimate:") < out.index("[aevb N_z=2] samples")
    assert re.search(r"wall time: \d+ s \(estimated \d+ s\)", out)


def test_the_estimate_counts_what_is_left(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    step_s = 0.01  # the timings fixed, so that only the counting is tested
    monkeypatch.setattr(rf, "seconds_per_step", lambda runs, advance: step_s)
    monkeypatch.setattr(rf, "seconds_per_evaluation", lambda vae, data, seed: 0.1)
    cfg = rf.parse_config(tiny_args(mnist_dir, tmp_path / "out", "--jobs", "2"))
    data = rf.load_data(str(mnist_dir), torch.device("cpu"), False, 0, verify=False)
    keys = [rf.RunKey("aevb", 2), rf.RunKey("aevb", 3)]
    fresh = rf.estimate(cfg, data, keys, {}, 2)
    half = {key: {"evals": [{"samples": 300}]} for key in keys}  # before the first point, 450
    # the two runs side by side, each 300 samples further: 6 steps fewer, the same evaluations
    saved = 300 // cfg.batch_size * step_s
    assert rf.estimate(cfg, data, keys, half, 2) == pytest.approx(fresh - saved)
    finishing = {key: {"evals": [{"samples": cfg.samples}]} for key in keys}
    assert rf.estimate(cfg, data, keys, finishing, 2) == 0.0  # others finish them


@pytest.mark.parametrize(
    "seconds, said", [(4.2, "4 s"), (89, "89 s"), (600, "10 min"), (3 * 3600 + 300, "3 h 05 min")]
)
def test_durations_are_said_as_people_say_them(seconds: float, said: str) -> None:
    assert rf.fmt_duration(seconds) == said


def start(args: list[str]) -> subprocess.Popen:
    """The script started as its own process, its output captured."""
    return subprocess.Popen(
        [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Poll until `condition()` holds while `proc` runs."""
    deadline = time.monotonic() + 120
    while not condition():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.01)


def by_run(path: Path) -> dict[tuple[str, int], tuple]:
    """measured() of a results file, keyed by (method, N_z)."""
    return {(m, d): (status, evals) for m, d, status, evals in measured(path)}


def test_two_invocations_sharing_a_folder_lose_nothing(mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = resumable_args(mnist_dir, out, "--latent-dims", "2", "3")
    second = resumable_args(mnist_dir, out, "--latent-dims", "4")
    a = start(first)
    wait_for(lambda: (out / "runs" / "aevb_nz2.json").exists(), a, "its first evaluation")
    b = start(second)
    assert b.wait(timeout=120) == 0, b.communicate()[1]
    assert a.wait(timeout=120) == 0, a.communicate()[1]
    for args, name in ((first, "alone-a"), (second, "alone-b")):
        assert rf.main([*args[:2], "--out-dir", str(tmp_path / name), *args[4:]]) == 0
    alone = by_run(tmp_path / "alone-a" / rf.RESULTS_NAME) | by_run(
        tmp_path / "alone-b" / rf.RESULTS_NAME
    )
    shared = by_run(out / rf.RESULTS_NAME)
    assert sorted(shared) == [("aevb", 2), ("aevb", 3), ("aevb", 4)]
    assert shared == alone and all(status == "done" for status, _ in shared.values())


def test_the_same_command_twice_trains_each_run_once(mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = resumable_args(mnist_dir, out, "--latent-dims", "2", "3", "4", "5")  # a few seconds each
    a = start(args)
    lock = out / "runs" / "aevb_nz2.lock"
    wait_for(lambda: rf.lock_holder(str(lock)) is not None, a, "the first run was locked")
    b = start(args)
    b_out, b_err = b.communicate(timeout=120)
    a_out, a_err = a.communicate(timeout=120)
    assert a.returncode == 0 and b.returncode == 0, a_err + b_err
    # the second finds one run held by the first (which one depends on timing), or the first
    # finds the run the second took in the meantime; either way it names the holder
    skips = re.findall(r"\[aevb N_z=(\d)\] skipped: (\S+) pid (\d+) is training it", a_out + b_out)
    assert skips, a_out + b_out
    for nz, host, pid in skips:
        assert host == socket.gethostname() and int(pid) in (a.pid, b.pid)
        assert (
            f"left to another process: [aevb N_z={nz}], held by {host} pid {pid}" in a_out + b_out
        )
    for nz in (2, 3, 4, 5):  # each run trained by exactly one of the two
        assert (a_out + b_out).count(f"[aevb N_z={nz}] training on") == 1
    assert all(status == "done" for status, _ in by_run(out / rf.RESULTS_NAME).values())


def test_a_killed_holder_leaves_a_lock_the_next_run_takes(
    mnist_dir: Path, tmp_path: Path, reference: list[tuple], capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    run_file = out / "runs" / "aevb_nz2.json"  # written after the run's first checkpoint
    stop_at_first_checkpoint(resumable_args(mnist_dir, out), run_file, signal.SIGKILL)
    lock = out / "runs" / "aevb_nz2.lock"
    assert lock.exists() and rf.lock_holder(str(lock)) is None  # the kill released it
    assert rf.main(["--plot-only", "--out-dir", str(out)]) == 0
    (run,) = json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    assert run["status"] == "interrupted"  # "running" in its file, but nobody holds it
    assert rf.main(resumable_args(mnist_dir, out)) == 0
    assert "[aevb N_z=2] resumed from its checkpoint" in capsys.readouterr().out
    assert measured(out / rf.RESULTS_NAME) == reference


def test_the_combined_json_is_an_output_rebuilt_from_the_run_files(
    mnist_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert rf.main(tiny_args(mnist_dir, out)) == 0
    before = measured(out / rf.RESULTS_NAME)
    (out / rf.RESULTS_NAME).unlink()
    (out / rf.FIGURE_NAME).unlink()
    assert rf.main(["--plot-only", "--out-dir", str(out)]) == 0
    assert measured(out / rf.RESULTS_NAME) == before and (out / rf.FIGURE_NAME).exists()
    assert json.loads((out / rf.RESULTS_NAME).read_text())["config"]["samples"] == 1200
    (out / rf.RESULTS_NAME).write_text('{"runs": [')  # cut short
    assert rf.main(tiny_args(mnist_dir, out)) == 0  # never a reason to refuse
    assert measured(out / rf.RESULTS_NAME) == before


def test_a_run_file_of_other_settings_is_refused(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert rf.main(tiny_args(mnist_dir, out, "--latent-dims", "2")) == 0
    (out / rf.RESULTS_NAME).unlink()  # only the run files tell
    assert rf.main(tiny_args(mnist_dir, out, "--latent-dims", "3", "--seed", "7")) == 2
    err = capsys.readouterr().err
    assert str(out / "runs" / "aevb_nz2.json") in err and "seed 1926 -> 7" in err


def test_a_diverged_run_keeps_its_last_good_model_marked_as_such(
    synthetic_data: rf.Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, steps = rf.aevb_step, []

    def poisoned_later(
        vae: rf.VAE, opts: list, x: torch.Tensor, gen: torch.Generator
    ) -> torch.Tensor:
        steps.append(1)
        loss = original(vae, opts, x, gen)
        if len(steps) > 25:  # after the first evaluation (1,000 samples = 20 steps)
            with torch.no_grad():
                vae.decoder[2].bias.fill_(math.nan)
        return loss

    monkeypatch.setitem(rf.STEPS, "aevb", poisoned_later)
    folder = rf.ResultsFolder(str(tmp_path), {"test": True})
    run = train_n_z3(tiny_config(), synthetic_data, folder=folder)
    assert run["status"] == "diverged" and run["diverged_at"] == 3000
    saved = torch.load(tmp_path / "models" / "aevb_nz3.pt")
    assert saved["diverged"] is True and saved["samples"] == 1000
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_seeds_in_worker_processes_give_the_numbers_of_one_process(
    mnist_dir: Path, tmp_path: Path
) -> None:
    args = ["--latent-dims", "2", "--methods", "aevb", "wake-sleep", "--seeds", "2"]
    assert rf.main(tiny_args(mnist_dir, tmp_path / "one", *args, "--jobs", "1")) == 0
    assert rf.main(tiny_args(mnist_dir, tmp_path / "two", *args, "--jobs", "2")) == 0
    one = json.loads((tmp_path / "one" / rf.RESULTS_NAME).read_text())["runs"]
    assert [(r["method"], r["seed_index"]) for r in one] == [
        ("aevb", 0),
        ("aevb", 1),
        ("wake-sleep", 0),
        ("wake-sleep", 1),
    ]
    assert measured(tmp_path / "one" / rf.RESULTS_NAME) == measured(
        tmp_path / "two" / rf.RESULTS_NAME
    )


def test_a_finished_run_extended_gives_the_numbers_of_one_long_run(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, longer = tmp_path / "out", ("--samples", "10000")
    assert rf.main(tiny_args(mnist_dir, out)) == 0  # 1,200 samples: not a point of 10,000
    assert rf.main(tiny_args(mnist_dir, out, *longer)) == 0
    printed = capsys.readouterr().out
    assert "[aevb N_z=2] extended from its end at 1,200 samples" in printed
    assert "--fresh" not in printed
    assert rf.main(tiny_args(mnist_dir, tmp_path / "one_go", *longer)) == 0
    extended = json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    one_go = json.loads((tmp_path / "one_go" / rf.RESULTS_NAME).read_text())["runs"]
    for run, alone in zip(extended, one_go, strict=True):
        assert run["status"] == "done" and run["log_px"] == alone["log_px"]  # estimated again
        evals = [without_wall(e) for e in run["evals"]]
        assert 1200 in [e["samples"] for e in evals]  # measured before: kept
        assert [e for e in evals if e["samples"] != 1200] == [
            without_wall(e) for e in alone["evals"]
        ]
        saved = torch.load(out / "models" / f"{rf.RunKey.of(run).stem}.pt")
        assert saved["samples"] == 10000 and saved["optimizers"] and "generator" in saved


def test_settings_that_cannot_change_the_numbers_do_not_refuse(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert rf.main(tiny_args(mnist_dir, out)) == 0
    same_numbers = (
        "--threads",
        "2",
        "--jobs",
        "2",
        "--graph-steps",
        "9",
        "--lr-pilot-samples",
        "9",
    )
    assert rf.main(tiny_args(mnist_dir, out, *same_numbers)) == 0
    assert capsys.readouterr().out.count("already done: skipped") == 4
    assert rf.main(tiny_args(mnist_dir, out, "--hidden-size", "17")) == 2  # this one does
    assert "hidden_size 16 -> 17" in capsys.readouterr().err


def test_sigkill_between_evaluation_points_resumes_from_the_timed_checkpoint(
    mnist_dir: Path, tmp_path: Path, reference: list[tuple]
) -> None:
    out = tmp_path / "out"
    args = resumable_args(mnist_dir, out, "--checkpoint-every", "0.05")
    points = set(rf.schedule_of(rf.parse_config(args)))
    checkpoint = out / "checkpoints" / "aevb_nz2.pt"
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.DEVNULL)
    try:
        deadline, samples = time.monotonic() + 120, None
        while samples is None or samples in points:
            assert proc.poll() is None, "the run ended before a checkpoint between points"
            assert time.monotonic() < deadline, "no checkpoint between evaluation points"
            with contextlib.suppress(FileNotFoundError, RuntimeError, EOFError):
                samples = torch.load(checkpoint, weights_only=True)["samples"]
            time.sleep(0.01)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert rf.main(resumable_args(mnist_dir, out, "--checkpoint-every", "0.05")) == 0
    assert measured(out / rf.RESULTS_NAME) == reference


def test_a_full_disk_is_one_line_and_a_rerun_gives_the_right_numbers(
    mnist_dir: Path,
    tmp_path: Path,
    reference: list[tuple],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, real_fdopen, writes = tmp_path / "out", os.fdopen, []

    class FullDisk(io.BufferedWriter):
        def write(self, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd: int, *args: object, **kwargs: object) -> object:
        writes.append(fd)  # the first evaluation point's checkpoint, run file, JSON and PNG pass
        return (
            real_fdopen(fd, *args, **kwargs) if len(writes) <= 4 else FullDisk(io.FileIO(fd, "w"))
        )

    monkeypatch.setattr(os, "fdopen", fdopen)
    assert rf.main(resumable_args(mnist_dir, out)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on the device while writing ") and str(out) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    kept = torch.load(out / "checkpoints" / "aevb_nz2.pt", weights_only=True)
    assert kept["samples"] == rf.schedule_of(rf.parse_config(resumable_args(mnist_dir, out)))[0]
    assert not list(out.rglob(".tmp-*"))  # the half-written files are gone
    monkeypatch.setattr(os, "fdopen", real_fdopen)  # space freed
    assert rf.main(resumable_args(mnist_dir, out)) == 0
    assert measured(out / rf.RESULTS_NAME) == reference
