"""report.html: the worst-case selection, a self-contained page with every section, extra PNGs of
the report directory included, and (in headless Chromium) every image actually renders."""

import re

import numpy as np
import pytest

from gaikan.data.synthetic import make_defect_dataset
from gaikan.detectors.padim import PaDiM
from gaikan.evaluation import plots
from gaikan.evaluation.report import worst_cases
from gaikan.pipeline import evaluate_detector

SECTIONS = ["summary", "metrics", "curves", "histogram", "confusion", "false-alarms", "escapes", "other-figures"]


def test_worst_cases_are_the_highest_goods_and_the_lowest_defects():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2, 3.0, 0.4, 2.0])
    fa, esc = worst_cases(labels, scores, k=3)
    assert fa.tolist() == [1, 3, 2]  # ties by index
    assert esc.tolist() == [4, 6, 7]
    fa, esc = worst_cases(labels, scores, k=10)
    assert len(fa) == 4 and len(esc) == 4


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    split = make_defect_dataset(30, 8, 8, size=64, seed=2)
    det = PaDiM(image_size=64, n_features=20).fit(split.train.images)
    report_dir = tmp_path_factory.mktemp("report")
    # a plot another component put in the report directory (e.g. a metric-learning loss curve)
    plots.plot_loss_curves({"train": [1.0, 0.6, 0.4]}, report_dir / "loss_curves.png")
    run = evaluate_detector(det, split, report_dir=report_dir)
    return report_dir, run


def test_report_html_is_self_contained_with_every_section(report):
    report_dir, run = report
    text = (report_dir / "report.html").read_text()
    for section in SECTIONS:
        assert f"id='{section}'" in text, section
    srcs = re.findall(r'src="([^"]*)"', text)
    assert len(srcs) == 4 + 3 + 3 + 1  # roc, pr, histogram, confusion; 3 false alarms; 3 escapes; loss curve
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(href|src)=[\"'](?!data:)", text)  # nothing loaded from elsewhere
    assert "loss_curves.png" in text
    assert f"{run.evaluation.image_auroc:.4g}" in text
    # the worst escape is the lowest-scoring defect, named with its score
    esc = np.flatnonzero(run.labels == 1)[np.argmin(run.scores[run.labels == 1])]
    assert f"{run.paths[esc]}: score {run.scores[esc]:.4g}" in text


@pytest.mark.browser
def test_report_renders_in_chromium_with_no_missing_image(report, chrome):
    report_dir, _ = report
    chrome.get((report_dir / "report.html").as_uri())
    state = chrome.execute_script("""
        const imgs = [...document.images];
        return {n: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
                sections: [...document.querySelectorAll('section')].filter(s => s.offsetHeight > 0).map(s => s.id)};
    """)
    assert state["n"] == 11
    assert state["broken"] == []
    assert state["sections"] == SECTIONS
