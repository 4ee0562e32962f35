"""Training: Adagrad with weight decay, the AEVB and wake-sleep steps, the loop, the schedule."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import signal
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REAL_MNIST, tiny_config, train_n_z3, without_wall
from torch.nn.functional import binary_cross_entropy_with_logits

import reproduce_fig2 as rf


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    """Copies of a module's parameters."""
    return [p.detach().clone() for p in module.parameters()]


def unchanged(before: list[torch.Tensor], now: Iterable[torch.Tensor]) -> list[bool]:
    """For each parameter, whether it still equals its copy in `before`."""
    return [torch.equal(a, p) for a, p in zip(before, now, strict=True)]


def test_weight_decay_shrinks_a_parameter_without_data_gradient(synthetic_data: rf.Data) -> None:
    torch.manual_seed(0)
    vae = rf.build_vae(latent_dim=3, hidden_size=16)
    x = rf.pixels(synthetic_data.train[:50])
    # pixel 0 is black: its encoder weights get no data gradient
    assert float(x[:, 0, 0, 0].abs().max()) == 0.0
    opts = rf.make_optimizers(vae, "aevb", lr=0.02, fused=True)
    w = vae.encoder[1].weight
    before = w[:, 0].detach().clone()
    rf.aevb_step(vae, opts, x, torch.Generator().manual_seed(0))
    g = rf.WEIGHT_DECAY * before  # the gradient of ||theta||^2 / (2N)
    expected = before - 0.02 * g / (g.abs() + 1e-10)  # Adagrad's first step: state_sum = g^2
    assert torch.allclose(w[:, 0].detach(), expected, rtol=1e-5, atol=1e-9)
    assert float((w[:, 0].detach() - before).abs().min()) > 0.019  # it moved by about one step size


def test_eval_schedule_is_log_spaced_in_whole_minibatches_to_the_target() -> None:
    s = rf.eval_schedule(10_000_000, 100, 100_000, 10)
    assert s[0] == 100_000 and s[-1] == 10_000_000 and len(s) == 21
    assert all(p % 100 == 0 for p in s) and s == sorted(set(s))
    ratios = [b / a for a, b in itertools.pairwise(s)]
    assert all(abs(r - 10**0.1) < 0.01 for r in ratios)
    assert rf.eval_schedule(1_000_000, 100, 100_000, 1) == [100_000, 1_000_000]
    # a target below the start: one point, the target
    assert rf.eval_schedule(3000, 100, 100_000, 10) == [3000]
    assert rf.eval_schedule(250_050, 100, 100_000, 10)[-1] == 250_000  # whole minibatches
    assert rf.eval_schedule(1000, 50, 100, 2) == [100, 300, 1000]


def test_training_raises_the_elbo_for_both_methods(synthetic_data: rf.Data) -> None:
    for method in rf.METHODS:
        cfg = tiny_config(methods=(method,))
        record = {"seed": rf.setting_seed(cfg.seed, method, 3), "lr": 0.02}
        fresh = rf.new_run(rf.RunKey(method, 3), record, cfg, synthetic_data)
        start = rf.evaluate_elbo(fresh.vae, synthetic_data.train_eval)["elbo"]
        run = train_n_z3(cfg, synthetic_data, method)
        assert run["status"] == "done" and [e["samples"] for e in run["evals"]] == [1000, 3000]
        assert run["evals"][-1]["train_elbo"] > start + 100, method
        assert run["evals"][-1]["train_elbo"] > run["evals"][0]["train_elbo"], method


def test_wake_step_moves_only_the_decoder(synthetic_data: rf.Data) -> None:
    torch.manual_seed(0)
    vae = rf.build_vae(3, 16)
    dec_opt, _ = rf.make_optimizers(vae, "wake-sleep", 0.02, fused=True)
    enc_before, dec_before = (
        params_of(vae.encoder) + params_of(vae.sampling_layer),
        params_of(vae.decoder),
    )
    rf.wake_step(
        vae, dec_opt, rf.pixels(synthetic_data.train[:50]), torch.Generator().manual_seed(0)
    )
    assert all(unchanged(enc_before, rf.encoder_parameters(vae)))
    assert not any(unchanged(dec_before, vae.decoder.parameters()))


def test_sleep_step_moves_only_the_encoder_and_its_loss_is_log_q() -> None:
    torch.manual_seed(0)
    vae = rf.build_vae(3, 16, init_std=0.2)
    twin = copy.deepcopy(vae)
    _, enc_opt = rf.make_optimizers(vae, "wake-sleep", 0.02, fused=True)
    enc_before, dec_before = (
        params_of(vae.encoder) + params_of(vae.sampling_layer),
        params_of(vae.decoder),
    )
    loss = rf.sleep_step(vae, enc_opt, 20, torch.Generator().manual_seed(42))
    assert all(unchanged(dec_before, vae.decoder.parameters()))
    assert not any(unchanged(enc_before, rf.encoder_parameters(vae)))

    torch.manual_seed(42)
    with torch.no_grad():
        z = torch.randn(20, 3)
        x = torch.bernoulli(torch.sigmoid(twin.decoder(z)))
        mu, log_var = twin.sampling_layer.get_params(twin.encoder(x))
        expected = (
            -torch.distributions.Normal(mu, torch.exp(0.5 * log_var)).log_prob(z).sum(-1).mean()
        )
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_wake_loss_is_bernoulli_log_likelihood(synthetic_data: rf.Data) -> None:
    torch.manual_seed(0)
    vae = rf.build_vae(3, 16, init_std=0.2)
    twin = copy.deepcopy(vae)
    dec_opt, _ = rf.make_optimizers(vae, "wake-sleep", 0.02, fused=True)
    x = rf.pixels(synthetic_data.train[:30])
    loss = rf.wake_step(vae, dec_opt, x, torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    with torch.no_grad():
        mu, log_var = twin.sampling_layer.get_params(twin.encoder(x))
        z = mu + torch.exp(0.5 * log_var) * torch.randn(30, 1, 3).squeeze(1)
        logits = twin.decoder(z)
        expected = (
            binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).mean()
        )
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_auto_step_size_picks_the_best_pilot(
    synthetic_data: rf.Data, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(rf, "LR_CANDIDATES", (1e-6, 0.05, 1e30))
    cfg = tiny_config(lr="auto", lr_pilot_samples=500, samples=500, eval_start=500)
    run = train_n_z3(cfg, synthetic_data)
    scores = run["lr_pilot_scores"]
    assert set(scores) == {"1e-06", "0.05", "1e+30"}
    assert run["lr"] == 0.05 and scores["0.05"] > scores["1e-06"]
    # the pilot that blows up is recorded as diverged and scored worst
    assert scores["1e+30"] is None
    # the pick is the candidate a plain run with that step size would also score best
    plain = train_n_z3(tiny_config(lr=0.05, samples=500, eval_start=500), synthetic_data)
    assert plain["evals"][-1]["train_elbo"] == pytest.approx(scores["0.05"], abs=1e-9)
    assert "chose lr 0.05" in capsys.readouterr().out


def test_non_finite_loss_marks_the_run_diverged(
    synthetic_data: rf.Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = rf.aevb_step

    def poisoned(vae: rf.VAE, opts: list, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        loss = original(vae, opts, x, gen)
        with torch.no_grad():
            vae.decoder[2].bias.fill_(math.nan)
        return loss

    monkeypatch.setitem(rf.STEPS, "aevb", poisoned)
    run = train_n_z3(tiny_config(), synthetic_data)
    assert run["status"] == "diverged" and run["diverged_at"] == 1000 and run["evals"] == []


@pytest.mark.skipif(
    not (REAL_MNIST / "MNIST" / "raw").is_dir(), reason=f"real MNIST not found at {REAL_MNIST}"
)
def test_real_mnist_nz3_reaches_minus_175_in_200k_samples() -> None:
    torch.set_num_threads(2)
    try:
        data = rf.load_data(
            str(REAL_MNIST),
            torch.device("cpu"),
            binarize=False,
            seed=rf.SEED,
            verify=True,
            download=False,
        )
        cfg = rf.Config(
            latent_dims=(3,), methods=("aevb",), samples=200_000, iw_samples=1, threads=1
        )
        run = train_n_z3(cfg, data)
    finally:
        torch.set_num_threads(1)
    assert run["evals"][-1]["samples"] == 200_000
    assert run["evals"][-1]["test_elbo"] > -175


@pytest.mark.parametrize("latent_dim", [2, 20])
def test_training_loss_is_the_libraries_compute_loss_objective(
    synthetic_data: rf.Data, latent_dim: int
) -> None:
    torch.manual_seed(0)
    vae = rf.build_vae(latent_dim, 32, init_std=0.3)
    x = rf.pixels(synthetic_data.train[:50])
    ours = rf.aevb_loss(vae, x, torch.Generator().manual_seed(5))
    torch.manual_seed(5)  # the same noise: one eps per datapoint, drawn in the same order
    library = vae.compute_loss(x, vae(x, S=rf.MC_SAMPLES), likelihood="bernoulli").objective
    assert float(ours.detach()) == pytest.approx(float(library.detach()), rel=1e-6)
    ours.backward()
    ours_grads = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad()
    library.backward()
    for mine, theirs in zip(ours_grads, (p.grad for p in vae.parameters()), strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-7)


def lockstep_config() -> rf.Config:
    """Both methods, two latent sizes, two seeds: eight runs of a second or two together."""
    return tiny_config(
        methods=rf.METHODS, latent_dims=(2, 3), seeds=2, samples=2000, evals_per_decade=4
    )  # evaluated at 1,000, 1,800 and 2,000 samples


def records(runs: list[rf.Run]) -> list[tuple[rf.RunKey, str, list[dict]]]:
    """Each run's key, status and evaluations without wall-clock times."""
    return [(r.key, r.status, [without_wall(e) for e in r.record["evals"]]) for r in runs]


def start_all(
    cfg: rf.Config, data: rf.Data, folder: rf.ResultsFolder | None = None
) -> list[rf.Run]:
    """Every run of `cfg`, from its checkpoint in `folder` where there is one."""
    return [
        rf.start_run(key, cfg, data, folder.resume_state(key) if folder else None)
        for key in rf.runs_of(cfg)
    ]


def test_runs_in_lockstep_give_the_numbers_of_each_run_alone(synthetic_data: rf.Data) -> None:
    cfg = lockstep_config()
    together = start_all(cfg, synthetic_data)
    assert rf.train(together, cfg, synthetic_data, lambda run: None)
    alone = start_all(cfg, synthetic_data)
    for run in alone:
        assert rf.train([run], cfg, synthetic_data, lambda run: None)
    assert records(together) == records(alone)
    assert all(r.status == "done" and len(r.record["evals"]) == 3 for r in together)
    assert len({str(r.record["evals"]) for r in together}) == 8  # eight different runs


def test_a_stop_in_lockstep_then_resume_gives_the_uninterrupted_numbers(
    synthetic_data: rf.Data, tmp_path: Path
) -> None:
    cfg = lockstep_config()
    reference = start_all(cfg, synthetic_data)
    rf.train(reference, cfg, synthetic_data, lambda run: None)
    folder = rf.ResultsFolder(str(tmp_path), {"test": True})
    kept: list[rf.RunKey] = []

    def stop_midway(key: rf.RunKey, run: dict) -> None:
        kept.append(key)
        if len(kept) == 11:  # while the runs are kept at the second point: none reaches the third
            rf.request_stop(signal.SIGINT, None)

    first = start_all(cfg, synthetic_data)
    try:
        stopped = rf.train(first, cfg, synthetic_data, replace(folder, show=stop_midway).keep)
    finally:
        rf.STOP_REQUEST.clear()
    assert not stopped and {r.status for r in first} == {"interrupted"}
    resumed = start_all(cfg, synthetic_data, folder)
    assert {r.samples for r in resumed} == {1800}  # each from its checkpoint
    rf.train(resumed, cfg, synthetic_data, folder.keep)
    assert records(resumed) == records(reference)
    assert not list(tmp_path.glob("checkpoints/*.pt"))  # finished runs drop their checkpoints
    assert len(list(tmp_path.glob("models/*.pt"))) == 8


def test_graph_replays_stop_at_the_target_and_never_cross_an_epoch(
    synthetic_data: rf.Data,
) -> None:
    # the host's bookkeeping of the CUDA engine, which needs no GPU: 400 images are 8
    # minibatches of 50 per epoch, graphs of 3 steps
    cfg, engine = tiny_config(), rf.CudaGraphs(steps=3)
    (run,) = start_all(cfg, synthetic_data)
    chunks: dict[int, list[int]] = {}
    for target in (350, 1000, 2050):  # evaluation points off the epochs' ends
        while run.samples < target:
            left = run.batches.begin_epoch_if_used_up()
            n = engine.next_replay(run, target)  # a replay would follow here on a GPU
            assert n <= left and run.samples <= target
            chunks.setdefault(target, []).append(n)
        assert run.samples == target
    # the long graph wherever it fits, single steps to an epoch's end or to the target
    assert chunks == {
        350: [3, 3, 1],
        1000: [1, 3, 3, 1, 1, 3, 1],
        2050: [3, 1, 3, 3, 1, 1, 3, 3, 1, 1, 1],
    }


class StandInStream:
    """torch.cuda.Stream on the CPU: nothing to order; counts the times a stream of a run was
    ordered after the host's stream."""

    host: StandInStream
    waits_for_host = 0

    def wait_stream(self, other: StandInStream) -> None:
        StandInStream.waits_for_host += other is StandInStream.host and self is not other


class StandInGraph:
    """torch.cuda.CUDAGraph on the CPU: a replay runs the captured run's steps, the host's
    minibatch count and Adagrad's step counters left alone as a real replay leaves them (the
    engine counts both on the host)."""

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
    """The CUDA engine over stand-in graphs, each told which run and how many steps it holds."""

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

    StandInStream.host, StandInStream.waits_for_host = StandInStream(), 0
    monkeypatch.setattr(torch.cuda, "Stream", StandInStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: StandInStream.host)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: StandInGraph.capturing)


def test_the_cuda_engine_gives_the_eager_numbers_over_stand_in_graphs(
    synthetic_data: rf.Data, stand_in_cuda: None
) -> None:
    # the engine's own logic on the CPU: capture undone, replays counted on the host, epochs
    # started between replays, the runs' streams ordered after the host's work
    cfg = tiny_config(methods=rf.METHODS, samples=2500)  # crosses epochs
    graphed, eager = start_all(cfg, synthetic_data), start_all(cfg, synthetic_data)
    engine = StandInEngine(steps=7)
    assert rf.train(graphed, cfg, synthetic_data, lambda run: None, engine.advance)
    assert rf.train(eager, cfg, synthetic_data, lambda run: None)
    assert all(engine.graphs[id(run)] is not None for run in graphed)
    assert records(graphed) == records(eager)
    # a run's replays come after what the host queued before them (a restored state, an
    # evaluation): its stream waits for the host's at its capture and at each evaluation point
    points = len(rf.schedule_of(cfg))
    assert StandInStream.waits_for_host == len(graphed) * (1 + points)


def test_a_capture_that_fails_partway_is_one_line_that_names_the_way_out(
    synthetic_data: rf.Data, stand_in_cuda: None, monkeypatch: pytest.MonkeyPatch
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
        StandInEngine().capture_all(runs)
    message = str(failed.value)
    assert message.startswith("[aevb N_z=3] its training step could not be captured")
    assert "(RuntimeError: operation not permitted" in message and "--graph-steps 0" in message
    assert "\n" not in message


def test_replays_advance_adagrads_step_counters(
    synthetic_data: rf.Data, stand_in_cuda: None
) -> None:
    cfg = tiny_config(methods=rf.METHODS, samples=2500)
    graphed, eager = start_all(cfg, synthetic_data), start_all(cfg, synthetic_data)
    assert rf.train(graphed, cfg, synthetic_data, lambda r: None, StandInEngine(steps=7).advance)
    assert rf.train(eager, cfg, synthetic_data, lambda run: None)
    for g, e in zip(graphed, eager, strict=True):
        steps = [
            [float(s["step"]) for s in rf.run_state(r)["optimizers"][0]["state"].values()]
            for r in (g, e)
        ]
        assert steps[0] == steps[1] == [2500 / cfg.batch_size] * len(steps[0])
