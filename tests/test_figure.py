"""Outputs: the figure drawn as the paper draws it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

import reproduce_fig2 as rf


def fake_results(methods: tuple[str, ...], dims: tuple[int, ...], low: float = -140.0) -> dict:
    runs = []
    for m in methods:
        for d in dims:
            evals = [
                {"samples": s, "train_elbo": low + i, "test_elbo": low + i - 1}
                for i, s in enumerate((100_000, 1_000_000, 10_000_000))
            ]
            runs.append({"method": m, "latent_dim": d, "status": "done", "evals": evals})
    return {"config": {}, "environment": {}, "runs": runs}


LINES = ["AEVB (train)", "AEVB (test)", "WS (train)", "WS (test)"]


def test_figure_has_one_panel_per_latent_size_with_the_papers_lines(tmp_path: Path) -> None:
    fig = rf.plot_results(fake_results(("aevb", "wake-sleep"), (3, 5, 10)), str(tmp_path / "f.png"))
    assert len(fig.axes) == 3
    for ax, nz in zip(fig.axes, (3, 5, 10), strict=True):
        assert ax.get_title() == f"MNIST, $N_z = {nz}$" and ax.get_xscale() == "log"
        styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
        assert styles == dict(zip(LINES, ["-", "--", "-", "--"], strict=True))
        colour = {line.get_label(): line.get_color() for line in ax.get_lines()}
        assert colour[LINES[0]] == colour[LINES[1]] != colour[LINES[2]] == colour[LINES[3]]
        assert ax.get_legend() is None  # one legend for the figure
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == LINES
    assert fig.axes[0].get_xlabel() == "# Training samples evaluated"
    assert (tmp_path / "f.png").exists()


def test_figure_keeps_the_papers_frame_and_clips_what_leaves_it(tmp_path: Path) -> None:
    results = fake_results(("aevb", "wake-sleep"), (20,), low=-250.0)  # far below the frame
    results["runs"][0]["evals"].append({"samples": 3e8, "train_elbo": -90.0, "test_elbo": -91.0})
    fig = rf.plot_results(results, str(tmp_path / "f.png"))
    (ax,) = fig.axes
    assert ax.get_ylim() == (-150.0, -95.0) and ax.get_xlim() == (1e5, 1e8)
    assert [line.get_label() for line in ax.get_lines()] == LINES


def test_several_seeds_draw_the_median_and_a_band(tmp_path: Path) -> None:
    results = fake_results(("aevb",), (3,))
    for shift in (2.0, -4.0):  # two more seeds of the same run
        seed = copy.deepcopy(results["runs"][0])
        for e in seed["evals"]:
            e["train_elbo"] += shift
            e["test_elbo"] += shift
        results["runs"].append(seed)
    fig = rf.plot_results(results, str(tmp_path / "f.png"))
    (ax,) = fig.axes
    train = ax.get_lines()[0]
    assert list(train.get_ydata()) == [-140.0, -139.0, -138.0]  # the median of the three
    (band, _) = ax.collections  # train and test bands
    lows = band.get_paths()[0].vertices[:, 1]
    assert lows.min() == pytest.approx(-144.0) and lows.max() == pytest.approx(-136.0)


def test_samples_picture_sets_methods_side_by_side_per_latent_size(
    synthetic_data: rf.Data, tmp_path: Path
) -> None:
    models = {}
    for method in rf.METHODS:
        for nz in (2, 3):
            vae = rf.build_vae(nz, 16, init_std=0.3)
            models[rf.RunKey(method, nz)] = {
                "model": vae.state_dict(),
                "hidden_size": 16,
                "samples": 1,
                "diverged": method == "wake-sleep" and nz == 3,
            }
    fig = rf.plot_samples(models, synthetic_data.test_eval, str(tmp_path / "s.png"), seed=1)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles[0] == "test digits" and len(titles) == 1 + 2 * 2 * 2
    assert titles[1:5] == [
        "AEVB, $N_z = 2$: samples",
        "AEVB, $N_z = 2$: reconstructions",
        "WS, $N_z = 2$: samples",
        "WS, $N_z = 2$: reconstructions",
    ]
    assert "diverged" in titles[-1]  # a diverged model is shown, marked as such
    assert (tmp_path / "s.png").exists()
