"""Model and ELBO evaluator: the paper's networks and the bound they are scored by."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

import reproduce_fig2 as rf


def test_vae_has_the_papers_shapes_and_init_std() -> None:
    torch.manual_seed(0)
    vae = rf.build_vae(latent_dim=5, hidden_size=500)
    out = vae(torch.rand(7, 1, 28, 28))
    assert out.x_hat.shape == (7, 1, 1, 28, 28) and out.z.shape == (7, 1, 5)
    assert out.mu.shape == (7, 5) and out.log_var.shape == (7, 5)
    shapes = sorted(tuple(p.shape) for p in vae.parameters())
    assert shapes == sorted(
        [(500, 784), (500,), (5, 500), (5,), (5, 500), (5,), (500, 5), (500,), (784, 500), (784,)]
    )
    every = torch.cat([p.detach().flatten() for p in vae.parameters()])
    # weights and biases alike
    assert abs(float(every.std()) - rf.INIT_STD) < 5e-4 and abs(float(every.mean())) < 5e-4


def test_evaluator_equals_the_hand_computation_and_keeps_the_rng(synthetic_data: rf.Data) -> None:
    torch.manual_seed(3)
    vae = rf.build_vae(latent_dim=2, hidden_size=8, init_std=0.3)
    x = synthetic_data.test_eval
    rng_before = torch.get_rng_state()
    got = rf.evaluate_elbo(vae, x, seed=11)
    assert torch.equal(torch.get_rng_state(), rng_before)  # training's random stream untouched

    d = {k: v.double() for k, v in vae.state_dict().items()}
    xf = rf.pixels(x).flatten(1).double()
    h = torch.tanh(xf @ d["encoder.1.weight"].T + d["encoder.1.bias"])
    mu = h @ d["sampling_layer.mu.weight"].T + d["sampling_layer.mu.bias"]
    lv = h @ d["sampling_layer.log_var.weight"].T + d["sampling_layer.log_var.bias"]
    torch.manual_seed(11)
    eps = torch.randn(len(x), 1, 2).squeeze(1).double()
    z = mu + torch.exp(0.5 * lv) * eps
    logits = (
        torch.tanh(z @ d["decoder.0.weight"].T + d["decoder.0.bias"]) @ d["decoder.2.weight"].T
        + d["decoder.2.bias"]
    )
    y = torch.sigmoid(logits)
    ll = (xf * torch.log(y) + (1 - xf) * torch.log(1 - y)).sum(1).mean()
    kl = (0.5 * (lv.exp() + mu**2 - 1 - lv)).sum(1).mean()
    assert got["log_likelihood"] == pytest.approx(float(ll), rel=1e-5)
    assert got["kl"] == pytest.approx(float(kl), rel=1e-4, abs=1e-5)
    assert got["elbo"] == pytest.approx(float(ll - kl), rel=1e-5)
    assert all(isinstance(v, float) for v in got.values())


def rough_model() -> rf.VAE:
    """A small untrained model whose q(z|x) is far from its posterior: wide IW gaps."""
    torch.manual_seed(3)
    return rf.build_vae(latent_dim=2, hidden_size=16, init_std=0.3)


def test_log_px_with_one_sample_is_the_elbo_in_expectation(synthetic_data: rf.Data) -> None:
    vae, x = rough_model(), synthetic_data.train
    iw = [rf.estimate_log_px(vae, x, k=1, seed=s) for s in range(20)]
    elbo = [rf.evaluate_elbo(vae, x, seed=s)["elbo"] for s in range(20)]
    noise = 3 * (statistics.stdev(iw) + statistics.stdev(elbo)) / math.sqrt(20)
    assert abs(statistics.mean(iw) - statistics.mean(elbo)) < noise + 1e-3


def test_log_px_is_above_the_elbo_and_grows_with_k(synthetic_data: rf.Data) -> None:
    vae, x = rough_model(), synthetic_data.test_eval
    elbo = statistics.mean(rf.evaluate_elbo(vae, x, seed=s)["elbo"] for s in range(5))
    by_k = {
        k: statistics.mean(rf.estimate_log_px(vae, x, k, seed=s) for s in range(5))
        for k in (1, 10, 100)
    }
    assert by_k[10] > elbo and by_k[100] > elbo
    assert by_k[1] <= by_k[10] <= by_k[100]
