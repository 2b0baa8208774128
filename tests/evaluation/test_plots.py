"""The plot functions write PNG files that Pillow opens; the inspection figure has its panels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gaikan.evaluation import plots
from gaikan.evaluation.metrics import confusion_at


def _check_png(path, min_size=(200, 200)):
    assert path.exists() and path.stat().st_size > 2000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_size[0] and im.height >= min_size[1]
        return im.size


@pytest.fixture
def labelled():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(60, int), np.ones(25, int), -np.ones(3, int)]
    scores = (rng.normal(size=len(labels)) + 1.5 * (labels == 1)).astype(np.float32)
    return labels, scores


def test_score_plots(tmp_path, labelled):
    labels, scores = labelled
    assert plots.plot_roc(labels, scores, tmp_path / "roc.png") == tmp_path / "roc.png"
    _check_png(tmp_path / "roc.png")
    _check_png(plots.plot_pr(labels, scores, tmp_path / "pr.png"))
    out = plots.plot_score_histogram(labels, scores, tmp_path / "sub" / "hist.png",
                                     {"max-good": 1.7, "quantile": 1.2})
    _check_png(out)
    _check_png(plots.plot_score_histogram(labels, scores, tmp_path / "hist0.png", None))
    keep = labels >= 0
    conf = confusion_at(labels[keep], scores[keep], 1.2)
    _check_png(plots.plot_confusion(conf, tmp_path / "confusion.png"))


def test_inspection_figure_panels_and_png(tmp_path):
    rng = np.random.default_rng(1)
    image = (rng.random((120, 160)) * 255).astype(np.uint8)
    amap = rng.random((28, 28)).astype(np.float32)
    amap[5:10, 5:12] += 2.0  # a different size than the image: resized before drawing
    fig = plots.inspection_figure(image, amap, threshold=1.5, score=float(amap.max()), verdict="NG")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 4 and len(fig.axes) == 5  # 4 panels + the colour bar
    assert panels[1].images[0].get_array().shape == (120, 160)

    path = plots.plot_inspection(image, amap, tmp_path / "a.png", threshold=1.5,
                                 score=float(amap.max()), verdict="NG", title="a.png")
    w, h = _check_png(path)
    assert w > 2.5 * h  # four panels side by side


@pytest.mark.parametrize("shape", [(64, 80), (64, 80, 1), (64, 80, 3), (64, 80, 4)])
def test_inspection_image_kinds(tmp_path, shape):
    rng = np.random.default_rng(2)
    image = rng.random(shape).astype(np.float32) * 4.0 - 1.0  # float outside [0, 1]: stretched
    amap = np.zeros((16, 16), np.float32)  # empty predicted mask: no contour, no warning
    path = plots.plot_inspection(image, amap, tmp_path / "b.png", threshold=0.5, score=0.0,
                                 verdict="OK", map_range=(0.0, 1.0))
    _check_png(path)


def test_inspection_without_map(tmp_path):
    image = np.full((50, 70, 3), 128, np.uint8)
    fig = plots.inspection_figure(image, None, threshold=0.3, score=0.1, verdict="OK")
    assert len(fig.axes) == 1
    w, h = _check_png(plots.plot_inspection(image, None, tmp_path / "c.png", threshold=0.3,
                                            score=0.1, verdict="OK"))
    assert w < 1.5 * h


def test_inspection_to_file_object():
    buf = io.BytesIO()
    image = np.zeros((32, 32), np.uint8)
    out = plots.plot_inspection(image, np.ones((8, 8)), buf, threshold=0.5, score=1.0, verdict="NG")
    assert out is buf
    buf.seek(0)
    with Image.open(buf) as im:
        assert im.format == "PNG"


def test_training_plots(tmp_path):
    _check_png(plots.plot_loss_curves({"train": [3.0, 2.0, 1.5, 1.2], "val": [3.1, 2.5, 2.2, 2.1]},
                                      tmp_path / "loss.png"))
    rng = np.random.default_rng(3)
    points = rng.normal(size=(90, 2))
    labels = np.repeat([0, 1, 2], 30)
    _check_png(plots.plot_embedding_scatter(points, labels, tmp_path / "emb.png",
                                            class_names=["good", "crack", "finger"]))
    _check_png(plots.plot_embedding_scatter(points, labels, tmp_path / "emb2.png"))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plots.plot_embedding_scatter(rng.normal(size=(5, 3)), np.zeros(5), tmp_path / "x.png")


def test_package_exposes_plots_lazily():
    import gaikan.evaluation as ev

    assert ev.plot_roc is plots.plot_roc
    with pytest.raises(AttributeError):
        ev.no_such_plot  # noqa: B018
