"""What a user looks at: the figure in the paper's frame, the table, the samples picture."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from matplotlib.figure import Figure

import reproduce_fig2 as rf


def fake_results(methods: tuple[str, ...], dims: tuple[int, ...], low: float = -140.0) -> dict:
    """Results of finished runs: three evaluations each, test one nat below train."""
    runs = []
    for m in methods:
        for d in dims:
            evals = [
                {"samples": s, "train_elbo": low + i, "test_elbo": low + i - 1}
                for i, s in enumerate((100_000, 1_000_000, 10_000_000))
            ]
            runs.append({"method": m, "latent_dim": d, "status": "done", "evals": evals})
    return {"config": {}, "environment": {}, "runs": runs}


def three_seeds() -> dict:
    """Results of AEVB N_z = 3 with three seeds: the first, one 2 nats above, one 4 below."""
    results = fake_results(("aevb",), (3,))
    for shift in (2.0, -4.0):
        seed = copy.deepcopy(results["runs"][0])
        for e in seed["evals"]:
            e["train_elbo"] += shift
            e["test_elbo"] += shift
        results["runs"].append(seed)
    return results


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


def test_figure_keeps_the_papers_frame_and_clips_what_leaves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = fake_results(("aevb", "wake-sleep"), (3, 20))
    for run in results["runs"][1::2]:  # N_z = 20: far below the frame
        for e in run["evals"]:
            e["train_elbo"] -= 110.0
            e["test_elbo"] -= 110.0
    # and one point beyond its top and its right edge
    results["runs"][0]["evals"].append({"samples": 3e8, "train_elbo": -90.0, "test_elbo": -91.0})
    (tmp_path / rf.RESULTS_NAME).write_text(json.dumps(results))
    drawn: list[Figure] = []
    plot_results = rf.plot_results

    def plot_and_keep(results: dict, path: str) -> Figure:
        drawn.append(plot_results(results, path))
        return drawn[-1]

    monkeypatch.setattr(rf, "plot_results", plot_and_keep)
    # a folder that holds only the combined results (as docs/ does): the figure redrawn from it
    assert rf.main(["--plot-only", "--out-dir", str(tmp_path)]) == 0
    (fig,) = drawn
    for ax in fig.axes:
        assert ax.get_ylim() == rf.PAPER_YLIM and ax.get_xlim() == rf.PAPER_XLIM
        assert [line.get_label() for line in ax.get_lines()] == LINES
        for line in ax.get_lines():  # drawn up to the frame's edge and no further
            assert line.get_clip_on() and line.get_clip_box().bounds == ax.bbox.bounds
    # the lines hold every value, clipped only where drawn, and the JSON keeps them
    ys = [y for ax in fig.axes for line in ax.get_lines() for y in line.get_ydata()]
    assert min(ys) == -251.0 and max(ys) == -90.0
    assert json.loads((tmp_path / rf.RESULTS_NAME).read_text()) == results
    assert (tmp_path / rf.FIGURE_NAME).exists()


def test_several_seeds_draw_the_median_and_a_band(tmp_path: Path) -> None:
    fig = rf.plot_results(three_seeds(), str(tmp_path / "f.png"))
    (ax,) = fig.axes
    train = ax.get_lines()[0]
    assert list(train.get_ydata()) == [-140.0, -139.0, -138.0]  # the median of the three
    (band, _) = ax.collections  # train and test bands
    edges: dict[float, set[float]] = {}  # at each point, the band's lower and upper edge
    for x, y in band.get_paths()[0].vertices:
        edges.setdefault(round(float(x)), set()).add(round(float(y), 6))
    assert [edges[round(float(x))] for x in train.get_xdata()] == [
        {-144.0, -138.0},  # the lowest seed (4 below) and the highest (2 above) at each point
        {-143.0, -137.0},
        {-142.0, -136.0},
    ]


def test_the_table_gives_each_setting_once_with_the_median_and_range_of_its_seeds() -> None:
    results = three_seeds()
    results["runs"] += fake_results(("wake-sleep",), (3,))["runs"]
    results["runs"][-1]["log_px"] = {"test": -138.5, "k": 100}
    table = rf.results_table(results).splitlines()
    assert table[2:] == [
        "| AEVB | 3 | 3 | 10,000,000 | -138.00 (-142.00 to -136.00) "
        "| -139.00 (-143.00 to -137.00) | - | - | done |",
        "| WS | 3 | 1 | 10,000,000 | -138.00 | -139.00 | -138.50 | 0.50 | done |",
    ]
    results["runs"][0]["log_px"] = {"test": -137.0, "k": 5}  # estimates of other K: said so
    table = rf.results_table(results).splitlines()
    assert "| -137.00 (K = 5) |" in table[2] and "| -138.50 (K = 100) |" in table[3]


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
