"""Model, ELBO evaluator, optimiser, AEVB and wake-sleep steps, schedule and step-size choice."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import reproduce_fig2 as rf
from conftest import REAL_MNIST


def tiny_config(**kw: object) -> rf.Config:
    base = dict(latent_dims=(3,), methods=("aevb",), samples=3000, eval_start=1000, evals_per_decade=2,
                hidden_size=32, batch_size=50, threads=1, compile="off", verify_data=False)
    return rf.Config(**(base | kw))  # type: ignore[arg-type]


def params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_model_shapes_and_init() -> None:
    torch.manual_seed(0)
    vae = rf.build_vae(latent_dim=5, hidden_size=500)
    out = vae(torch.rand(7, 1, 28, 28))
    assert out.x_hat.shape == (7, 1, 1, 28, 28) and out.z.shape == (7, 1, 5)
    assert out.mu.shape == (7, 5) and out.log_var.shape == (7, 5)
    shapes = sorted(tuple(p.shape) for p in vae.parameters())
    assert shapes == sorted([(500, 784), (500,), (5, 500), (5,), (5, 500), (5,), (500, 5), (500,), (784, 500), (784,)])
    every = torch.cat([p.detach().flatten() for p in vae.parameters()])
    assert abs(float(every.std()) - rf.INIT_STD) < 5e-4 and abs(float(every.mean())) < 5e-4  # biases too


def test_evaluator_matches_hand_computation(synthetic_data: rf.Data) -> None:
    torch.manual_seed(3)
    vae = rf.build_vae(latent_dim=2, hidden_size=8, init_std=0.3)
    x = synthetic_data.test_eval
    rng_before = torch.get_rng_state()
    got = rf.evaluate_elbo(vae, x, seed=11)
    assert torch.equal(torch.get_rng_state(), rng_before)  # scoring leaves the training stream alone

    d = {k: v.double() for k, v in vae.state_dict().items()}
    xf = x.flatten(1).double()
    h = torch.tanh(xf @ d["encoder.1.weight"].T + d["encoder.1.bias"])
    mu = h @ d["sampling_layer.mu.weight"].T + d["sampling_layer.mu.bias"]
    lv = h @ d["sampling_layer.log_var.weight"].T + d["sampling_layer.log_var.bias"]
    torch.manual_seed(11)
    eps = torch.randn(len(x), 1, 2).squeeze(1).double()
    z = mu + torch.exp(0.5 * lv) * eps
    logits = torch.tanh(z @ d["decoder.0.weight"].T + d["decoder.0.bias"]) @ d["decoder.2.weight"].T + d["decoder.2.bias"]
    y = torch.sigmoid(logits)
    ll = (xf * torch.log(y) + (1 - xf) * torch.log(1 - y)).sum(1).mean()
    kl = (0.5 * (lv.exp() + mu**2 - 1 - lv)).sum(1).mean()
    assert got["log_likelihood"] == pytest.approx(float(ll), rel=1e-5)
    assert got["kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-5)
    assert got["elbo"] == pytest.approx(float(ll - kl), rel=1e-5)
    assert all(isinstance(v, float) for v in got.values())


def test_weight_decay_shrinks_a_parameter_without_data_gradient(synthetic_data: rf.Data) -> None:
    torch.manual_seed(0)
    vae = rf.build_vae(latent_dim=3, hidden_size=16)
    x = synthetic_data.train[:50]
    assert float(x[:, 0, 0, 0].abs().max()) == 0.0  # pixel 0 is black: its encoder weights get no data gradient
    opts = rf.make_optimizers(vae, "aevb", lr=0.02, fused=True)
    w = vae.encoder[1].weight
    before = w[:, 0].detach().clone()
    rf.aevb_step(vae, opts, x)
    g = rf.WEIGHT_DECAY * before  # the gradient of ||theta||^2 / (2N)
    expected = before - 0.02 * g / (g.abs() + 1e-10)  # Adagrad's first step: state_sum = g^2
    assert torch.allclose(w[:, 0].detach(), expected, rtol=1e-5, atol=1e-9)
    assert float((w[:, 0].detach() - before).abs().min()) > 0.019  # it moved by about one step size


def test_eval_schedule() -> None:
    s = rf.eval_schedule(10_000_000, 100, 100_000, 10)
    assert s[0] == 100_000 and s[-1] == 10_000_000 and len(s) == 21
    assert all(p % 100 == 0 for p in s) and s == sorted(set(s))
    ratios = [b / a for a, b in zip(s, s[1:])]
    assert all(abs(r - 10 ** 0.1) < 0.01 for r in ratios)
    assert rf.eval_schedule(1_000_000, 100, 100_000, 1) == [100_000, 1_000_000]
    assert rf.eval_schedule(3000, 100, 100_000, 10) == [3000]  # a target below the start: one point, the target
    assert rf.eval_schedule(250_050, 100, 100_000, 10)[-1] == 250_000  # whole minibatches
    assert rf.eval_schedule(1000, 50, 100, 2) == [100, 300, 1000]


def test_training_raises_the_elbo(synthetic_data: rf.Data) -> None:
    for method in rf.METHODS:
        cfg = tiny_config(methods=(method,))
        rf.seed_everything(rf.setting_seed(cfg.seed, method, 3))
        start = rf.evaluate_elbo(rf.build_vae(3, cfg.hidden_size), synthetic_data.train_eval)["elbo"]
        run = rf.train_run(method, 3, cfg, synthetic_data, torch.device("cpu"), lambda r: None, progress=False)
        assert run["status"] == "done" and [e["samples"] for e in run["evals"]] == [1000, 3000]
        assert run["evals"][-1]["train_elbo"] > start + 100, method
        assert run["evals"][-1]["train_elbo"] > run["evals"][0]["train_elbo"], method


def test_wake_step_moves_only_the_decoder(synthetic_data: rf.Data) -> None:
    torch.manual_seed(0)
    vae = rf.build_vae(3, 16)
    dec_opt, enc_opt = rf.make_optimizers(vae, "wake-sleep", 0.02, fused=True)
    enc_before, dec_before = [p.detach().clone() for p in rf.encoder_parameters(vae)], params_of(vae.decoder)
    rf.wake_step(vae, dec_opt, synthetic_data.train[:50])
    assert all(torch.equal(a, p) for a, p in zip(enc_before, rf.encoder_parameters(vae)))
    assert all(not torch.equal(a, p) for a, p in zip(dec_before, vae.decoder.parameters()))


def test_sleep_step_moves_only_the_encoder_and_its_loss_is_log_q() -> None:
    torch.manual_seed(0)
    vae = rf.build_vae(3, 16, init_std=0.2)
    twin = copy.deepcopy(vae)
    dec_opt, enc_opt = rf.make_optimizers(vae, "wake-sleep", 0.02, fused=True)
    enc_before, dec_before = [p.detach().clone() for p in rf.encoder_parameters(vae)], params_of(vae.decoder)
    torch.manual_seed(42)
    loss = rf.sleep_step(vae, enc_opt, 20)
    assert all(torch.equal(a, p) for a, p in zip(dec_before, vae.decoder.parameters()))
    assert all(not torch.equal(a, p) for a, p in zip(enc_before, rf.encoder_parameters(vae)))

    torch.manual_seed(42)
    with torch.no_grad():
        z = torch.randn(20, 3)
        x = torch.bernoulli(torch.sigmoid(twin.decoder(z)))
        mu, log_var = twin.sampling_layer.get_params(twin.encoder(x))
        expected = -torch.distributions.Normal(mu, torch.exp(0.5 * log_var)).log_prob(z).sum(-1).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_wake_loss_is_bernoulli_log_likelihood(synthetic_data: rf.Data) -> None:
    torch.manual_seed(0)
    vae = rf.build_vae(3, 16, init_std=0.2)
    twin = copy.deepcopy(vae)
    dec_opt, _ = rf.make_optimizers(vae, "wake-sleep", 0.02, fused=True)
    x = synthetic_data.train[:30]
    torch.manual_seed(7)
    loss = rf.wake_step(vae, dec_opt, x)
    torch.manual_seed(7)
    with torch.no_grad():
        mu, log_var = twin.sampling_layer.get_params(twin.encoder(x))
        z = mu + torch.exp(0.5 * log_var) * torch.randn(30, 1, 3).squeeze(1)
        logits = twin.decoder(z)
        expected = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_auto_step_size_picks_the_best_pilot(synthetic_data: rf.Data, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(rf, "LR_CANDIDATES", (1e-6, 0.05, 1e30))
    cfg = tiny_config(lr="auto", lr_pilot_samples=500, samples=500, eval_start=500)
    run = rf.train_run("aevb", 3, cfg, synthetic_data, torch.device("cpu"), lambda r: None, progress=False)
    scores = run["lr_pilot_scores"]
    assert set(scores) == {"1e-06", "0.05", "1e+30"}
    assert run["lr"] == 0.05 and scores["0.05"] > scores["1e-06"]
    assert scores["1e+30"] is None  # the pilot that blows up is recorded as diverged and scored worst
    # the pick is the candidate a plain run with that step size would also score best
    plain = rf.train_run("aevb", 3, tiny_config(lr=0.05, samples=500, eval_start=500), synthetic_data, torch.device("cpu"), lambda r: None, progress=False)
    assert plain["evals"][-1]["train_elbo"] == pytest.approx(scores["0.05"], abs=1e-9)
    assert "chose lr 0.05" in capsys.readouterr().out


def test_non_finite_loss_marks_the_run_diverged(synthetic_data: rf.Data, monkeypatch: pytest.MonkeyPatch) -> None:
    original = rf.aevb_step

    def poisoned(vae, opts, x):  # type: ignore[no-untyped-def]
        loss = original(vae, opts, x)
        with torch.no_grad():
            vae.decoder[2].bias.fill_(math.nan)
        return loss

    monkeypatch.setitem(rf.STEPS, "aevb", poisoned)
    run = rf.train_run("aevb", 3, tiny_config(), synthetic_data, torch.device("cpu"), lambda r: None, progress=False)
    assert run["status"] == "diverged" and run["diverged_at"] == 1000 and run["evals"] == []


def three_steps(x: torch.Tensor, compile_step: bool) -> list[float]:
    """Losses of three AEVB steps on x from a fixed initialisation, then every parameter's sum."""
    torch.manual_seed(0)
    vae = rf.build_vae(3, 16)
    step, _ = rf.make_step("aevb", vae, 0.02, torch.device("cpu"), compile_step=compile_step)
    return [float(step(x)) for _ in range(3)] + [float(p.detach().sum()) for p in vae.parameters()]


def test_forced_compile_failure_falls_back_to_eager(synthetic_data: rf.Data, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken_compile(fn):  # type: ignore[no-untyped-def]
        def run(x):  # type: ignore[no-untyped-def]
            fn(x)  # half a step happens before the failure: it must be undone
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    x = synthetic_data.train[:50]
    # the fallback's Adagrad is the foreach kernel where eager uses the fused one: same maths, float rounding apart
    assert three_steps(x, compile_step=True) == pytest.approx(three_steps(x, compile_step=False), rel=1e-5, abs=1e-6)
    assert "notice: torch.compile failed (RuntimeError: no C++ compiler); training eagerly instead" in capsys.readouterr().out


@pytest.mark.skipif(not (REAL_MNIST / "MNIST" / "raw").is_dir(), reason=f"real MNIST not found at {REAL_MNIST}")
def test_real_mnist_nz3_200k_samples() -> None:
    torch.set_num_threads(2)
    try:
        data = rf.load_data(str(REAL_MNIST), torch.device("cpu"), binarize=False, seed=rf.SEED, verify=True, download=False)
        cfg = rf.Config(latent_dims=(3,), methods=("aevb",), samples=200_000, compile="off")
        run = rf.train_run("aevb", 3, cfg, data, torch.device("cpu"), lambda r: None, progress=False)
    finally:
        torch.set_num_threads(1)
    assert run["evals"][-1]["samples"] == 200_000
    assert run["evals"][-1]["test_elbo"] > -175


def test_compiled_step_matches_eager(synthetic_data: rf.Data, capsys: pytest.CaptureFixture[str]) -> None:
    x = synthetic_data.train[:50]
    compiled, eager = three_steps(x, compile_step=True), three_steps(x, compile_step=False)
    assert "torch.compile failed" not in capsys.readouterr().out  # it really compiled
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)  # same maths, same noise; float rounding apart
