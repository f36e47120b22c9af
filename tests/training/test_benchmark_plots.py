"""The synthetic benchmark's matplotlib pictures, drawn from small inputs made here."""

import sys

import numpy as np
import pytest
from PIL import Image

from training import synthetic_benchmark as sb

pytest.importorskip("matplotlib")
from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402

RESULTS = {
    "clip": {
        "seen": {"attribute_swap": 0.7, "relation_swap": 0.55},
        "unseen": {"attribute_swap": 0.6, "relation_swap": 0.5},
        "diagnostics": {"probe": 0.3},
    },
    "occlip": {
        "seen": {"attribute_swap": 1.0, "relation_swap": 0.95},
        "unseen": {"attribute_swap": 0.98, "relation_swap": 0.9, "attribute_swap_std": 0.01},
    },
    "cloc": {"seen": {"region_classification": 0.8, "grounding_acc50": 0.85}, "unseen": {"grounding_acc50": 0.8}},
}


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_results_chart_bars_are_the_results_with_target_lines(tmp_path):
    figure = sb.draw_chart(RESULTS, tmp_path / "results.png")
    width, height = _png_size(tmp_path / "results.png")
    assert width > 1000 and 300 < height < 1000
    panels = {ax.get_title().split(" (")[0]: ax for ax in figure.axes}
    assert list(panels) == ["attribute swap", "relation swap", "region classification", "grounding acc50"]
    attribute = panels["attribute swap"]
    assert [label.get_text() for label in attribute.get_xticklabels()] == ["clip", "occlip"]
    bars = [c for c in attribute.containers if isinstance(c, BarContainer)]
    heights = {c.get_label(): [bar.get_height() for bar in c] for c in bars}
    assert heights == {"seen": pytest.approx([0.7, 1.0]), "unseen": pytest.approx([0.6, 0.98])}
    # The mean ± std of `--full` runs is an error bar on its own bar.
    assert any(isinstance(c, ErrorbarContainer) for c in attribute.containers)
    # The target is a dashed horizontal line at the value.
    assert [line.get_ydata()[0] for line in attribute.get_lines() if line.get_linestyle() == "--"] == [0.90]
    grounding = panels["grounding acc50"]
    assert [line.get_ydata()[0] for line in grounding.get_lines() if line.get_linestyle() == "--"] == [0.75]
    # A split a model lacks is an empty slot, not a "nan" label; value labels carry two decimals.
    region = panels["region classification"]
    texts = [t.get_text() for t in region.texts]
    assert "0.80" in texts and "nan" not in texts


def test_learning_curves_one_panel_per_family_with_the_recorded_points(tmp_path):
    curves = {
        "base_clip": {"attribute_swap": [[10, 0.5], [20, 0.6]], "relation_swap": [[10, 0.5], [20, 0.52]]},
        "occlip": {"attribute_swap": [[25, 0.8], [30, 1.0]], "relation_swap": [[25, 0.7], [30, 0.9]]},
        "cloc": {"region_classification": [[25, 0.4], [30, 0.7]], "grounding_acc50": [[25, 0.5], [30, 0.8]]},
    }
    figure = sb.draw_curves(curves, tmp_path / "learning_curves.png")
    assert _png_size(tmp_path / "learning_curves.png")[0] > 800
    binding, localisation = figure.axes
    assert binding.get_title().startswith("binding") and localisation.get_title().startswith("localisation")
    drawn = {line.get_label(): np.column_stack(line.get_data()).tolist() for line in binding.get_lines()}
    assert drawn["occlip: attribute swap"] == [[25, 0.8], [30, 1.0]]
    assert drawn["base_clip: relation swap"] == [[10, 0.5], [20, 0.52]]
    drawn = {line.get_label(): np.column_stack(line.get_data()).tolist() for line in localisation.get_lines()}
    assert drawn["cloc: grounding acc50"] == [[25, 0.5], [30, 0.8]]
    legend = [t.get_text() for t in binding.get_legend().get_texts()]
    assert legend == ["base_clip", "occlip", "attribute swap", "relation swap"]
    # Fine-tuning is marked where the base's steps end.
    assert 20 in [line.get_xdata()[0] for line in binding.get_lines() if line.get_linestyle() == ":"]
    assert sb.draw_curves({}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_binding_maps_title_each_node_and_label_boxes(tmp_path):
    images = [Image.new("RGB", (64, 64), "grey"), Image.new("RGB", (64, 64), "white")]
    heat = np.zeros((16, 16))
    heat[2:5, 3:6] = 1.0
    node_maps = [[("red circle", heat), ("orange triangle", heat.T)], [("green diamond", heat)]]
    boxes = [[("red circle", [4.0, 19.0, 19.0, 34.0], [5.0, 18.0, 20.0, 36.0])], []]
    figure = sb.plot_binding_maps(images, node_maps, boxes, tmp_path / "binding_maps.png")
    width, height = _png_size(tmp_path / "binding_maps.png")
    assert width > 400 and height > 300
    titles = [ax.get_title() for ax in figure.axes]
    assert {"OC-CLIP: red circle", "OC-CLIP: orange triangle", "OC-CLIP: green diamond"} <= set(titles)
    (cloc,) = [ax for ax in figure.axes if ax.get_title().startswith("CLOC")]
    assert "ground truth" in cloc.get_title() and "predicted" in cloc.get_title()
    drawn = sorted([*p.get_xy(), p.get_width(), p.get_height()] for p in cloc.patches)
    assert drawn == [[4.0, 19.0, 15.0, 15.0], [5.0, 18.0, 15.0, 18.0]]
    assert [t.get_text() for t in cloc.texts] == ["red circle"]


def test_pictures_are_skipped_with_one_line_without_matplotlib(tmp_path, monkeypatch, capsys):
    # None in sys.modules makes `import matplotlib...` raise ImportError, as in an environment without it.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not sb.plots_available()
    assert sb.draw_pictures(RESULTS, {}, tmp_path, tmp_path / "data") == []
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "matplotlib is not installed" in out and ".[plots]" in out
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(ImportError, match=r"\[plots\]"):
        sb.draw_chart(RESULTS, tmp_path / "results.png")


def test_each_model_keeps_its_slot_when_a_split_is_missing(tmp_path):
    """A panel with one model and one split used to autoscale that single bar across the whole panel, with the
    model's tick at the edge; each model now has a slot of width 1 centred on its tick."""
    figure = sb.draw_chart({"clip_crop": {"seen": {"region_classification": 0.7}}}, tmp_path / "one.png")
    (panel,) = figure.axes
    assert panel.get_xlim() == pytest.approx((-0.5, 0.5))
    (bars,) = [c for c in panel.containers if isinstance(c, BarContainer)]
    (bar,) = bars
    assert bar.get_width() == pytest.approx(0.8) and bar.get_x() == pytest.approx(-0.4) and bar.get_height() == 0.7
    figure = sb.draw_chart(RESULTS, tmp_path / "results.png")
    panels = {ax.get_title().split(" (")[0]: ax for ax in figure.axes}
    assert panels["region classification"].get_xlim() == pytest.approx((-0.5, 0.5))
    assert panels["attribute swap"].get_xlim() == pytest.approx((-0.5, 1.5))


def test_curve_legends_sit_below_the_panels_and_zero_stays_visible(tmp_path):
    """The legend used to sit inside at the lower right, over the low early points; a curve at 0 lay on the axis."""
    curves = {
        "base_clip": {"attribute_swap": [[1, 0.3], [2, 0.6]]},
        "cloc": {"region_classification": [[3, 0.2], [4, 0.2]], "grounding_acc50": [[3, 0.0], [4, 0.0]]},
    }
    figure = sb.draw_curves(curves, tmp_path / "learning_curves.png")
    renderer = figure.canvas.get_renderer()
    for ax in figure.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        panel = ax.get_window_extent(renderer)
        assert legend.y1 < panel.y0, ax.get_title()  # entirely below the plotting area
        assert ax.get_ylim()[0] < 0 < 1 < ax.get_ylim()[1]
    _, localisation = figure.axes
    drawn = {line.get_label(): np.column_stack(line.get_data()).tolist() for line in localisation.get_lines()}
    assert drawn["cloc: grounding acc50"] == [[3, 0.0], [4, 0.0]]
