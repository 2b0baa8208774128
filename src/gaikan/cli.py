"""The ``gaikan`` command. Thin: it parses options and calls the library (gaikan.pipeline).

Errors the user can act on (GaikanError) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from gaikan.errors import GaikanError, SettingsError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="gaikan (外観): visual inspection that tells OK from NG parts on a CPU.")

DATA_HELP = ("Data spec: elpv:mono | elpv:poly (the fixed ELPV split), mvtec:PATH (one MVTec AD category), "
             "folder:PATH (good/ plus one folder per defect type; 20% of good/ held out for testing), "
             "idx:PATH[?good=D&defect=E] (MNIST-style IDX files).")
QUIET_HELP = "No progress bars."
ENGINE_HELP = ("Where the work runs: local (this process) or ray (a Ray cluster at --address, or a local Ray "
               "started on this machine); same outputs.")
ADDRESS_HELP = "Ray cluster address for --engine ray (e.g. ray://head:10001 or auto); default: start a local Ray."
WORKERS_HELP = "Ray workers (actors for predict, shares for fit), one CPU each; 0 = one per CPU of the cluster."


@app.callback()
def _global_options(
    threads: int = typer.Option(0, "--threads", help="CPU threads torch uses in every command, given before it "
                                "(gaikan --threads 1 fit ...); 0 = torch's default (all cores)."),
):
    """gaikan (外観): visual inspection that tells OK from NG parts on a CPU."""
    if threads < 0:
        _fail(f"--threads must be >= 0, got {threads}")
    if threads:
        from gaikan.pipeline import set_threads

        set_threads(threads)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def user_errors(fn):
    """Turn GaikanError into a one-line message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GaikanError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted")

    return wrapper


def _parse_options(options: list[str] | None) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for item in options or []:
        if "=" not in item:
            raise GaikanError(f"--option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        parsed[key.strip().replace("-", "_")] = value.strip()
    return parsed


def _set_quiet(quiet: bool) -> None:
    from gaikan.progress import set_quiet

    set_quiet(quiet)


def _console():
    from rich.console import Console

    return Console()


@app.command()
@user_errors
def fit(
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    detector: str = typer.Option("padim", "--detector", help="Detector name (see `gaikan detectors`), or auto: "
                                 "choose the detector and settings from held-out goods with synthetic defects "
                                 "(options holdout=0.3, budget=5: at most about that many default fits of time, the final "
                                 "fit included, image_size=N: one working size for every candidate (the Lite2 one's 320 "
                                 "too), real_defects=yes: "
                                 "the supervised protocol's training defects join the check (then evaluate with "
                                 "--rows supervised); the saved model is the chosen detector, its manifest has the "
                                 "table)."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-o",
                                               help="Detector setting KEY=VALUE, repeatable (e.g. n_features=100)."),
    out: Path = typer.Option(..., "--out", help="Model directory to write (refused if it exists, unless --force)."),
    validation_fraction: float = typer.Option(0.1, help="Share of the good training images held out to "
                                                        "calibrate the thresholds."),
    threshold_method: str = typer.Option("max-good", "--threshold", help="Default threshold: max-good (no false "
                                         "alarm on the held-out goods), quantile (99.5th percentile of them), "
                                         "or conformal (needs --false-alarm-rate)."),
    false_alarm_rate: Optional[float] = typer.Option(None, help="Target false-alarm rate alpha for the "
                                                     "split-conformal threshold (e.g. 0.01)."),
    seed: int = typer.Option(0, help="Seed of the folder: hold-out split."),
    engine: str = typer.Option("local", "--engine", help=ENGINE_HELP + " With ray, PaDiM's sums and PatchCore's "
                               "patch features are computed on the workers (the coreset selection stays here)."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    workers: int = typer.Option(0, "--workers", help=WORKERS_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing model directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Fit a detector on the good training images of a data set and save it."""
    from gaikan import pipeline
    from gaikan.engine import get_engine
    from gaikan.io.model_io import prepare_output_dir

    _set_quiet(quiet)
    prepare_output_dir(out, overwrite=force, what="model directory")
    if false_alarm_rate is not None and threshold_method == "max-good":
        threshold_method = "conformal"
    start = time.perf_counter()
    if detector == "auto":
        det = _fit_auto(data, _parse_options(option), seed=seed, validation_fraction=validation_fraction,
                        threshold_method=threshold_method, false_alarm_rate=false_alarm_rate)
    else:
        det = pipeline.make_detector(detector, _parse_options(option))
        split = pipeline.load_split_for(det, data, seed=seed)
        start = time.perf_counter()
        with get_engine(engine, address=address, workers=workers) as runner:
            pipeline.fit_detector(det, split, validation_fraction=validation_fraction,
                                  threshold_method=threshold_method, false_alarm_rate=false_alarm_rate,
                                  engine=runner)
    seconds = time.perf_counter() - start
    det.fit_info_["seconds"] = round(seconds, 2)
    det.save(out, overwrite=force)
    info = det.fit_info_
    typer.echo(f"fitted {det.name} on {info['n_train']} images of {data} in {seconds:.1f} s; "
               f"threshold {det.thresholds.default_method} = {det.threshold:.4g} "
               f"(from {info['n_calibration']} {info['calibrated_on']}); saved to {out}")


AUTO_OPTIONS = {"holdout": float, "budget": float, "image_size": int, "real_defects": str}


def _fit_auto(data: str, options: dict[str, str], *, seed: int, **fit_kwargs):
    """`fit --detector auto`: the selection (gaikan.auto) on the good-only protocol's training images,
    its table printed, the winner fitted."""
    from gaikan import pipeline
    from gaikan.auto import Selection, SelectionRow

    unknown = set(options) - set(AUTO_OPTIONS)
    if unknown:
        raise SettingsError(f"auto has no setting {sorted(unknown)[0]!r}; its settings are: {', '.join(AUTO_OPTIONS)}")
    try:
        kwargs = {k: AUTO_OPTIONS[k](v) for k, v in options.items()}
    except ValueError as exc:
        raise SettingsError(f"auto setting: {exc}") from None
    if "image_size" in kwargs:
        kwargs["overrides"] = {"image_size": kwargs.pop("image_size")}
    real = kwargs.pop("real_defects", "no").lower()
    if real not in ("yes", "no", "true", "false", "1", "0"):
        raise SettingsError(f"auto setting real_defects must be yes or no, got {real!r}")
    # real_defects=yes: the supervised protocol's training defects (ELPV split_sup, a folder's
    # supervised half) join the check set; that model is then to be evaluated with --rows supervised
    split = pipeline.load_data(data, seed=seed, supervised=real in ("yes", "true", "1"))
    det = pipeline.fit_auto(split, seed=seed, **kwargs, **fit_kwargs)
    sel = det.fit_info_["selection"]
    table = Selection(**{**sel, "rows": [SelectionRow(**r) for r in sel["rows"]]})
    typer.echo(f"auto: {sel['n_fit']} goods to fit, {sel['n_check_good']} held-out goods + "
               f"{sel['n_synthetic']} synthetic defects + {sel['n_real_defects']} real defects to check; "
               f"{sel['seconds']:.1f} s\n{table.markdown()}")
    return det


@app.command()
@user_errors
def evaluate(
    model: Path = typer.Option(..., "--model", help="Model directory written by `gaikan fit`."),
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the metrics as JSON to this file."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write plots (ROC, PR, histogram, confusion) "
                                          "and per-image scores into this directory."),
    seed: int = typer.Option(0, help="Seed of the folder: hold-out split (use the one given to fit)."),
    rows: str = typer.Option("own", "--rows", help="Test rows: own (the detector's protocol) or supervised (the "
                             "supervised protocol's test rows, e.g. ELPV split_sup == test, for any detector, so "
                             "good-only and supervised detectors are scored on the same images)."),
    projection: str = typer.Option("pca", "--projection", help="2-D projection of the embedding scatter in "
                                   "--report (detectors with an embedding): pca or tsne."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file or --report directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Score the test images of a data set and report image/pixel AUROC, F1, thresholds, confusion.

    --report also draws, for metric-learning detectors, the embedding scatter of the training and test
    images and the training/validation loss curves."""
    from gaikan import pipeline
    from gaikan.detectors.base import load_detector
    from gaikan.io.model_io import prepare_output_dir

    _set_quiet(quiet)
    if json_path is not None and json_path.exists() and not force:
        raise GaikanError(f"{json_path} already exists; use --force to replace it")
    if report is not None:
        prepare_output_dir(report, overwrite=force, what="report directory")
    if projection not in ("pca", "tsne"):
        raise GaikanError(f"--projection {projection!r}: use pca or tsne")
    det = load_detector(model)
    split = pipeline.load_evaluation_split(det, data, seed=seed, rows=rows)
    run = pipeline.evaluate_detector(det, split, report_dir=report, projection=projection)
    result = run.to_json()
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    _print_evaluation(result)
    if report is not None:
        typer.echo(f"report written to {report}")


def _print_evaluation(result: dict) -> None:
    from rich.table import Table

    def fmt(v):
        return "n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    table = Table(title=f"{result['detector']} on {result['data']} ({result['n_images']} test images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("image_auroc", "pixel_auroc", "aupro", "average_precision", "f1_max",
                "detection_rate_at_1pct", "detection_rate_at_5pct", "spearman_probability"):
        if key in result:
            table.add_row(key, fmt(result.get(key)))
    for method, value in result["thresholds"].items():
        mark = " (model)" if method == result["threshold_method"] else ""
        table.add_row(f"threshold {method}{mark}", f"{value:.4g}")
    c = result["confusion"]
    table.add_row("at model threshold: OK→OK / OK→NG", f"{c['tn']} / {c['fp']}")
    table.add_row("at model threshold: NG→OK / NG→NG", f"{c['fn']} / {c['tp']}")
    table.add_row("accuracy at model threshold", fmt(c.get("accuracy")))
    table.add_row("scoring ms / image", fmt(result.get("ms_per_image")))
    _console().print(table)


@app.command()
@user_errors
def predict(
    inputs: List[Path] = typer.Argument(..., help="Image files and/or folders of images."),
    model: Path = typer.Option(..., "--model", help="Model directory written by `gaikan fit` (or, with "
                                                    "--runtime onnx|openvino, the .onnx file written by "
                                                    "`gaikan export`)."),
    out: Path = typer.Option(..., "--out", help="Results directory: results.csv, ng_list.txt, figures/."),
    runtime: Optional[str] = typer.Option(None, "--runtime", help="torch: score with the saved model directory; "
                                          "onnx: score with an exported .onnx model through onnxruntime (same "
                                          "results); openvino: the same .onnx through OpenVINO (needs the openvino "
                                          "package); auto: export the model directory to ONNX in memory and run "
                                          "it with onnxruntime where it exports, else torch. Default: torch "
                                          "with --engine local, auto with --engine ray."),
    threads: int = typer.Option(0, "--threads", help="Runtime threads with --runtime onnx|openvino (0 = all cores)."),
    engine: str = typer.Option("local", "--engine", help=ENGINE_HELP + " With ray, an actor pool of --workers "
                               "scorers (each loads the model once) scores batches of the files."),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    workers: int = typer.Option(0, "--workers", help=WORKERS_HELP),
    no_figures: bool = typer.Option(False, "--no-figures", help="Skip the per-image figures (faster)."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also read the files in sub-folders of the "
                                   "input folders (at any depth)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing results directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """OK/NG verdict, score and heat-map figure for each image. Every file found gets a row in results.csv:
    unreadable ones (corrupt, too small, too large, ...) and skipped ones (unsupported type) with the reason."""
    from gaikan import pipeline
    from gaikan.engine import get_engine

    _set_quiet(quiet)
    notes: list[str] = []
    with get_engine(engine, address=address, workers=workers) as runner:
        preds = pipeline.predict_with_engine(model, inputs, out, engine=runner, runtime=runtime, threads=threads,
                                             force=force, figures=not no_figures, recursive=recursive, notes=notes)
    for note in notes:
        typer.echo(note, err=True)
    n_ng = sum(p.verdict == "NG" for p in preds)
    n_ok = sum(p.verdict == "OK" for p in preds)
    bad = [p for p in preds if p.verdict == pipeline.UNREADABLE]
    skipped = [p for p in preds if p.verdict == pipeline.SKIPPED]
    extra = "".join(f", {n} {what}" for n, what in ((len(bad), "unreadable"), (len(skipped), "skipped")) if n)
    typer.echo(f"{len(preds)} files: {n_ok + n_ng} images scored ({n_ng} NG, {n_ok} OK){extra}; "
               f"results in {out / pipeline.RESULTS_CSV}")
    for p in bad:
        typer.echo(f"unreadable: {p.error}", err=True)
    for p in skipped:
        typer.echo(f"skipped: {p.error}", err=True)


@app.command()
@user_errors
def export(
    model: Path = typer.Option(..., "--model", help="Model directory written by `gaikan fit` (padim, patchcore, patch-metric)."),
    out: Path = typer.Option(..., "--out", help="ONNX file to write (refused if it exists, unless --force)."),
    quantize: str = typer.Option("none", "--quantize", help="none: float32 graph; int8: static int8 backbone "
                                 "(QDQ, calibrated on good training images; the detector head stays float), "
                                 "compared with the float graph on the test images in the same run."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="With --quantize int8: the data the "
                                              "model was fitted on (default: the one recorded at fit time). "
                                              + DATA_HELP),
    calibration_images: int = typer.Option(64, "--calibration-images", help="With --quantize int8: good training "
                                           "images that set the activation ranges."),
    seed: int = typer.Option(0, help="Seed of the folder: hold-out split (use the one given to fit)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Export a fitted model as one ONNX file: the whole scoring path (normalisation, backbone, the
    detector's head, upsampling, smoothing, image score) with the threshold and settings in its metadata.
    Score it with `gaikan predict --runtime onnx|openvino` or, on a device without torch, `python -m gaikan.edge`."""
    from gaikan.detectors.base import load_detector
    from gaikan.export.onnx_export import export_onnx

    _set_quiet(quiet)
    if quantize not in ("none", "int8"):
        raise GaikanError(f"--quantize {quantize!r}: use none or int8")
    if out.exists() and not force:
        raise GaikanError(f"{out} already exists; use --force to replace it")
    det = load_detector(model)
    start = time.perf_counter()
    h, w = det.input_size
    if quantize == "none":
        export_onnx(det, out, force=force)
        typer.echo(f"exported {det.name} ({h}x{w}, threshold {det.threshold:.4g}) to {out} "
                   f"({out.stat().st_size / 2**20:.1f} MB) in {time.perf_counter() - start:.1f} s")
        return
    from gaikan import pipeline
    from gaikan.export.quantize import quantize_detector

    spec = calibration or det.fit_info_.get("data")
    if not spec:
        raise GaikanError(f"{model} does not record the data it was fitted on: give --calibration DATA")
    split = pipeline.load_split_for(det, spec, seed=seed)
    info = quantize_detector(det, split, out, n_calibration=calibration_images, force=force)
    check, thr = info["check"], info["thresholds"]
    method = det.thresholds.default_method
    typer.echo(f"exported {det.name} ({h}x{w}) with an int8 backbone to {out} ({out.stat().st_size / 2**20:.1f} MB) "
               f"in {time.perf_counter() - start:.1f} s; calibrated on {info['calibration']['images']} good "
               f"training images of {spec}; threshold {method} {thr['float'][method]:.4g} (float) -> "
               f"{thr['int8'][method]:.4g} (int8, same rank among the held-out goods)")
    if check.get("images"):
        auroc = (f"; image AUROC float {check['auroc_float']:.4f}, int8 {check['auroc_int8']:.4f}"
                 if "auroc_float" in check else "")
        typer.echo(f"int8 vs float on {check['images']} test images of {spec}: median score change "
                   f"{100 * check['median_rel_score_diff']:.2f}%, max {100 * check['max_rel_score_diff']:.1f}%, "
                   f"same verdict on {check['verdicts_equal']}{auroc}")


COMPARE_DETECTORS_HELP = (
    "Comma-separated detectors to compare; a variant gets settings in brackets and is labelled by the whole "
    "string, e.g. \"padim,triplet\\[loss=cosine,anchor=mean],triplet\\[loss=euclidean],cnn-classifier\\[input=rt]\" "
    "(quote it for the shell).")


@app.command()
@user_errors
def compare(
    data: str = typer.Option(..., "--data", help=DATA_HELP),
    detectors_: str = typer.Option(..., "--detectors", help=COMPARE_DETECTORS_HELP),
    option: Optional[List[str]] = typer.Option(None, "--option", "-o", help="DETECTOR.KEY=VALUE (or "
                                               "VARIANT.KEY=VALUE), repeatable: a setting for every variant of that "
                                               "detector; settings in brackets win."),
    out: Path = typer.Option(..., "--out", help="Directory for compare.json and compare.md (refused if it exists "
                             "and is not empty, unless --force)."),
    rows: str = typer.Option("auto", "--rows", help="Test rows: auto (the supervised protocol's test rows, e.g. "
                             "ELPV split_sup == test, for everyone as soon as one detector learns from defects), "
                             "own (each detector its own protocol) or supervised."),
    save_models: bool = typer.Option(False, "--save-models", help="Also save every fitted model under OUT/models/."),
    validation_fraction: float = typer.Option(0.1, help="Share of the good training images held out to "
                                                        "calibrate the thresholds."),
    threshold_method: str = typer.Option("max-good", "--threshold", help="Threshold at which accuracy is "
                                         "reported: max-good or quantile."),
    seed: int = typer.Option(0, help="Seed of the folder: hold-out split."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Fit and evaluate several detectors on the same split; one table of image AUROC, accuracy at the
    model threshold, fit seconds and ms/image, also written as OUT/compare.json and OUT/compare.md."""
    from rich.table import Table

    from gaikan import compare as cmp
    from gaikan.io.model_io import prepare_output_dir

    _set_quiet(quiet)
    prepare_output_dir(out, overwrite=force, what="comparison directory")
    variants = cmp.parse_variants(detectors_, _parse_options_raw(option))

    def progress(row):
        status = f"failed: {row.error}" if row.error else f"AUROC {row.image_auroc:.4f}, fit {row.fit_seconds:.1f} s"
        typer.echo(f"{row.label}: {status}", err=True)

    results = cmp.compare_detectors(data, variants, rows=rows, seed=seed, validation_fraction=validation_fraction,
                                    threshold_method=threshold_method,
                                    models_dir=out / "models" if save_models else None,
                                    on_result=None if quiet else progress)
    json_path, md_path = cmp.write_comparison(results, out, spec=data, meta={"rows": rows, "seed": seed})
    table = Table(title=f"Detectors compared on {data}")
    for col in cmp.TABLE_COLUMNS:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for cells in cmp.table_rows(results):
        table.add_row(*cells)
    _console().print(table)
    typer.echo(f"written {json_path} and {md_path}")
    failed = [r for r in results if r.error]
    if failed and len(failed) == len(results):
        raise GaikanError(f"every detector failed; first: {failed[0].label}: {failed[0].error}")


def _parse_options_raw(options: list[str] | None) -> dict[str, str]:
    """KEY=VALUE strings -> dict, keeping dots in keys (compare's DETECTOR.KEY)."""
    parsed: dict[str, str] = {}
    for item in options or []:
        if "=" not in item:
            raise GaikanError(f"--option {item!r}: expected DETECTOR.KEY=VALUE")
        key, value = item.split("=", 1)
        parsed[key.strip()] = value.strip()
    return parsed


@app.command()
def detectors():
    """List the detectors and their settings."""
    from gaikan.detectors.base import detector_names, get_detector_class

    for name in detector_names():
        cls = get_detector_class(name)
        kind = ("supervised" if cls.supervised else
                "good images; also learns from defects when the data has them" if getattr(cls, "uses_defects", False)
                else "good images only")
        typer.echo(f"{name} ({kind}): settings {', '.join(cls.setting_names())}")


DEMO_MARKER = ".gaikan-demo"


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("gaikan-demo"), "--out", help="Where the demo writes its model and report."),
    data: str = typer.Option("elpv:mono", "--data", help=DATA_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Fit PaDiM on the embedded ELPV solar-cell images (mono), evaluate it and write a report."""
    from gaikan import pipeline

    _set_quiet(quiet)
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise GaikanError(f"{out} exists and was not written by `gaikan demo`; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by gaikan demo; replaced by the next demo run\n")
    det = pipeline.make_detector("padim")
    typer.echo(f"gaikan demo: PaDiM (EfficientNet-Lite0) on {data}", err=True)
    split = pipeline.load_split_for(det, data)
    start = time.perf_counter()
    pipeline.fit_detector(det, split)
    det.fit_info_["seconds"] = round(time.perf_counter() - start, 2)
    det.save(out / "model")
    run = pipeline.evaluate_detector(det, split, report_dir=out / "report")
    result = run.to_json()
    result["fit_seconds"] = det.fit_info_["seconds"]
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    _print_evaluation(result)
    typer.echo(f"fit: {det.fit_info_['seconds']:.1f} s on {det.fit_info_['n_train']} good cells; "
               f"model in {out / 'model'}, report in {out / 'report'}")


@app.command()
@user_errors
def serve(
    model: List[str] = typer.Option(..., "--model",
                                    help="Model directory written by `gaikan fit`, or NAME=DIR, repeated for "
                                         "several models (routes /v1/models/NAME/inspect). Each is loaded once."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    data_dir: Path = typer.Option(Path("gaikan-service"), "--data-dir",
                                  help="Where the SQLite inspection log and the stored images live (kept "
                                       "across restarts)."),
    db: Optional[str] = typer.Option(None, "--db", envvar="GAIKAN_DB", show_envvar=True,
                                     help="The inspection log's database instead of DATA_DIR/inspections.sqlite3: "
                                          "postgresql://USER@HOST:PORT/DB (shared by several replicas; give them "
                                          "one shared --data-dir for the images) or sqlite:///PATH."),
    api_key: Optional[List[str]] = typer.Option(None, "--api-key", envvar="GAIKAN_API_KEY", show_envvar=True,
                                                help="Key clients send in the X-API-Key header (required unless "
                                                     "--no-auth); NAME=KEY names it (reviews record the name), "
                                                     "repeat for several."),
    no_auth: bool = typer.Option(False, "--no-auth", help="No API key (only allowed on a loopback --host)."),
    max_upload_mb: float = typer.Option(20.0, help="Largest accepted upload, in MiB (larger: 413)."),
    max_pixels: int = typer.Option(40_000_000, help="Largest accepted image, width x height (larger: 413)."),
    runtime: str = typer.Option("auto", "--runtime",
                                help="auto: onnxruntime where the model exports, torch otherwise; onnx; torch."),
    workers: int = typer.Option(0, "--workers", help="Scoring threads per model (0: one per core; torch: 1)."),
    max_batch: int = typer.Option(0, "--max-batch", help="Most requests scored together in one batch "
                                  "(0 = the model's own: 8 where batches pay (PaDiM's head), else 2)."),
    max_wait_ms: float = typer.Option(2.0, "--max-wait-ms",
                                      help="How long a worker waits for a batch to fill while more requests "
                                           "are arriving (a lone request never waits)."),
    figures: str = typer.Option("lazy", "--figures",
                                help="lazy: draw thumb/heat map/overlay on their first request; ng: keep heat "
                                     "maps only for NG parts; eager: draw all for every upload."),
    drift_window: int = typer.Option(200, "--drift-window", help="Inspections in the drift test's window."),
    drift_level: float = typer.Option(1e-4, "--drift-level", help="Test level that raises the drift flag."),
    drift_ng_rate: Optional[float] = typer.Option(None, "--drift-ng-rate",
                                                  help="The line's usual NG rate: also flag an NG rate "
                                                       "significantly above it (off when not given)."),
):
    """Serve the model(s) over HTTP: POST /v1/inspect, the inspection log, /metrics, and a web page at /."""
    import uvicorn

    from gaikan.service.app import check_auth_settings, create_app
    from gaikan.service.models import parse_model_specs

    check_auth_settings(api_key, no_auth, host)
    models = parse_model_specs(model)
    drift = {"window": drift_window, "min_count": min(50, drift_window), "level": drift_level,
             "expected_ng_rate": drift_ng_rate}
    web = create_app(models if len(models) > 1 or "default" not in models else models["default"], data_dir,
                     api_key, no_auth=no_auth, host=host, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                     max_pixels=max_pixels, runtime=runtime, workers=workers, max_batch=max_batch,
                     max_wait_ms=max_wait_ms, figures=figures, drift=drift, db=db)
    for served in web.state.service.registry.all():
        typer.echo(f"gaikan serve: model {served.name} = {served.model_id} (version {served.model_version}; "
                   f"{served.runtime_note})", err=True)
    typer.echo(f"gaikan serve: http://{host}:{port}/ (log in {web.state.service.store.log.location})", err=True)
    uvicorn.run(web, host=host, port=port, log_level="warning")


@app.command()
@user_errors
def update(
    model: Path = typer.Option(..., "--model", help="Model directory written by `gaikan fit` (padim, patchcore); "
                               "never modified."),
    good: Optional[List[Path]] = typer.Option(None, "--good", help="New good images: files and/or folders, "
                                              "repeatable."),
    from_log: Optional[Path] = typer.Option(None, "--from-log", help="A `gaikan serve` data directory: take the "
                                            "images its operators reviewed as false alarm for this model."),
    out: Path = typer.Option(..., "--out", help="Directory for the new model version (refused if it exists, "
                             "unless --force; never the --model directory)."),
    holdout: float = typer.Option(0.0, "--holdout", help="Share of the new images added to the calibration set "
                                  "instead of training (seeded); 0 = all train, the kept held-out images "
                                  "recalibrate."),
    seed: int = typer.Option(0, help="Seed of the --holdout split."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Add new good images to a PaDiM or PatchCore model without its old images (PaDiM adds to its
    kept sums, PatchCore extends its bank), recalibrate the thresholds on the held-out goods and write
    a new model version."""
    from gaikan import pipeline
    from gaikan.update import false_alarm_images_from_log, read_images, update_model

    _set_quiet(quiet)
    if (good is None) == (from_log is None):
        raise GaikanError("give exactly one of --good PATH or --from-log DATA_DIR")
    if good:
        paths = pipeline.expand_inputs(good)
        source = "good:" + ",".join(str(g) for g in good)
    else:
        from gaikan.io.model_io import model_id, read_manifest

        paths = false_alarm_images_from_log(from_log, model_id(read_manifest(model)))
        source = f"log:{from_log}"
    images = read_images(paths)
    result = update_model(model, images, [str(p) for p in paths], out, holdout=holdout, seed=seed, source=source,
                          force=force)
    det = result.detector
    bank = (f"; memory bank {result.bank_before} -> {result.bank_after} patches"
            if result.bank_after is not None else "")
    typer.echo(f"updated {det.name} with {len(images)} images ({result.n_added_train} to training, "
               f"{result.n_added_calibration} to calibration){bank}; threshold {det.thresholds.default_method} "
               f"{result.threshold_before:.4g} -> {result.threshold_after:.4g} (from {det.fit_info_['n_calibration']} "
               f"held-out goods); version {det.fit_info_['model_version']} saved to {out}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
