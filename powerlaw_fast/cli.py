"""Command line: ``python -m powerlaw_fast {demo, reproduce, plot}`` (also ``powerlaw-fast``).

- ``demo``: a vanilla shallow net vs two spectrally regularised ones (the paper's per-epoch
  basis and a basis updated every step) on the MNIST subset shipped with the package, 3 seeds
  (a few minutes on a CPU); prints the robustness tables and what the runs say about the
  paper's claims, writes the run JSONs, the figures and the summary. ``--quick``: a smoke test
  of the installation in seconds.
- ``reproduce {shallow,whitening,all-layers}``: the sweeps of sec. 4.1 - 4.3 with the paper's
  hyperparameters, one JSON per run, resumable. ``--preset`` picks a documented setting
  (:data:`~powerlaw_fast.paper.experiments.config.PRESETS`): ``paper`` (the paper as written, the
  default), ``authors`` (the authors' code's values) or ``fresh-basis`` (the per-step tracked
  basis under which the regularised spectrum follows 1/n, though not the robustness gain);
  explicit options override it. It says what it is doing: before any run, on a CPU, a rough
  duration (a warning above 15 minutes), and a warning when PGD's steps x step size cannot
  reach the largest eps; at the end the robustness tables (those ``plot`` prints) and a
  warning when the vanilla networks are undertrained for the claims tested
  (:mod:`~powerlaw_fast.paper.experiments.checks`).
- ``plot RESULTS_DIR``: redraw every figure and ``summary.json`` from the JSON results.

Every check that can fail (arguments, the output folder, matplotlib, the data, the runs'
batch sizes and widths) runs before any training. Exit status: 0 on success, 2 for a usage
error or a missing / corrupt data folder (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ._version import __version__
from .paper.datasets import MNISTFileError
from .paper.experiments import (
    DEFAULT_EPS,
    DEFAULT_NOISE,
    EXPERIMENTS,
    PRESETS,
    check_runs,
    distributed_shard,
    load_data,
    preset_fields,
    run_sweep,
    sweep_configs,
)
from .paper.experiments.checks import (
    UNDERTRAINED_ACCURACY,
    pgd_reach_warning,
    undertrained_warning,
)
from .paper.experiments.config import BASIS_UPDATES, SCHEME_PATTERN
from .paper.experiments.demo import demo_settings, run_demo

# reproduce warns on a CPU when the estimated duration passes this many seconds
SLOW_SWEEP_SECONDS = 15 * 60


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit 2) that point at ``--help``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is available (use --device cpu)")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise CommandError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                               "device(s) here")
    return device


def _load(args, limit_train, limit_test):
    try:
        return load_data(args.data, limit_train, limit_test)
    except (MNISTFileError, FileNotFoundError, NotADirectoryError) as err:
        where = args.data if args.data is not None else "POWERLAW_FAST_DATA / shipped subset"
        raise CommandError(f"cannot read MNIST from {where}: {err}") from None


def _check_out(path: Path, option: str = "--out") -> None:
    """Refuse an output folder that cannot be written, before any work (leaves no trace)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CommandError(f"{option}: {path} exists and is not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CommandError(f"{option}: {path} is under {parent}, which is a file")
            break
    created = []
    for folder in [*reversed(path.parents), path]:
        if not folder.exists():
            created.append(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".powerlaw_fast_probe", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CommandError(f"{option}: cannot write to {path}: "
                           f"{err.strerror or err}") from None
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass


def _check_matplotlib(command: str, alternative: str = "") -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CommandError(f"{command}: the figures need matplotlib: pip install "
                           f"'powerlaw-fast[plot]' (or pip install matplotlib){alternative}"
                           ) from None


def _progress(args) -> bool:
    # tqdm redraws with carriage returns and escape codes: only on a terminal
    return not args.no_progress and sys.stderr.isatty()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _scheme(text: str) -> str:
    if not re.fullmatch(SCHEME_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"expected lower-case letters, digits and '-' (e.g. random-basis), got {text!r}")
    return text


def _batch(text: str) -> int:
    value = _positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 2 (batch norm and the covariance need 2 rows), got {text}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _data_folder(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="powerlaw-fast",
        description="1/n spectral regularisation (Nassar et al., NeurIPS 2020): a demo, the "
        "experiments of sec. 4 and their figures.",
        epilog="Start with 'powerlaw-fast demo' (a few minutes on a CPU) or "
        "'powerlaw-fast demo --quick' (seconds; checks the installation).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command",
                                title="commands")

    def common(p, out_default):
        p.add_argument("--data", type=_data_folder, default=None, metavar="DIR",
                       help="MNIST folder (torchvision layout, IDX files); default "
                       "$POWERLAW_FAST_DATA, else the 6000/1000-image subset shipped in the "
                       "package")
        p.add_argument("--out", type=Path, default=Path(out_default), metavar="DIR",
                       help="output folder for the run JSONs and figures (default: "
                       "./%(default)s)")
        p.add_argument("--device", type=_device_name, default=None,
                       help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
        p.add_argument("--epochs", type=_positive, default=None,
                       help="training epochs (demo: 12, --quick: 2; reproduce: 50, the "
                       "authors' default)")
        p.add_argument("--no-progress", action="store_true",
                       help="hide the progress bars (they are shown only on a terminal)")

    demo = sub.add_parser(
        "demo",
        help="vanilla vs SpecReg shallow net on the shipped MNIST subset (minutes on a CPU)",
        description="Train a vanilla 784-500-10 sigmoid + batch norm network and two "
        "spectrally regularised ones (V refreshed at each epoch start, the paper's scheme; V "
        "updated every step from a running covariance), 3 seeds each, on the 6000 training "
        "images shipped with the package, attack them with FGSM, PGD-40 and white noise on the "
        "1000 test images, print the tables and what the runs say about the paper's claims "
        "(more robust, a 1/n spectrum, a higher dimension), and write the run JSONs, figures "
        "and summary.json. A few minutes on a CPU (the README gives measured times); nothing "
        "is downloaded.")
    common(demo, "powerlaw_fast_demo")
    demo.add_argument("--quick", action="store_true",
                      help="a smoke test of the installation (seconds); its numbers mean nothing")

    rep = sub.add_parser(
        "reproduce", help="the experiments of sec. 4.1-4.3 (hours on a CPU; use a GPU)",
        description="Run one experiment of the paper with its settings (Adam lr 1e-4, batch "
        "1.5x the widest layer, tau 10, alpha 1, beta 1 2 5, 3 seeds, PGD 40 x 0.01), one JSON "
        "per run in --out; rerunning the same command resumes an interrupted sweep. On a CPU "
        "it prints an estimate of the duration first (a warning above 15 minutes); it warns "
        "before any run when PGD's steps x 0.01 cannot reach the largest eps (PGD can come out "
        "weaker than FGSM there), and at the end prints the robustness tables and warns when "
        "the vanilla networks' clean test accuracy is below "
        f"{UNDERTRAINED_ACCURACY:g} (undertrained: the paper's claims compare trained "
        "networks).")
    rep.add_argument("experiment", choices=list(EXPERIMENTS),
                     help="shallow: sec. 4.1 (784-2000-10, vanilla vs SpecReg); whitening: sec. "
                     "4.2 (whitened 2nd layer, last-layer SpecReg, both); all-layers: sec. 4.3 "
                     "(SpecReg on every layer vs Jacobian regularisation)")
    common(rep, "powerlaw_fast_results")
    rep.add_argument("--arch", choices=["mlp", "cnn"], default="mlp",
                     help="network for whitening / all-layers (default: %(default)s; shallow "
                     "uses the shallow net)")
    rep.add_argument("--seeds", type=_positive, default=3,
                     help="number of seeds, run as 0..N-1 (default: %(default)s)")
    rep.add_argument("--beta", type=_non_negative, nargs="+", default=[1.0, 2.0, 5.0],
                     help="spectral penalty strengths, one run each (default: 1 2 5, the "
                     "paper's)")
    rep.add_argument("--preset", choices=list(PRESETS), default=None,
                     help="a documented setting: paper (the paper as written: sigmoid, batch "
                     "norm before it, lr 1e-4, batch 1.5 N, V refreshed per epoch, 50 epochs; "
                     "what runs without --preset), authors (their code: tanh, batch norm after "
                     "it and regularised, lr 1e-3, batch 3500, per-epoch eval-mode refresh, "
                     "authors' tau convention) or fresh-basis (tanh, batch norm before it, lr "
                     "1e-3, batch 1.5 N, V the eigenbasis of a running average of the training "
                     "batches' covariances, tracked every step: the spectrum follows 1/n, the "
                     "robustness gain does not). --lr, --batch-size, --epochs, --basis-update "
                     "override it")
    rep.add_argument("--lr", type=_learning_rate, default=None,
                     help="Adam learning rate (default: the preset's; 1e-4, the paper's)")
    rep.add_argument("--batch-size", type=_batch, default=None,
                     help="training batch, at least 2 (default: the preset's; 1.5 x the widest "
                     "hidden layer, the paper's rule)")
    rep.add_argument("--width", type=_positive, default=None,
                     help="hidden width (default: shallow 2000, MLP layers / CNN fc 1000)")
    rep.add_argument("--limit-train", type=_positive, default=None, metavar="N",
                     help="train on the first N training images only (default: all)")
    rep.add_argument("--limit-test", type=_positive, default=None, metavar="N",
                     help="evaluate on the first N test images only (default: all)")
    rep.add_argument("--eps", type=_non_negative, nargs="+", default=list(DEFAULT_EPS),
                     help="L-inf epsilon grid of FGSM and PGD (default: "
                     f"{' '.join(f'{e:g}' for e in DEFAULT_EPS)})")
    rep.add_argument("--noise", type=_non_negative, nargs="*", default=list(DEFAULT_NOISE),
                     help="white-noise sigma grid, empty to skip (default: "
                     f"{' '.join(f'{e:g}' for e in DEFAULT_NOISE)})")
    rep.add_argument("--pgd-steps", type=_positive, default=40, metavar="N",
                     help="PGD steps of 0.01 each (default: %(default)s, the paper's)")
    rep.add_argument("--basis-update", choices=list(BASIS_UPDATES), default=None,
                     help="where the eigenbasis V comes from (default: the preset's): epoch "
                     "(refreshed at each epoch start, the paper's), running (a running average "
                     "of the batches' covariances, re-diagonalised every step), tracked (the same "
                     "basis followed by small rotations each step, no N x N eigendecomposition "
                     "on a GPU) or random (a control: a fixed random orthogonal V per layer, "
                     "never refreshed)")
    rep.add_argument("--scheme", type=_scheme, default=None, metavar="NAME",
                     help="a name for this sweep's training scheme (letters, digits, '-'): it "
                     "joins the regularised runs' file names and curve labels, so that sweeps "
                     "differing only in e.g. --basis-update share one folder and one figure")
    rep.add_argument("--refresh-every", type=_positive, default=None, metavar="N",
                     help="also refresh the eigenbases every N steps (default: per epoch; not "
                     "with --preset fresh-basis, whose basis is updated every step)")
    rep.add_argument("--no-plot", action="store_true",
                     help="do not draw the figures nor write figures/summary.json at the end "
                     "('plot' does both later; the tables are printed all the same)")
    rep.add_argument("--parallel", choices=["runs", "data"], default="runs",
                     help="under torchrun: divide the runs among the processes (runs, default) "
                     "or train each run data-parallel over all of them (data: DDP, the "
                     "regulariser on the global batch)")

    plot = sub.add_parser(
        "plot", help="redraw the figures and the summary from a results folder",
        description="Redraw every figure, write summary.json beside them (each curve's "
        "numbers per seed and mean +- std over seeds, and the best beta per seed) and print "
        "the tables, from the run JSONs under RESULTS_DIR (as written by demo or reproduce). "
        "A folder kept with only its summary.json (no run JSONs) gets the robustness and "
        "best-beta figures redrawn from it; the spectra and sensitivity maps need the runs.")
    plot.add_argument("results_dir", type=Path, metavar="RESULTS_DIR",
                      help="folder holding the run JSONs (searched recursively)")
    plot.add_argument("--out", type=Path, default=None, metavar="DIR",
                      help="folder for the figures and summary.json (default: "
                      "RESULTS_DIR/figures)")
    return parser


def cmd_demo(args) -> int:
    _, world = distributed_shard()
    if world > 1:
        raise CommandError("demo: distributed runs (WORLD_SIZE > 1) are not supported; run the "
                           "demo as a single process")
    settings = demo_settings(quick=args.quick, epochs=args.epochs)
    device = _device(args.device)
    out = Path(args.out)
    _check_out(out)
    _check_matplotlib("demo")
    data = _load(args, settings["limit_train"], settings["limit_test"])
    run_demo(settings, data, out, device=device, progress=_progress(args))
    return 0


def cmd_reproduce(args) -> int:
    device = _device(args.device)
    _check_out(args.out)
    if not args.no_plot:
        _check_matplotlib("reproduce", ", or pass --no-plot")
    preset = args.preset or "paper"
    overrides = preset_fields(preset)
    overrides.update(
        width=args.width, limit_train=args.limit_train, limit_test=args.limit_test,
        fgsm_eps=tuple(args.eps), pgd_eps=tuple(args.eps), noise_sigma=tuple(args.noise),
        pgd_steps=args.pgd_steps, refresh_every=args.refresh_every,
    )
    for option in ("lr", "batch_size", "epochs", "basis_update", "scheme"):
        if getattr(args, option) is not None:
            overrides[option] = getattr(args, option)
    if args.experiment != "shallow":
        # the MLP and CNN are tanh networks without ShallowNet's batch norm
        overrides.pop("activation")
        overrides.pop("batch_norm_position")
    if args.preset is not None:
        # recorded only when asked for, so that a sweep started without --preset resumes
        overrides["notes"] = {"preset": preset, "why": PRESETS[preset]["why"]}
    try:
        configs = sweep_configs(args.experiment, arch=args.arch, seeds=args.seeds,
                                betas=args.beta, **overrides)
    except ValueError as err:
        raise CommandError(str(err)) from None
    data = _load(args, args.limit_train, args.limit_test)
    n_train, n_test = int(data.train_x.shape[0]), int(data.test_x.shape[0])
    try:
        check_runs(configs, n_train)
    except ValueError as err:
        raise CommandError(str(err)) from None
    rank, world = distributed_shard()
    print(f"{args.experiment}: {len(configs)} runs on {device}; data: {data.source}, using "
          f"{n_train} train / {n_test} test images; preset {preset}"
          f"{'' if args.preset else ' (the default)'}", flush=True)
    if data.source.startswith("shipped"):
        print("  note: the paper used all of MNIST (60000 / 10000): pass --data DIR or set "
              "POWERLAW_FAST_DATA", flush=True)
    if rank == 0:
        reach = pgd_reach_warning(configs)
        if reach is not None:
            _warn(reach)
    if device.type == "cpu" and rank == 0:
        from .paper.experiments.estimate import estimate_seconds, format_duration

        seconds, speed = estimate_seconds(configs, n_train, n_test, device)
        seconds /= world if args.parallel == "runs" else 1
        rough = (f"(a rough estimate: float32 GEMMs measured at {speed / 1e9:.0f} GFLOP/s "
                 "here)")
        if seconds > SLOW_SWEEP_SECONDS:
            _warn(f"on this CPU this sweep should take about {format_duration(seconds)} "
                  f"{rough}; a GPU, or --epochs, --limit-train, --width or --seeds, makes it "
                  "shorter. Interrupt it at any time: rerunning the same command resumes it.")
        else:
            print(f"  estimate: about {format_duration(seconds)} on this CPU {rough}",
                  flush=True)
    try:
        outcome = run_sweep(configs, args.out, data, device=device,
                            progress=_progress(args), parallel=args.parallel)
    except ValueError as err:
        if "data-parallel" not in str(err):
            raise
        raise CommandError(str(err)) from None
    ran = sum(1 for _, what in outcome if what == "ran")
    if rank == 0 or args.parallel == "runs":
        print(f"{args.experiment}: {ran} run(s) done, {len(outcome) - ran} already complete; "
              f"results in {args.out}")
    if world > 1 and args.parallel == "runs":
        print("distributed sweep: draw the figures and the summary once every rank is done: "
              f"python -m powerlaw_fast plot {args.out}")
    elif rank == 0:
        from .paper.experiments import load_results
        from .paper.plots import print_tables

        try:
            results = load_results(args.out) if Path(args.out).is_dir() else []
        except ValueError as err:  # a damaged result in the folder: as 'plot' reports it
            raise CommandError(str(err)) from None
        print()
        print_tables(results)  # what 'plot' prints
        if not args.no_plot:
            from .paper.experiments.summary import write_summary
            from .paper.plots import plot_results

            figures = plot_results(args.out, results=results)
            summary = write_summary(results, Path(args.out) / "figures" / "summary.json")
            print("figures: " + ", ".join(str(p) for p in figures))
            print(f"summary (per seed, mean +- std over seeds, best beta per seed): {summary}")
        undertrained = undertrained_warning(results)
        if undertrained is not None:
            for line in undertrained.splitlines():
                _warn(line)
    return 0


def cmd_plot(args) -> int:
    from .paper.experiments import load_results

    if not args.results_dir.is_dir():
        raise CommandError(f"plot: {args.results_dir} is not a folder")
    out = args.out if args.out is not None else args.results_dir / "figures"
    _check_out(out)
    _check_matplotlib("plot")
    from .paper.experiments.summary import write_summary
    from .paper.plots import plot_results, print_tables

    try:
        results = load_results(args.results_dir)
        if not results and (args.results_dir / "summary.json").is_file():
            return _plot_summary(args.results_dir / "summary.json", out)
        figures = plot_results(args.results_dir, args.out, results=results)
    except ValueError as err:
        raise CommandError(str(err)) from None
    summary = write_summary(results, Path(out) / "summary.json")
    print_tables(results)
    for path in [*figures, summary]:
        print(path)
    return 0


def _plot_summary(path: Path, out: Path) -> int:
    """``plot`` of a folder that holds a summary.json and no run JSONs."""
    import json

    from .paper.plots import plot_summary

    try:
        summary = json.loads(path.read_text())
        figures = plot_summary(summary, out)
    except (ValueError, KeyError, TypeError) as err:
        raise CommandError(f"{path}: not a summary.json of this version ({err!r})") from None
    print(f"{path.parent}: no run JSONs, so the figures come from {path.name}: the robustness "
          "(and best-beta) figures; the spectra and sensitivity maps need the run JSONs")
    for figure in figures:
        print(figure)
    return 0


def _warn(message: str) -> None:
    sys.stdout.flush()  # after what was printed before it, also in a merged log
    print(f"powerlaw-fast: warning: {message}", file=sys.stderr, flush=True)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"powerlaw-fast: warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    """Entry point of ``python -m powerlaw_fast`` and ``powerlaw-fast``; returns the exit code."""
    args = build_parser().parse_args(argv)
    handler = {"demo": cmd_demo, "reproduce": cmd_reproduce, "plot": cmd_plot}[args.command]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return handler(args)
    except CommandError as err:
        print(f"powerlaw-fast: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("powerlaw-fast: interrupted (finished runs are saved; rerun to resume)",
              file=sys.stderr)
        return 130
