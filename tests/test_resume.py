"""Stop and resume: stops, kills, full disk, divergence, other settings, shared folders."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    SCRIPT,
    Finished,
    make_mnist_dir,
    measured,
    resumable_args,
    running,
    stop_at_first_checkpoint,
    tiny_args,
    tiny_config,
    train_n_z3,
    wait_for,
    without_wall,
)

import reproduce_fig2 as rf


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    """The evaluation values of the `resumable_args` run, uninterrupted."""
    root = tmp_path_factory.mktemp("reference")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert rf.main(resumable_args(make_mnist_dir(root / "data"), root / "out")) == 0
    return measured(root / "out" / rf.RESULTS_NAME)


def by_run(path: Path) -> dict[tuple[str, int], tuple]:
    """measured() of a results file, keyed by (method, N_z)."""
    return {(m, d): (status, evals) for m, d, status, evals in measured(path)}


# -------------------------------------------------------------------------------- stops and kills
@pytest.fixture(scope="module")
def reference_two(tmp_path_factory: pytest.TempPathFactory) -> list[tuple]:
    """The evaluation values of the `resumable_args` runs of N_z = 2 and 3, uninterrupted."""
    root = tmp_path_factory.mktemp("reference_two")
    args = resumable_args(make_mnist_dir(root / "data"), root / "out", "--latent-dims", "2", "3")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert rf.main(args) == 0
    return measured(root / "out" / rf.RESULTS_NAME)


@pytest.mark.parametrize(
    "sig, code, jobs",
    [(signal.SIGINT, 130, "1"), (signal.SIGTERM, 143, "1"), (signal.SIGINT, 130, "2")],
    ids=["SIGINT", "SIGTERM", "SIGINT-workers"],
)
def test_a_stop_request_saves_and_the_same_command_resumes_exactly(
    sig: int,
    code: int,
    jobs: str,
    mnist_dir: Path,
    tmp_path: Path,
    reference_two: list[tuple],
    capfd: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    args = resumable_args(mnist_dir, out, "--latent-dims", "2", "3", "--jobs", jobs)
    checkpoint = out / "checkpoints" / "aevb_nz2.pt"
    # the signal goes to the main process alone (as kill or a scheduler sends it): with workers,
    # it passes the request on to them
    status, stdout, stderr = stop_at_first_checkpoint(args, checkpoint, sig)
    assert status == code, stderr
    assert "run the same command again to continue" in stderr and "Traceback" not in stderr
    # the wall time so far, without an estimate that the stop left unknown
    assert re.search(r"^wall time: \d+ s$", stdout, re.MULTILINE), stdout
    runs = json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    # the first run is interrupted after an evaluation; the second, in flight with it (in its
    # own worker: perhaps still starting), interrupted too
    assert runs[0]["status"] == "interrupted" and runs[0]["evals"]
    assert runs[1]["status"] in (("interrupted",) if jobs == "1" else ("interrupted", "pending"))
    assert (out / rf.FIGURE_NAME).exists() and checkpoint.exists()
    assert not rf.lock_holder(str(out / "runs" / "aevb_nz2.lock"))  # no worker left holding it

    assert rf.main(args) == 0
    printed = capfd.readouterr().out  # the workers' lines included
    resumed = re.search(r"\[aevb N_z=2\] resumed from its checkpoint at ([\d,]+) samples", printed)
    assert resumed, printed
    assert measured(out / rf.RESULTS_NAME) == reference_two  # both runs, as never stopped
    assert not checkpoint.exists()  # a finished run drops its checkpoint
    # the evaluations from before the stop are not shown again
    at = int(resumed.group(1).replace(",", ""))
    shown = [line for line in printed.splitlines() if line.startswith("[aevb N_z=2] samples")]
    assert len(shown) == len([e for e in reference_two[0][3] if e["samples"] > at])


def test_a_kill_between_evaluation_points_frees_the_run_and_resumes_from_the_timed_checkpoint(
    mnist_dir: Path, tmp_path: Path, reference: list[tuple], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = resumable_args(mnist_dir, out, "--checkpoint-every", "0.05")
    points = set(rf.schedule_of(rf.parse_command_line(args)[0]))
    checkpoint, run_file = out / "checkpoints" / "aevb_nz2.pt", out / "runs" / "aevb_nz2.json"

    def between_points() -> bool:
        with contextlib.suppress(FileNotFoundError, RuntimeError, EOFError):
            samples = torch.load(checkpoint, weights_only=True)["samples"]
            return run_file.exists() and samples not in points
        return False

    with running(args) as proc:
        while True:  # frozen, then checked again: no checkpoint can land between check and kill
            wait_for(between_points, proc, "a checkpoint between evaluation points")
            proc.send_signal(signal.SIGSTOP)
            if between_points():
                break
            proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=60)
    lock = out / "runs" / "aevb_nz2.lock"
    assert lock.exists() and rf.lock_holder(str(lock)) is None  # the kill released it
    cfg, cpu = rf.parse_command_line(args)[0], torch.device("cpu")
    data = rf.load_data(str(mnist_dir), cpu, False, cfg.seed, verify=False, download=False)
    _, todo = rf.open_results(cfg, data, cpu, rf.runs_of(cfg))  # what the estimate costs
    killed_at = torch.load(checkpoint, weights_only=True)["samples"]
    assert killed_at not in points  # no checkpoint of a point came between the wait and the kill
    assert todo == {rf.RunKey("aevb", 2): killed_at}
    assert rf.main(["--plot-only", "--out-dir", str(out)]) == 0
    (run,) = json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    assert run["status"] == "interrupted"  # "running" in its file, but nobody holds it

    assert rf.main(args) == 0
    assert "[aevb N_z=2] resumed from its checkpoint at" in capsys.readouterr().out
    assert measured(out / rf.RESULTS_NAME) == reference
    assert not checkpoint.exists()


def processes() -> list[tuple[int, str, int, int, bytes]]:
    """Every process now: pid, state, parent pid, process group and command line (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            cmdline = (stat.parent / "cmdline").read_bytes()
            found.append((int(stat.parent.name), state, int(ppid), int(pgrp), cmdline))
    return found


def group_pids(group: int) -> list[int]:
    """Pids of the live (not zombie) processes of process group `group`."""
    return [pid for pid, state, _, pgrp, _ in processes() if pgrp == group and state != "Z"]


def worker_pids(parent: int) -> list[int]:
    """Pids of the multiprocessing workers of `parent` (its children running spawn_main)."""
    return [pid for pid, _, ppid, _, cmd in processes() if ppid == parent and b"spawn_main" in cmd]


@pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker processes"
)
def test_a_worker_killed_outright_fails_only_its_run(mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = resumable_args(mnist_dir, out, "--latent-dims", "2", "3", "--jobs", "2")
    with running(args) as proc:
        wait_for(lambda: any((out / "checkpoints").glob("*.pt")), proc, "a first checkpoint")
        os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr
    runs = json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    assert sorted(r["status"] for r in runs) == ["done", "failed"]
    failed = next(r for r in runs if r["status"] == "failed")
    assert "exit status -9" in failed["error"] and f"N_z={failed['latent_dim']}] failed" in stderr


@pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="needs /proc to find the worker processes"
)
def test_ctrl_c_as_the_workers_start_stops_them_without_a_traceback(
    mnist_dir: Path, tmp_path: Path
) -> None:
    args = tiny_args(mnist_dir, tmp_path / "out", "--jobs", "2")
    proc = subprocess.Popen(
        [sys.executable, SCRIPT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal gives a command
    )
    try:
        wait_for(lambda: len(worker_pids(proc.pid)) == 2, proc, "the workers' start")
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, while the workers import torch
        _, stderr = proc.communicate(timeout=120)
        deadline = time.monotonic() + 30  # the workers end with it, none left behind
        while (left := group_pids(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the workers too, if it failed
        proc.wait(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert not left, f"workers outlived the Ctrl-C: {left}"


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
    assert (
        kept["samples"]
        == rf.schedule_of(rf.parse_command_line(resumable_args(mnist_dir, out))[0])[0]
    )
    assert not list(out.rglob(".tmp-*"))  # the half-written files are gone
    monkeypatch.setattr(os, "fdopen", real_fdopen)  # space freed
    assert rf.main(resumable_args(mnist_dir, out)) == 0
    assert measured(out / rf.RESULTS_NAME) == reference
    capsys.readouterr()
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullDisk(io.FileIO(fd, "w")))
    assert rf.main(["--plot-only", "--out-dir", str(out)]) == 1  # full again: a redraw says so
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on the device while writing ") and "\n" not in err
    assert measured(out / rf.RESULTS_NAME) == reference


def test_a_fault_in_the_main_process_leaves_no_worker_training_and_loses_nothing(
    mnist_dir: Path,
    tmp_path: Path,
    reference_two: list[tuple],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    out, real_receive = tmp_path / "out", rf.Workers.receive

    def receive(self: rf.Workers, timeout: float) -> bool:
        if real_receive(self, timeout):  # a worker's first message: its run is training
            raise RuntimeError("a bug in the main process")
        return False

    args = resumable_args(mnist_dir, out, "--latent-dims", "2", "3", "--jobs", "2")
    with monkeypatch.context() as patched:
        patched.setattr(rf.Workers, "receive", receive)
        with pytest.raises(RuntimeError, match="a bug in the main process"):
            rf.main(args)
    assert not multiprocessing.active_children()  # stopped and joined, not left behind
    assert rf.main(args) == 0  # the same command goes on
    assert measured(out / rf.RESULTS_NAME) == reference_two
    capfd.readouterr()


def test_a_full_disk_in_a_worker_is_one_line_and_a_rerun_resumes_to_the_right_numbers(
    mnist_dir: Path,
    tmp_path: Path,
    reference_two: list[tuple],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    out, patches = tmp_path / "out", tmp_path / "full_disk"
    patches.mkdir()
    # imported by the worker processes alone (this one has started): in each, the disk fills
    # after the first timed checkpoint's two files (the checkpoint and the run file)
    (patches / "sitecustomize.py").write_text(
        "import errno, io, os, tempfile\n"
        "real_mkstemp, real_fdopen, ours = tempfile.mkstemp, os.fdopen, []\n"
        "class FullDisk(io.BufferedWriter):\n"
        "    def write(self, data):\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "def mkstemp(*args, **kwargs):\n"
        "    fd, path = real_mkstemp(*args, **kwargs)\n"
        "    ours.append(fd)\n"
        "    return fd, path\n"
        "def fdopen(fd, *args, **kwargs):\n"
        "    if fd in ours[2:]:\n"
        "        return FullDisk(io.FileIO(fd, 'w'))\n"
        "    return real_fdopen(fd, *args, **kwargs)\n"
        "tempfile.mkstemp, os.fdopen = mkstemp, fdopen\n"
    )
    args = resumable_args(mnist_dir, out, "--latent-dims", "2", "3", "--jobs", "2")
    with monkeypatch.context() as patched:
        patched.setenv("PYTHONPATH", str(patches), prepend=os.pathsep)
        assert rf.main(args) == 1
    err = capfd.readouterr().err.strip()
    assert err.startswith("error: no space left on the device while writing ") and str(out) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    kept = [torch.load(p, weights_only=True)["samples"] for p in out.glob("checkpoints/*.pt")]
    assert 450 in kept  # the worker that filled the disk (the other may not have started)
    assert not list(out.rglob(".tmp-*"))  # the half-written files are gone
    assert not [r for r in out.glob("runs/*.json") if "failed" in r.read_text()]  # not their fault
    assert rf.main(args) == 0  # space freed
    assert "resumed from its checkpoint at 450 samples" in capfd.readouterr().out
    assert measured(out / rf.RESULTS_NAME) == reference_two


def test_a_checkpoint_folder_removed_by_another_process_during_a_save_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, key = rf.ResultsFolder(str(tmp_path), {"test": True}), rf.RunKey("aevb", 3)
    real_mkstemp, calls = tempfile.mkstemp, []

    def mkstemp(*args: object, dir: str, **kwargs: object) -> tuple[int, str]:
        calls.append(dir)
        if len(calls) == 1:  # another process's last run ended: the empty folder goes
            os.rmdir(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    folder.save_state(key, {"samples": 500})
    assert folder.load_state(key)["samples"] == 500 and len(calls) == 2


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
    ids=["results", "checkpoint"],
)
def test_a_kill_during_a_save_leaves_the_previous_file_whole(tmp_path: Path, save: str) -> None:
    paths = {"folder": str(tmp_path), "json": str(tmp_path / "r.json")}
    code = SAVE_THEN_HANG.format(root=str(ROOT), save=save, **paths)
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


def test_a_runs_clock_counts_its_training_not_the_set_up_before_it(
    synthetic_data: rf.Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    def capture(runs: list[rf.Run], cfg: rf.Config) -> rf.Advance:  # as CUDA graphs' does
        for run in runs:
            rf.load_run_state(run, rf.run_state(run))
            run.clock.start -= 1000  # as if capturing took 1000 s: not training either
        return rf.advance_eagerly

    monkeypatch.setattr(rf, "advance_on", capture)
    cfg = tiny_config()
    run = rf.start_run(rf.RunKey("aevb", 3), cfg, synthetic_data, None)
    run.clock.start -= 1000  # as if the runs started after it had spent 1000 s on their pilots
    assert rf.train([run], cfg, synthetic_data, lambda run: None)
    assert run.record["evals"][-1]["wall_seconds"] < 1000


# -------------------------------------------------------------------------------- divergence
def test_a_diverged_run_stops_alone_keeps_its_last_good_model_and_exits_3(
    mnist_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    original = rf.aevb_step

    def poisoned(vae: rf.VAE, opts: list, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        loss = original(vae, opts, x, gen)
        steps = max(float(state["step"]) for state in opts[0].state.values())  # the run's own
        # N_z = 2 from its first step; N_z = 3 after its first point (450 samples, 9 steps)
        if vae.latent_dim == 2 or steps > 9:
            with torch.no_grad():
                vae.decoder[2].bias.fill_(math.nan)
        return loss

    monkeypatch.setitem(rf.STEPS, "aevb", poisoned)
    out = tmp_path / "out"
    assert rf.main(tiny_args(mnist_dir, out)) == 3
    runs = {
        (r["method"], r["latent_dim"]): r
        for r in json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    }
    assert [runs["aevb", nz]["status"] for nz in (2, 3)] == ["diverged", "diverged"]
    assert runs["aevb", 2]["diverged_at"] == 450 and runs["aevb", 2]["evals"] == []
    assert runs["aevb", 3]["diverged_at"] == 1000 and len(runs["aevb", 3]["evals"]) == 1
    assert all(r["status"] == "done" for (method, _), r in runs.items() if method != "aevb")
    err = capsys.readouterr().err
    warned = {line.split("]")[0]: line for line in err.splitlines() if "diverged" in line}
    assert "last good state" not in warned["warning: [aevb N_z=2"]  # it had none
    assert f"its last good state is kept in {out / 'models'}" in warned["warning: [aevb N_z=3"]
    # its last good state, from its checkpoint, marked as such; none before a first point
    assert not (out / "models" / "aevb_nz2.pt").exists()
    saved = torch.load(out / "models" / "aevb_nz3.pt")
    assert saved["diverged"] is True and saved["samples"] == 450
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    assert not (out / "checkpoints").exists()  # ended runs keep no checkpoint
    fig = rf.plot_results(json.loads((out / rf.RESULTS_NAME).read_text()), str(tmp_path / "f.png"))
    assert len(fig.axes[0].get_lines()) == 2  # WS drawn; AEVB N_z = 2 has no good point to draw


def stopped_at_step(
    data: rf.Data, out: Path, stop: int = 25, loss: float | None = None
) -> tuple[rf.Run, rf.ResultsFolder]:
    """AEVB N_z = 3 trained in `out` (`tiny_config`: 50 samples a step, a point at 1,000) with a
    stop request during its step number `stop`, that step's loss replaced by `loss` if given."""
    cfg = tiny_config()
    folder = rf.ResultsFolder(str(out), {"test": True}, keys=(rf.RunKey("aevb", 3),))
    run = rf.start_run(rf.RunKey("aevb", 3), cfg, data, None)
    step, steps = run.step, []

    def stopping() -> torch.Tensor:
        steps.append(step())
        if len(steps) < stop:
            return steps[-1]
        rf.STOP_REQUEST.append(signal.SIGINT)
        return steps[-1] if loss is None else torch.tensor(loss)

    run.step = stopping
    try:
        assert not rf.train([run], cfg, data, folder.keep)
    finally:
        rf.STOP_REQUEST.clear()
    return run, folder


def test_a_stop_request_between_points_saves_the_state_it_stopped_at(
    synthetic_data: rf.Data, tmp_path: Path
) -> None:
    run, folder = stopped_at_step(synthetic_data, tmp_path)
    saved = folder.load_state(run.key)
    assert run.status == "interrupted" and saved["samples"] == run.samples == 1250
    for name, value in run.vae.state_dict().items():  # the parameters as they were at the stop
        assert torch.equal(saved["model"][name], value), name


def test_a_run_stopped_after_its_loss_went_non_finite_keeps_its_last_good_checkpoint(
    synthetic_data: rf.Data, tmp_path: Path
) -> None:
    run, folder = stopped_at_step(synthetic_data, tmp_path, loss=math.nan)
    assert run.status == "interrupted" and run.samples == 1250
    assert folder.load_state(run.key)["samples"] == 1000  # not the non-finite state


@pytest.mark.parametrize("stop", [20, 25], ids=["at-a-point", "between-points"])
def test_a_run_stopped_at_the_samples_asked_for_next_time_is_finished_there(
    synthetic_data: rf.Data, tmp_path: Path, stop: int
) -> None:
    stopped, folder = stopped_at_step(synthetic_data, tmp_path / "stopped", stop)
    assert (
        stopped.status == "interrupted" and folder.load_state(stopped.key)["samples"] == 50 * stop
    )
    cfg = tiny_config(samples=50 * stop)  # its points: 1,000 (scored before the stop) and its end
    run = rf.start_run(stopped.key, cfg, synthetic_data, folder.resume_state(stopped.key))
    assert rf.train([run], cfg, synthetic_data, folder.keep) and run.status == "done"
    alone = rf.start_run(stopped.key, cfg, synthetic_data, None)
    assert rf.train([alone], cfg, synthetic_data, lambda run: None)
    assert [without_wall(e) for e in run.record["evals"]] == [
        without_wall(e) for e in alone.record["evals"]
    ]
    assert run.record["log_px"] == alone.record["log_px"]


# -------------------------------------------------------------------------------- settings
def test_a_finished_run_extended_gives_the_numbers_of_one_long_run(
    finished: Finished, mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = finished.copy(tmp_path / "out")  # 1,200 samples: not a point of 10,000
    longer = ("--latent-dims", "2", "--samples", "10000")
    # a kill between a run's last writes leaves an earlier checkpoint beside its final model
    assert (
        rf.main(tiny_args(mnist_dir, tmp_path / "short", "--latent-dims", "2", "--samples", "1000"))
        == 0
    )
    (out / "checkpoints").mkdir()
    os.replace(tmp_path / "short" / "models" / "aevb_nz2.pt", out / "checkpoints" / "aevb_nz2.pt")
    assert rf.main(tiny_args(mnist_dir, out, *longer)) == 0
    printed = capsys.readouterr().out
    assert "[aevb N_z=2] extended from its end at 1,200 samples" in printed
    assert "--fresh" not in printed
    assert rf.main(tiny_args(mnist_dir, tmp_path / "one_go", *longer)) == 0
    runs = json.loads((out / rf.RESULTS_NAME).read_text())["runs"]
    before = json.loads((finished.out / rf.RESULTS_NAME).read_text())["runs"]
    log_px_before = {r["method"]: r["log_px"] for r in before if r["latent_dim"] == 2}
    extended = [r for r in runs if r["latent_dim"] == 2]
    one_go = json.loads((tmp_path / "one_go" / rf.RESULTS_NAME).read_text())["runs"]
    assert [r["method"] for r in extended] == [r["method"] for r in one_go] == list(rf.METHODS)
    for run, alone in zip(extended, one_go, strict=True):
        assert run["status"] == "done" and run["log_px"] == alone["log_px"]  # estimated again
        evals = [without_wall(e) for e in run["evals"]]
        assert 1200 in [e["samples"] for e in evals]  # measured before: kept
        assert run["earlier_log_px"] == [log_px_before[run["method"]] | {"samples": 1200}]
        assert [e for e in evals if e["samples"] != 1200] == [
            without_wall(e) for e in alone["evals"]
        ]
        saved = torch.load(out / "models" / f"{rf.RunKey.of(run).stem}.pt")
        assert saved["samples"] == 10000 and saved["optimizers"] and "generator" in saved
    # the runs not asked for stay as they were
    assert [m for m in measured(out / rf.RESULTS_NAME) if m[1] == 3] == [
        m for m in measured(finished.out / rf.RESULTS_NAME) if m[1] == 3
    ]


def test_a_run_with_evaluations_but_nothing_to_go_on_from_is_refused_not_started_over(
    finished: Finished, mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = finished.copy(tmp_path / "out")
    (out / "models" / "aevb_nz2.pt").unlink()  # as in a folder copied without its models
    run_file = out / "runs" / "aevb_nz2.json"
    before = run_file.read_text()
    assert rf.main(tiny_args(mnist_dir, out, "--samples", "10000")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: [aevb N_z=2] has evaluations to 1,200 samples in ")
    assert f"or move the run file out of {out / 'runs'} to train this run again" in err
    assert err.endswith("or pass --fresh to start all runs over (the old files are kept aside)")
    assert "\n" not in err and str(out / "models" / "aevb_nz2.pt") in err
    assert run_file.read_text() == before
    # the way out the message gives: that run alone trains again, to the numbers it had
    run_file.rename(tmp_path / "aside.json")
    assert rf.main(tiny_args(mnist_dir, out)) == 0
    again, old = (json.loads(run_file.read_text())["run"], json.loads(before)["run"])
    assert [without_wall(e) for e in again["evals"]] == [without_wall(e) for e in old["evals"]]
    assert again["log_px"] == old["log_px"] and again["status"] == "done"
    assert "[aevb N_z=3] already done: skipped" in capsys.readouterr().out


def test_a_run_killed_between_its_final_model_and_its_run_file_is_done_when_called_again(
    finished: Finished, mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = finished.copy(tmp_path / "out")
    run_file = out / "runs" / "aevb_nz2.json"
    saved = json.loads(run_file.read_text())
    done = saved["run"]
    # its run file as the kill left it: still running, without its last evaluation and log p(x)
    before = {k: v for k, v in done.items() if k != "log_px"} | {"status": "running"}
    run_file.write_text(json.dumps(saved | {"run": before | {"evals": done["evals"][:-1]}}))
    assert rf.main(tiny_args(mnist_dir, out)) == 0
    assert "[aevb N_z=2] already done: skipped" in capsys.readouterr().out
    assert json.loads(run_file.read_text())["run"] == done


def test_a_folder_refuses_other_settings_in_one_line_and_not_those_that_keep_the_numbers(
    finished: Finished,
    mnist_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = finished.copy(tmp_path / "out")
    same_numbers = ("--threads", "2", "--jobs", "2", "--graph-steps", "9", "--iw-samples", "7")
    monkeypatch.setattr(rf, "LR_CANDIDATES", (0.5,))  # the pilots' step sizes, with a fixed lr
    assert rf.main(tiny_args(mnist_dir, out, *same_numbers, "--lr-pilot-samples", "9")) == 0
    assert capsys.readouterr().out.count("already done: skipped") == 4
    (out / rf.RESULTS_NAME).unlink()  # only the run files tell, even of runs not asked for
    assert rf.main(tiny_args(mnist_dir, out, "--latent-dims", "5", "--seed", "7")) == 2
    err = capsys.readouterr().err
    assert str(out / "runs" / "aevb_nz2.json") in err and "seed 1926 -> 7" in err
    assert "--fresh" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "flags, differ",
    [
        (("--hidden-size", "17"), "hidden_size 16 -> 17"),
        (("--lr", "0.01"), "lr 0.02 -> 0.01"),
        (("--lr", "auto"), "lr 0.02 -> 'auto'"),
        (("--batch-size", "25"), "batch_size 50 -> 25"),
        (("--binarize",), "binarize False -> True"),
        (("--eval-start", "200"), "eval_start 300 -> 200"),
        (("--evals-per-decade", "2"), "evals_per_decade 3 -> 2"),
        (("INIT_STD", 0.02), "init_std 0.01 -> 0.02"),
        (("WEIGHT_DECAY", 1e-4), "weight_decay 1.6666666666666667e-05 -> 0.0001"),
        (("MC_SAMPLES", 2), "mc_samples 1 -> 2"),
        (("EVAL_BATCH_SIZE", 7), "eval_batch_size 5000 -> 7"),
        (("torch", "0.0"), "torch"),
        (("pyautoencoder", "0.0"), "pyautoencoder"),
        (("data", 0), "data_sha256"),
    ],
    ids=[
        *(
            "hidden-size",
            "lr",
            "lr-auto",
            "batch-size",
            "binarize",
            "eval-start",
            "evals-per-decade",
        ),
        *("init-std", "weight-decay", "mc-samples", "eval-batch-size"),
        *("torch", "pyautoencoder", "data"),
    ],
)
def test_every_setting_that_changes_the_numbers_is_refused_by_a_folder_of_others(
    flags: tuple,
    differ: str,
    finished: Finished,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, data_dir = finished.copy(tmp_path / "out"), finished.data_dir
    name, value = flags[0], flags[1:]
    if name.isupper():  # a constant without a flag
        monkeypatch.setattr(rf, name, value[0])
        flags = ()
    elif name in ("torch", "pyautoencoder"):  # another version of a package that computes
        versions = rf.package_versions() | {name: value[0]}
        monkeypatch.setattr(rf, "package_versions", lambda: versions)
        flags = ()
    elif name == "data":  # other files: a training set of 401 images
        data_dir, flags = make_mnist_dir(tmp_path / "other", n_train=401), ()
    assert rf.main(tiny_args(data_dir, out, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert "was made with other settings: " in err and differ in err and "\n" not in err
    assert err.endswith("or use another --out-dir")


def test_an_unreadable_checkpoint_is_reported_not_discarded(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = tiny_args(mnist_dir, out, "--latent-dims", "2", "--methods", "aevb")
    ckpt = out / "checkpoints" / "aevb_nz2.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": torch.zeros(1000)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # cut short, as a crash of the disk leaves it
    assert rf.main(args) == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "cannot be read" in err and "--fresh" in err
    assert ckpt.stat().st_size == 1000  # still there, untouched
    assert rf.main([*args, "--fresh"]) == 0
    assert [p.name for p in out.glob("checkpoints.*/aevb_nz2.pt")] == ["aevb_nz2.pt"]  # kept aside


def test_a_stop_during_pilots_keeps_the_step_sizes_already_chosen(
    mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    piloted, original = [], rf.pick_lr

    def ctrl_c_in_the_second_pilots(key: rf.RunKey, *args: object) -> tuple:
        piloted.append(key.latent_dim)
        if piloted == [2, 3]:  # as the second run's pilots start
            rf.request_stop(signal.SIGINT, None)
            rf.stop_if_requested()
        return original(key, *args)

    monkeypatch.setattr(rf, "pick_lr", ctrl_c_in_the_second_pilots)
    out = tmp_path / "out"
    args = tiny_args(mnist_dir, out, "--methods", "aevb", "--lr", "auto")
    args += ["--lr-pilot-samples", "100"]
    assert rf.main(args) == 130
    kept = torch.load(out / "checkpoints" / "aevb_nz2.pt", weights_only=True)
    assert kept["samples"] == 0 and set(kept["run"]["lr_pilot_scores"]) == {"0.01", "0.02", "0.1"}
    assert rf.main(args) == 0
    assert piloted == [2, 3, 3]  # N_z = 2 went on with the step size its pilots chose


def test_under_lr_auto_a_folder_refuses_other_pilots_and_not_the_same_ones(
    mnist_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    args = tiny_args(mnist_dir, out, "--methods", "aevb", "--latent-dims", "2", "--lr", "auto")
    args += ["--samples", "300", "--lr-pilot-samples", "100"]
    assert rf.main(args) == 0
    assert rf.main(args) == 0 and "already done: skipped" in capsys.readouterr().out
    monkeypatch.setattr(rf, "LR_CANDIDATES", (0.01, 0.02))
    assert rf.main(args) == 2
    assert "lr_candidates [0.01, 0.02, 0.1] -> [0.01, 0.02]" in capsys.readouterr().err
    monkeypatch.undo()
    assert rf.main([*args, "--lr-pilot-samples", "200"]) == 2
    assert "lr_pilot_samples 100 -> 200" in capsys.readouterr().err


def stray_copy(runs: Path) -> None:
    """A run file copied beside itself, as a user keeping a backup would."""
    shutil.copy(runs / "aevb_nz2.json", runs / "aevb_nz2_backup.json")


def without_evals(runs: Path) -> None:
    """A run file edited by hand, its evaluations gone."""
    saved = json.loads((runs / "aevb_nz2.json").read_text())
    del saved["run"]["evals"]
    (runs / "aevb_nz2.json").write_text(json.dumps(saved))


def not_a_record(runs: Path) -> None:
    """A run file whose record is not one."""
    saved = json.loads((runs / "aevb_nz2.json").read_text())
    (runs / "aevb_nz2.json").write_text(json.dumps(saved | {"run": []}))


def not_an_object(runs: Path) -> None:
    """A run file whose JSON is not an object."""
    (runs / "aevb_nz2.json").write_text("[]")


@pytest.mark.parametrize("damage", [stray_copy, without_evals, not_a_record, not_an_object])
def test_a_damaged_or_stray_run_file_is_refused_in_one_line(
    damage: Callable[[Path], None],
    finished: Finished,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = finished.copy(tmp_path / "out")
    damage(out / "runs")
    for verb in ([], ["--plot-only"]):
        assert rf.main(tiny_args(finished.data_dir, out, *verb)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert str(out / "runs" / "aevb_nz2") in err


def test_a_stray_run_file_put_there_while_runs_train_stops_none_and_is_refused_after(
    finished: Finished,
    mnist_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out, save_state, copies = tmp_path / "out", rf.ResultsFolder.save_state, []

    def then_a_stray_copy(folder: rf.ResultsFolder, *args: object, **kwargs: object) -> None:
        save_state(folder, *args, **kwargs)
        if (out / "runs" / "aevb_nz2.json").exists() and not copies:
            stray_copy(out / "runs")  # after the first evaluation of the first run
            copies.append(out / "runs" / "aevb_nz2_backup.json")

    monkeypatch.setattr(rf.ResultsFolder, "save_state", then_a_stray_copy)
    assert rf.main(tiny_args(mnist_dir, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "aevb_nz2_backup.json" in err
    (out / "runs" / "aevb_nz2_backup.json").unlink()
    assert rf.main(["--plot-only", "--out-dir", str(out)]) == 0
    assert measured(out / rf.RESULTS_NAME) == measured(finished.out / rf.RESULTS_NAME)


def test_a_damaged_model_leaves_the_samples_picture_without_it(
    finished: Finished,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = finished.copy(tmp_path / "out")
    model = out / "models" / "aevb_nz2.pt"
    model.write_bytes(model.read_bytes()[:1000])
    (out / rf.SAMPLES_NAME).unlink()  # redrawn below, or the test shows nothing
    drawn: list[rf.RunKey] = []

    def plot_samples(models: dict, *args: object) -> object:
        drawn.extend(models)
        return real_plot_samples(models, *args)

    real_plot_samples = rf.plot_samples
    monkeypatch.setattr(rf, "plot_samples", plot_samples)
    assert rf.main(tiny_args(finished.data_dir, out)) == 0  # every run done: nothing to train
    err = capsys.readouterr().err
    assert f"{model} cannot be read" in err and "Traceback" not in err
    assert (out / rf.SAMPLES_NAME).exists()
    assert drawn and rf.RunKey("aevb", 2) not in drawn  # the other models, without it


def test_fresh_refuses_a_folder_that_another_process_trains(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    other, holder = rf.take_lock(str(out / "runs" / "aevb_nz2.lock"))  # another invocation
    assert holder is None
    try:
        assert rf.main(tiny_args(mnist_dir, out, "--fresh")) == 2
    finally:
        other.release()
    err = capsys.readouterr().err
    assert "--fresh would set aside runs that" in err and "is training" in err
    assert (out / "runs" / "aevb_nz2.lock").exists() and not list(tmp_path.glob("out/runs.*"))


# -------------------------------------------------------------------------------- shared folders
def test_two_invocations_sharing_a_folder_lose_nothing(
    mnist_dir: Path, tmp_path: Path, reference: list[tuple]
) -> None:
    out = tmp_path / "out"
    first = resumable_args(mnist_dir, out, "--latent-dims", "2", "3")
    second = resumable_args(mnist_dir, out, "--latent-dims", "4")
    with running(first) as a:
        wait_for((out / "runs" / "aevb_nz2.json").exists, a, "its first evaluation")
        with running(second) as b:
            assert b.wait(timeout=120) == 0, b.communicate()[1]
        assert a.wait(timeout=120) == 0, a.communicate()[1]
    shared = by_run(out / rf.RESULTS_NAME)
    assert sorted(shared) == [("aevb", 2), ("aevb", 3), ("aevb", 4)]
    points = rf.schedule_of(rf.parse_command_line(first)[0])
    for status, evals in shared.values():
        assert status == "done" and [e["samples"] for e in evals] == points
    assert [("aevb", 2, *shared["aevb", 2])] == reference


def test_asking_who_holds_a_free_lock_leaves_its_file_as_it_was(tmp_path: Path) -> None:
    lock = tmp_path / "aevb_nz2.lock"
    lock.write_text("host pid 1")  # its last holder
    assert rf.lock_holder(str(lock)) is None
    assert lock.read_text() == "host pid 1"


def test_a_run_another_invocation_trains_is_left_to_it_and_the_same_command_finishes_it(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = tiny_args(mnist_dir, out, "--methods", "aevb")  # N_z = 2 and 3
    other, holder = rf.take_lock(str(out / "runs" / "aevb_nz2.lock"))  # another invocation
    assert holder is None
    try:
        assert rf.main(args) == 0
    finally:
        other.release()
    printed = capsys.readouterr().out
    holder = f"{socket.gethostname()} pid {os.getpid()}"
    assert f"[aevb N_z=2] skipped: {holder} is training it" in printed
    assert f"left to another process: [aevb N_z=2], held by {holder}" in printed
    assert "[aevb N_z=2] training on" not in printed and "[aevb N_z=3] training on" in printed
    assert by_run(out / rf.RESULTS_NAME)["aevb", 3][0] == "done"
    # the holder gone (its run not done), the same command trains what is left, once
    assert rf.main(args) == 0
    printed = capsys.readouterr().out
    assert "[aevb N_z=3] already done: skipped" in printed
    assert printed.count("] training on ") == 1 and "[aevb N_z=2] training on" in printed
    assert all(status == "done" for status, _ in by_run(out / rf.RESULTS_NAME).values())


def test_finished_runs_beyond_a_smaller_samples_are_kept_as_they_are(
    finished: Finished, mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = finished.copy(tmp_path / "out")
    before = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    assert rf.main(tiny_args(mnist_dir, out, "--samples", "1000")) == 0
    assert capsys.readouterr().out.count("already done: skipped") == 4
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json")} == before
    assert measured(out / rf.RESULTS_NAME) == measured(finished.out / rf.RESULTS_NAME)


def test_an_unfinished_run_beyond_a_smaller_samples_is_refused_in_one_line(
    mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = tiny_args(mnist_dir, tmp_path / "out", "--samples", "300")
    cfg, cpu = rf.parse_command_line(args)[0], torch.device("cpu")
    data = rf.load_data(str(mnist_dir), cpu, False, cfg.seed, verify=False, download=False)
    folder = rf.ResultsFolder(cfg.out_dir, rf.fingerprint(cfg, data, cpu))
    folder.save_state(rf.RunKey("aevb", 2), {"samples": 500})  # as if stopped at 500 samples
    assert rf.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: [aevb N_z=2] has trained 500 samples, beyond --samples 300; ask for at least "
        "that many, or pass --fresh to start over"
    )
