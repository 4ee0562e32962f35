"""Reproducible numbers: the same settings give the same numbers wherever they train."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import Finished, measured, step_counters, tiny_args, tiny_config, without_wall

import reproduce_fig2 as rf


def records(runs: list[rf.Run]) -> list[tuple[rf.RunKey, str, list[dict]]]:
    """Each run's key, status and evaluations without wall-clock times."""
    return [(r.key, r.status, [without_wall(e) for e in r.record["evals"]]) for r in runs]


def start_all(cfg: rf.Config, data: rf.Data) -> list[rf.Run]:
    """Every run of `cfg`, fresh."""
    return [rf.start_run(key, cfg, data, None) for key in rf.runs_of(cfg)]


def test_the_same_settings_give_the_same_numbers_and_another_seed_others(
    finished: Finished, mnist_dir: Path, tmp_path: Path
) -> None:
    # the finished invocation's N_z = 2 runs again, each beside a second seed, in one process
    # and in worker processes, and with another master seed
    seeds = ("--latent-dims", "2", "--seeds", "2")
    assert rf.main(tiny_args(mnist_dir, tmp_path / "here", *seeds, "--jobs", "1")) == 0
    assert rf.main(tiny_args(mnist_dir, tmp_path / "workers", *seeds, "--jobs", "2")) == 0
    assert (
        rf.main(tiny_args(mnist_dir, tmp_path / "seed7", "--latent-dims", "2", "--seed", "7")) == 0
    )
    here = measured(tmp_path / "here" / rf.RESULTS_NAME)
    assert measured(tmp_path / "workers" / rf.RESULTS_NAME) == here
    runs = json.loads((tmp_path / "here" / rf.RESULTS_NAME).read_text())["runs"]
    assert [(r["method"], r["seed_index"]) for r in runs] == [
        ("aevb", 0),
        ("aevb", 1),
        ("wake-sleep", 0),
        ("wake-sleep", 1),
    ]
    assert sorted(p.name for p in (tmp_path / "here" / "runs").glob("*.json")) == [
        "aevb_nz2.json",
        "aevb_nz2_seed1.json",
        "wake-sleep_nz2.json",
        "wake-sleep_nz2_seed1.json",
    ]
    # the first seed is the run a single-seed invocation makes, the second another
    alone = [m for m in measured(finished.out / rf.RESULTS_NAME) if m[1] == 2]
    assert [here[0], here[2]] == alone and all(e[3] for e in here)
    assert here[1][3] != here[0][3] and here[3][3] != here[2][3]
    seed7 = measured(tmp_path / "seed7" / rf.RESULTS_NAME)
    assert [m[:3] for m in seed7] == [m[:3] for m in alone] and seed7 != alone


def test_the_thread_count_does_not_change_the_numbers_at_the_papers_sizes(
    mnist_dir: Path, tmp_path: Path
) -> None:
    # 500 hidden units, minibatches of 100: matrices large enough for torch to split over threads
    paper = ("--hidden-size", "500", "--batch-size", "100", "--latent-dims", "20")
    paper += ("--samples", "2000", "--eval-start", "1000", "--iw-samples", "10")
    for threads in ("1", "2"):
        args = tiny_args(mnist_dir, tmp_path / threads, *paper, "--threads", threads)
        assert rf.main(args) == 0
    one, two = (json.loads((tmp_path / t / rf.RESULTS_NAME).read_text()) for t in ("1", "2"))
    assert measured(tmp_path / "2" / rf.RESULTS_NAME) == measured(tmp_path / "1" / rf.RESULTS_NAME)
    assert [r["log_px"] for r in two["runs"]] == [r["log_px"] for r in one["runs"]]
    assert [r["threads"] for r in one["runs"] + two["runs"]] == [1, 1, 2, 2]


def test_runs_in_lockstep_give_the_numbers_of_each_run_alone(synthetic_data: rf.Data) -> None:
    # both methods, two latent sizes, two seeds: eight runs of a second or two together,
    # evaluated at 1,000, 1,800 and 2,000 samples
    cfg = tiny_config(
        methods=rf.METHODS, latent_dims=(2, 3), seeds=2, samples=2000, evals_per_decade=4
    )
    together = start_all(cfg, synthetic_data)
    assert rf.train(together, cfg, synthetic_data, lambda run: None)
    alone = start_all(cfg, synthetic_data)
    for run in alone:
        assert rf.train([run], cfg, synthetic_data, lambda run: None)
    assert records(together) == records(alone)
    assert all(r.status == "done" and len(r.record["evals"]) == 3 for r in together)
    assert len({str(r.record["evals"]) for r in together}) == 8  # eight different runs


# -------------------------------------------------------------------------------- CUDA stand-ins
class StandInStream:
    """torch.cuda.Stream on the CPU: nothing to order."""

    def wait_stream(self, other: StandInStream) -> None:
        pass


class StandInGraph:
    """torch.cuda.CUDAGraph on the CPU: a replay runs the captured run's steps, the host's
    minibatch count and Adagrad's step counters left alone as a real replay leaves them (the
    engine counts both on the host). A replay that crosses an epoch's end fails as a real one
    would read past the epoch's order: the minibatch index runs off it."""

    capturing = False
    run: rf.Run
    steps: int

    def register_generator_state(self, gen: torch.Generator) -> None:
        pass

    def replay(self) -> None:
        pos = self.run.batches.pos
        counters = [state["step"] for opt in self.run.opts for state in opt.state.values()]
        before = [float(c) for c in counters]
        for _ in range(self.steps):
            self.run.step()
        self.run.batches.pos = pos
        for counter, value in zip(counters, before, strict=True):
            counter.fill_(value)


class StandInEngine(rf.CudaGraphs):
    """The CUDA engine over stand-in graphs, each told which run and how many steps it holds;
    an advance that overruns its target fails at once (the loop would wait for it forever)."""

    def advance(self, runs: list[rf.Run], target: int, until: float = math.inf) -> bool:
        moved = super().advance(runs, target, until)
        assert all(run.samples <= target for run in runs), f"a replay overran {target:,}"
        return moved

    def capture_graphs(self, run: rf.Run, saved: dict) -> rf.Graphed:
        graphed = super().capture_graphs(run, saved)
        for steps, graph in graphed.graphs.items():
            graph.run, graph.steps = run, steps  # type: ignore[attr-defined]
        return graphed


@pytest.fixture
def stand_in_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda's streams and graphs replaced by stand-ins that run on the CPU (a capture
    runs its steps for real there: the engine must undo them)."""

    @contextlib.contextmanager
    def graph(graph: StandInGraph, stream: StandInStream) -> Iterator[None]:
        StandInGraph.capturing = True
        try:
            yield
        finally:
            StandInGraph.capturing = False

    host = StandInStream()
    monkeypatch.setattr(torch.cuda, "Stream", StandInStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: host)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: StandInGraph.capturing)


def test_the_cuda_engine_gives_the_eager_numbers_over_stand_in_graphs(
    synthetic_data: rf.Data, stand_in_cuda: None
) -> None:
    # the engine's own logic on the CPU: capture undone, replays counted on the host, epochs
    # started between replays. An epoch is 8 minibatches of 50, a long graph 7 steps, and the
    # points (1,000 and 2,500 samples) fall inside epochs: a long replay would overrun an
    # epoch's end after each long one, and the target 2 steps into the last epoch.
    cfg = tiny_config(methods=rf.METHODS, samples=2500)
    graphed, eager = start_all(cfg, synthetic_data), start_all(cfg, synthetic_data)
    engine = StandInEngine(steps=7)
    assert rf.train(graphed, cfg, synthetic_data, lambda run: None, engine.advance)
    assert rf.train(eager, cfg, synthetic_data, lambda run: None)
    assert all(set(engine.graphs[id(run)].graphs) == {7, 1} for run in graphed)
    assert records(graphed) == records(eager)
    # what a checkpoint holds: Adagrad's step counters, advanced on the host by each replay
    for g, e in zip(graphed, eager, strict=True):
        assert step_counters(g) == step_counters(e) == [2500 / 50] * len(step_counters(e))


def test_a_capture_that_fails_partway_is_one_line_that_names_the_way_out(
    synthetic_data: rf.Data, stand_in_cuda: None
) -> None:
    def host_sync_in_capture(run: rf.Run) -> None:
        step = run.step

        def syncing() -> torch.Tensor:
            if StandInGraph.capturing:  # what .item() inside a real capture does
                raise RuntimeError("operation not permitted when stream is capturing")
            return step()

        run.step = syncing

    runs = start_all(tiny_config(), synthetic_data)
    host_sync_in_capture(runs[0])
    with pytest.raises(rf.CaptureError) as failed:
        StandInEngine(steps=7).capture_all(runs)
    message = str(failed.value)
    assert message.startswith("[aevb N_z=3] its training step could not be captured")
    assert "(RuntimeError: operation not permitted" in message and "--graph-steps 0" in message
    assert "\n" not in message
