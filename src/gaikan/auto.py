"""``--detector auto``: choose a detector and its settings for a part from its good images alone.

A quality engineer has good images and no defects to tune on. The selection makes its own test:

1. the good training images are split (seeded) into a *selection-fit* part and *selection-check*
   goods (``holdout``, at least ``MIN_CHECK`` images);
2. each check good also gets a defective twin: one synthetic defect (scratch, spot or cut-and-paste
   of the part's own surface, ``gaikan.data.synthetic``) at a size drawn from ``DEFECT_SCALES``, so
   small defects weigh as much as large ones; labelled defective training images, when the caller
   gives some (``labels == 1``), join the check set as real defects (image level only);
3. every candidate of the grid is fitted on the selection-fit part and scores the check set. The
   best image ROC AUC wins, but the check set is small: every candidate within one standard error
   of the best (Hanley & McNeil's, for that AUC and the check set's sizes) is tied with it, and a
   tie goes to the earliest of them in the grid's order (the grid is ordered by the surfaces
   benchmark: the detectors that did best there first);
4. the winner is fitted again, as an ordinary detector, on all the training images (the caller's
   ``fit`` then holds out its usual calibration share): the saved model is that detector, and its
   manifest holds the table it was chosen from (``fit_info_["selection"]``).

The selection sees only the images it is given (the training part of a split), never a test split.
Time is bounded: the selection uses at most ``MAX_SELECTION_IMAGES`` goods (a seeded subset), the
candidates run in the grid's order, and one whose estimated cost would take the selection past
``budget`` - ``FINAL_RESERVE`` final fits is skipped, and so marked (a full fit is estimated
as the first candidate's measured selection seconds times the ratio of the good images to the images
a selection run processes: its fit part and its check set; the reserve is for the costliest final
fit among the candidates run so far and this one, ``Candidate.final_cost`` full fits each).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from gaikan.backbones.features import no_tap_cache, tap_cache
from gaikan.data.images import to_float01
from gaikan.data.synthetic import add_random_defect
from gaikan.detectors.base import Detector, check_images, get_detector_class
from gaikan.errors import SettingsError
from gaikan.evaluation.metrics import image_auroc, pixel_auroc
from gaikan.progress import track

MIN_CHECK = 6
DEFECT_SCALES = (0.3, 0.5, 0.8)
#: the selection works on at most this many good images (a seeded subset): enough to rank the
#: candidates, and the selection's cost stays bounded however many images the final fit gets
MAX_SELECTION_IMAGES = 160
#: a full default fit is estimated as the first candidate's selection seconds times r = (good images / images
#: of a selection run), to this power where r > 1: a fit's cost grows faster than its image count
#: (PatchCore's coreset selection, quadratic in the patches up to its pre-sample). Measured, a default
#: PatchCore fit took 0.7-1.2 selection runs on the 9 surfaces (100 goods, r = 0.77: fixed costs dominate,
#: so r itself), 3.6 on ELPV mono (371 goods, r = 1.8) and 6.3 on poly (580, r = 2.8), against 2.4 / 4.7
#: by this estimate (1.8 / 2.8 linear): it still errs low, so a candidate is skipped rather than the bound
#: passed
FIT_COST_EXPONENT = 1.5
#: the budget kept for the winner's final fit on all training images: this many times the costliest
#: ``Candidate.final_cost`` of the candidates that may still win (in default fits)
FINAL_RESERVE = 1.2


@dataclass(frozen=True)
class Candidate:
    """One entry of the grid: a detector name, its settings and its rough cost relative to the
    first candidate's selection run (from bench/surfaces.py timings; used only for the time budget;
    candidates that share the first one's backbone and size reuse its backbone passes, tap_cache)."""

    label: str
    detector: str
    settings: dict = field(default_factory=dict)
    cost: float = 1.0
    #: its final fit on all the training images, in default PatchCore fits (for the budget's reserve)
    final_cost: float = 1.0

    def make(self, overrides: dict | None = None) -> Detector:
        return get_detector_class(self.detector)(**{**self.settings, **(overrides or {})})


#: the default grid, chosen on bench/surfaces.py (docs/auto.md): the defaults of the two detectors,
#: stride-4 features (small defects) and the larger Lite2 backbone at 320 px (textured parts with thin
#: defects, ELPV poly: 0.931-0.936 over three seeds, against 0.899 for the defaults and 0.916 on Lite1 at
#: 224 px, the candidate it replaced, which the budget skipped on every surface).
#: Stride 4 has 4x the patches of the default stride 8, so it keeps 0.5% of them (not the default 2%):
#: a bank the size of the default's (at 1%, twice the default's, it scored lower on the surfaces where
#: auto chooses it, bench/results/surfaces.md, and its final fit alone took auto past 5x). The order is the
#: tie-break (``choose``): PatchCore (surfaces mean 0.915) and its variants before PaDiM (0.880).
DEFAULT_GRID: tuple[Candidate, ...] = (
    Candidate("patchcore", "patchcore", {}, 1.0),
    # final fit about 1.6x a default one: 3.7 vs 2.3 s on the paper surface, check set's making
    # included (cached backbone passes, 2026-12-01)
    Candidate("patchcore[stages=1,2,4]", "patchcore", {"stages": (1, 2, 4), "coreset_fraction": 0.005}, 1.0, 1.6),
    # textured parts and small defects (ELPV poly): the larger Lite2 at 320 px, its selection on a 32-d
    # projection (its twice as many patches); selection about 2.1x the first candidate's, final fit about
    # 3 default ones (ELPV poly, 2026-12-02)
    Candidate("patchcore[backbone=lite2,image_size=320]", "patchcore",
              {"backbone": "lite2", "image_size": 320, "projection_dim": 32}, 2.1, 3.0),
    Candidate("padim", "padim", {}, 0.4),
)


@dataclass
class SelectionRow:
    label: str
    detector: str
    settings: dict
    image_auroc: float | None = None
    pixel_auroc: float | None = None
    seconds: float | None = None
    #: its scoring time per image, milliseconds, on TIMING_IMAGES check images without the shared backbone
    #: passes (what the saved model would cost per part, on this machine and load)
    score_ms: float | None = None
    status: str = "ok"


@dataclass
class Selection:
    """The table the winner was chosen from, and how the check set was made."""

    chosen: str
    rows: list[SelectionRow]
    n_fit: int
    n_check_good: int
    n_synthetic: int
    n_real_defects: int
    seed: int
    seconds: float
    budget: float

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rows"] = [asdict(r) for r in self.rows]
        return out

    def markdown(self) -> str:
        lines = ["| candidate | image AUROC | pixel AUROC | s | score ms/image | status |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            def f(v, spec="{:.3f}"):
                return "–" if v is None else spec.format(v)
            mark = " **(chosen)**" if r.label == self.chosen else ""
            lines.append(f"| {r.label}{mark} | {f(r.image_auroc)} | {f(r.pixel_auroc)} | {f(r.seconds, '{:.1f}')} "
                         f"| {f(r.score_ms, '{:.1f}')} | {r.status} |")
        return "\n".join(lines)


def make_check_set(goods: Sequence[np.ndarray], rng: np.random.Generator,
                   scales: Sequence[float] = DEFECT_SCALES) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Goods and one synthetic defective twin of each -> (images, labels, masks)."""
    images, labels, masks = [], [], []
    for img in goods:
        base = np.clip(to_float01(np.asarray(img)), 0.0, 1.0).astype(np.float32)
        scale = float(scales[int(rng.integers(len(scales)))])
        bad, mask = add_random_defect(base, rng, scale=scale, min_area=0.001)
        images += [base, bad]
        labels += [0, 1]
        masks += [np.zeros(mask.shape, dtype=bool), mask]
    return images, np.asarray(labels, dtype=np.int64), masks


def auroc_standard_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil's (1982) standard error of an ROC AUC from n_pos positives and n_neg negatives."""
    auc = min(max(float(auc), 0.0), 1.0)
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / max(n_pos * n_neg, 1)
    return float(np.sqrt(max(var, 0.0)))


def full_fit_units(n_good: int, n_selection: int) -> float:
    """A full default fit on ``n_good`` good images, in selection runs of ``n_selection`` images (the fit
    part and the check set): their ratio r, to the power ``FIT_COST_EXPONENT`` where r > 1."""
    ratio = n_good / max(n_selection, 1)
    return float(max(ratio, ratio ** FIT_COST_EXPONENT))


def choose(rows: Sequence[SelectionRow], n_pos: int, n_neg: int) -> SelectionRow:
    """The winner among the scored rows (in grid order): the earliest row whose image AUROC is within
    one standard error of the best one's (a closer difference is not one this check set can see)."""
    scored = [r for r in rows if r.status == "ok" and r.image_auroc is not None]
    if not scored:
        raise SettingsError("no candidate of the grid could be scored")
    best = max(r.image_auroc for r in scored)
    floor = best - auroc_standard_error(best, n_pos, n_neg)
    return next(r for r in scored if r.image_auroc >= floor)


def select_detector(images: Sequence[np.ndarray], labels: Sequence[int] | None = None, *,
                    grid: Sequence[Candidate] = DEFAULT_GRID, holdout: float = 0.3, seed: int = 0,
                    budget: float = 5.0, overrides: dict | None = None,
                    progress: Callable[[SelectionRow], None] | None = None) -> tuple[Detector, Selection]:
    """Pick the best candidate of ``grid`` for these training images; returns (a fresh, unfitted
    detector with the winner's settings, the selection table). ``overrides`` are settings given to
    every candidate (e.g. ``{"image_size": 128}``). See the module docstring."""
    start = time.perf_counter()
    images = check_images(images)
    labels = np.zeros(len(images), np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images):
        raise SettingsError(f"{len(images)} images but {len(labels)} labels")
    if not grid:
        raise SettingsError("the selection grid is empty")
    if not 0.0 < holdout < 1.0:
        raise SettingsError(f"holdout must be in (0, 1), got {holdout}")
    rng = np.random.default_rng(seed)
    good = np.flatnonzero(labels == 0)
    if len(good) > MAX_SELECTION_IMAGES:
        good = np.sort(rng.choice(good, MAX_SELECTION_IMAGES, replace=False))
    n_check = max(MIN_CHECK, int(round(holdout * len(good))))
    if len(good) - n_check < 4:
        raise SettingsError(f"--detector auto needs at least {MIN_CHECK + 4} good training images "
                            f"(it holds out {n_check} to check the candidates), got {len(good)}")
    perm = rng.permutation(good)
    check_idx, fit_idx = np.sort(perm[:n_check]), np.sort(perm[n_check:])
    fit_images = [images[i] for i in fit_idx]
    check_images_, check_labels, check_masks = make_check_set([images[i] for i in check_idx], rng)
    real = [images[i] for i in np.flatnonzero(labels == 1)]
    all_check = check_images_ + real
    all_labels = np.r_[check_labels, np.ones(len(real), np.int64)]

    # the budget counts in full default fits: convert the unit (the first candidate's selection run)
    scale = full_fit_units(int((labels == 0).sum()), len(fit_images) + len(all_check))
    with tap_cache():
        rows = _run_grid(grid, overrides, fit_images, all_check, all_labels, check_masks, budget, scale, start,
                         progress)
    best = choose(rows, int((all_labels == 1).sum()), int((all_labels == 0).sum()))
    chosen = next(c for c in grid if c.label == best.label)
    selection = Selection(chosen=best.label, rows=rows, n_fit=len(fit_images), n_check_good=n_check,
                          n_synthetic=int(check_labels.sum()), n_real_defects=len(real), seed=seed,
                          seconds=round(time.perf_counter() - start, 2), budget=budget)
    return chosen.make(overrides), selection


def _run_grid(grid, overrides, fit_images, check, check_labels, check_masks, budget, scale, start,
              progress) -> list[SelectionRow]:
    """Fit and score each candidate in order within the time budget (see ``select_detector``)."""
    rows: list[SelectionRow] = []
    n_synthetic = len(check_masks)
    unit = None  # seconds of the first candidate, per unit of cost
    final = 0.0  # the costliest final fit of the candidates run so far (full fits)
    for cand in track(grid, "auto: candidates"):
        row = SelectionRow(cand.label, cand.detector, {**cand.settings, **(overrides or {})})
        spent = time.perf_counter() - start
        # room for this candidate, and FINAL_RESERVE x the final fit of whichever may win kept for it
        reserve = FINAL_RESERVE * max(final, cand.final_cost)
        if unit is not None and spent + unit * cand.cost > (budget - reserve) * scale * unit:
            row.status = f"skipped: time budget ({budget:g}x the default's selection cost)"
            rows.append(row)
            continue
        t0 = time.perf_counter()
        det = cand.make(overrides)
        det.fit(fit_images, validation_fraction=0.0, calibrate=False)
        result = det.score(check)
        row.score_ms = _scoring_ms(det, check)
        row.image_auroc = float(image_auroc(check_labels, result.scores))
        if result.maps is not None:
            maps = np.asarray(result.maps)[: n_synthetic]
            row.pixel_auroc = float(pixel_auroc(np.stack(_resize_masks(check_masks, maps.shape[-2:])), maps))
        row.seconds = round(time.perf_counter() - t0, 2)
        if unit is None:
            unit = max(row.seconds / max(cand.cost, 1e-6), 1e-3)
        final = max(final, cand.final_cost)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


#: check images the per-part scoring time is measured on (one batch of the default batch size)
TIMING_IMAGES = 8


def _scoring_ms(det: Detector, check: Sequence[np.ndarray]) -> float:
    """Milliseconds per image to score some check images as the saved model would: without the backbone
    passes the candidates share (``tap_cache``), which would make all but the first look cheap."""
    images = list(check[:TIMING_IMAGES])
    with no_tap_cache():
        t0 = time.perf_counter()
        det.score(images)
        return round(1000.0 * (time.perf_counter() - t0) / max(len(images), 1), 2)


def _resize_masks(masks: list[np.ndarray], size) -> list[np.ndarray]:
    """Masks at the detector's map size (nearest neighbour), for the pixel AUROC."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    out = []
    for m in masks:
        if m.shape == (h, w):
            out.append(m)
        else:
            img = Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
            out.append(np.asarray(img) > 127)
    return out
