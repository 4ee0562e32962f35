"""Outputs: the figure drawn as the paper draws it."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

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


def test_figure_has_one_panel_per_latent_size_with_the_papers_lines(tmp_path: Path) -> None:
    fig = rf.plot_results(fake_results(("aevb", "wake-sleep"), (3, 5, 10)), str(tmp_path / "f.png"))
    assert len(fig.axes) == 3
    for ax, nz in zip(fig.axes, (3, 5, 10), strict=True):
        assert ax.get_title() == f"MNIST, $N_z = {nz}$" and ax.get_xscale() == "log"
        styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
        assert styles == {
            "AEVB (train)": "-",
            "AEVB (test)": "--",
            "WS (train)": "-",
            "WS (test)": "--",
        }
        colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
        assert (
            colours["AEVB (train)"]
            == colours["AEVB (test)"]
            != colours["WS (train)"]
            == colours["WS (test)"]
        )
        assert ax.get_ylim() == (-150.0, -95.0)  # every point inside: the paper's range
        assert ax.get_xlim()[0] <= 1e5 and ax.get_xlim()[1] >= 1e8
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [
            "AEVB (train)",
            "AEVB (test)",
            "WS (train)",
            "WS (test)",
        ]
    assert fig.axes[0].get_xlabel() == "# Training samples evaluated"
    plt.close(fig)
    assert (tmp_path / "f.png").exists()


def test_figure_widens_the_range_only_to_fit_and_draws_aevb_alone(tmp_path: Path) -> None:
    fig = rf.plot_results(fake_results(("aevb",), (20,), low=-180.0), str(tmp_path / "f.png"))
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["AEVB (train)", "AEVB (test)"]
    lo, hi = ax.get_ylim()
    assert lo < -181 and hi == -95.0
    plt.close(fig)
