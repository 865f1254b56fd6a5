"""Train and evaluate VQ-VAE / VAE face autoencoders on LFW.

    python vqvae_face_main.py                       # every run in experiment.json, embedded faces
    python vqvae_face_main.py --data lfw-deepfunneled.tgz --run vqvae
    python vqvae_face_main.py --eval                # evaluate saved checkpoints only
    python vqvae_face_main.py --sample 64           # new faces from the trained token prior
    python vqvae_face_main.py --encode face.jpg     # face.vqf beside it; --decode face.vqf writes face.png
    python vqvae_face_main.py --set epochs=2 --set data.image_size=32

Expected mistakes (bad config, missing data, no checkpoint, NaN loss, a corrupt
checkpoint, a full disk) end with a one-line error and exit status 2; Ctrl-C exits
with 130 and SIGTERM with 143, and the run resumes from its last completed epoch
when the same command is run again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from vqvae_faces.errors import Terminated, UserFacingError, WorkerLost

SCRIPT_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = SCRIPT_DIR / "experiment.json"

log = logging.getLogger("vqvae_faces")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="experiment JSON (default: experiment.json beside this script)")
    parser.add_argument(
        "--run", action="append", dest="runs", metavar="NAME", help="run to use (repeatable; default: all runs)"
    )
    parser.add_argument("--data", default=None, help="LFW folder or lfw-deepfunneled.tgz (overrides data.path)")
    parser.add_argument(
        "--test-data",
        default=None,
        help="evaluate on every image of this LFW-layout folder/archive instead of the saved test split",
    )
    parser.add_argument("--eval", action="store_true", help='evaluation only (same as "enable_training": false)')
    parser.add_argument(
        "--compare",
        action="store_true",
        help='train (or reuse) the runs listed in "compare" and compare them with JPEG/WebP '
        "on the same test faces; writes images_saved/compare/",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="N",
        help="draw N new faces from each selected prior run (no training); writes images_saved/<run>/samples.*",
    )
    parser.add_argument("--encode", nargs="+", metavar="PHOTO", help="write PHOTO's .vqf file beside it (no training)")
    parser.add_argument("--decode", nargs="+", metavar="FILE", help="write FILE.vqf's face as a .png beside it")
    parser.add_argument("--to", default=None, metavar="DIR", help="folder for the files --encode/--decode write")
    parser.add_argument(
        "--into",
        default=None,
        metavar="FILE.vqfs",
        help="--encode: write every photo into this one container (no header per face); --decode reads it",
    )
    parser.add_argument("--overwrite", action="store_true", help="let --encode/--decode replace existing files")
    parser.add_argument(
        "--preview",
        action="store_true",
        help="--encode: also write <first file>.preview.png, the faces as sent (aligned crops) and as decoded",
    )
    parser.add_argument(
        "--models",
        default=None,
        metavar="DIR",
        help="--encode/--decode: the trained runs of this folder (default: --out's, else the ready-made models)",
    )
    parser.add_argument(
        "--rate-lambda",
        type=float,
        default=None,
        metavar="L",
        help="--encode: bits traded for quality (codec.rate_lambda; 0 = nearest codes, larger = smaller files)",
    )
    parser.add_argument(
        "--retrain", action="store_true", help="train selected runs from scratch, discarding their checkpoints"
    )
    parser.add_argument(
        "--out", default=".", help="folder that receives checkpoints/ and images_saved/ (default: current folder)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set epochs=2 or --set data.image_size=32 (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (overrides seed)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def setup_runtime(verbose: bool) -> None:
    """Logging format, and the TensorFlow environment settings read when it is first imported."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    # TensorFlow's own Python logger reports at INFO what this program reports in one line of its own,
    # e.g. a lost worker's error with tf.distribute's traceback; -v shows it.
    logging.getLogger("tensorflow").setLevel(logging.DEBUG if verbose else logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow leaves its oneDNN kernels off on CPUs other than recent Intel ones;
    # on this project's 2-core AMD machine they train about 1.25x faster (bench/RESULTS.md).
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def flag_overrides(args) -> list[str]:
    """`--data`, `--seed` and `--eval` as the `--set` overrides they stand for."""
    overrides = []
    if args.data:
        overrides.append(f"data.path={json.dumps(args.data)}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.rate_lambda is not None:
        overrides.append(f"codec.rate_lambda={args.rate_lambda}")
    if args.eval or args.sample is not None or args.encode or args.decode:
        overrides.append("enable_training=false")
    return overrides


def run(args) -> int:
    from vqvae_faces import lfw_files
    from vqvae_faces.config import load_config
    from vqvae_faces.errors import ConfigError

    config_path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    config = load_config(config_path, args.overrides + flag_overrides(args), args.runs)
    if args.preview and not args.encode:
        raise ConfigError("--preview shows what --encode sends: pass it with --encode PHOTO.")
    if args.into and not args.encode:
        raise ConfigError(f"--into {args.into} names the container --encode writes; to read one, pass it to --decode.")
    if args.encode or args.decode:
        return run_codec(args, config)
    search_dirs = [SCRIPT_DIR, Path.cwd()]
    run_names = selected_runs(args, config)
    out = Path(args.out)
    if args.sample is not None and sample_from_other_models(args, config, run_names, out):
        return 0
    config = with_recorded_data(config, run_names, out, search_dirs)
    # Path mistakes are reported here, before TensorFlow is loaded.
    lfw_files.resolve_source(config.data.path, search_dirs)
    if args.test_data:
        lfw_files.resolve_source(args.test_data, [])

    from vqvae_faces import prior_evaluation, training
    from vqvae_faces.evaluation import metrics_table

    if config.deterministic:
        training.enable_determinism()
    strategy = (
        training.choose_strategy(config.distribution, config.collective_timeout_seconds)
        if config.enable_training
        else None
    )
    faces, other_faces = load_data(args, config, out, search_dirs)
    results, test_names, test_faces = train_and_evaluate(args, config, run_names, faces, other_faces, out, strategy)
    if results:
        print(metrics_table([r.metrics for r in results.values()]))
        for line in filter(None, (prior_evaluation.describe(r.metrics) for r in results.values())):
            print(line)
    if args.compare and results:
        compare_runs(results, test_names, test_faces.images, test_faces.description, out, config)
    return 0


def sample_from_other_models(args, config, run_names: list[str], out: Path) -> bool:
    """--sample with the prior runs of --models, or of the ready-made models when --out holds none trained:
    samples.png and samples.npz under --out's images_saved/<run>/ (no nearest_training_faces.png, as their
    training faces are not here). False when --out's own runs are the ones to sample."""
    from vqvae_faces import prior_evaluation, ready_made
    from vqvae_faces.model_settings import load_model
    from vqvae_faces.run_folder import RunPaths

    chosen = {}
    for run_name in run_names:
        runs = [run_name, config.runs[run_name].tokens_from]
        folder, _ = ready_made.models_folder(out, runs, args.models)
        if folder == out:
            return False
        chosen[run_name] = folder
    for run_name, folder in chosen.items():
        run = config.runs[run_name]
        prior = load_model(RunPaths.for_run(folder, run_name).trained_model())
        vqvae = load_model(RunPaths.for_run(folder, run.tokens_from).trained_model())
        paths = RunPaths.for_run(out, run_name)
        prior_evaluation.write_samples(run_name, prior, vqvae, args.sample, run.sampling, config.seed, None, paths)
    return True


def with_recorded_data(config, run_names: list[str], out: Path, search_dirs: list[Path]):
    """`config`, its `data.path` taken from the runs' config.json when it evaluates trained runs (no training)
    and names no data, and no LFW folder lies in `search_dirs`: a run's own data need not be given again."""
    from vqvae_faces import lfw_files

    if config.enable_training or config.data.path is not None or lfw_files.resolve_source(None, search_dirs):
        return config
    from vqvae_faces.run_folder import recorded_data_path  # loads Keras: after the cheap checks

    recorded = recorded_data_path(out, run_names)
    if recorded is None:
        return config
    log.info("data.path from the trained run's config.json: %s", recorded)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, path=recorded))


def selected_runs(args, config) -> list[str]:
    """The runs this command works on, in training order: --run's, else --compare's, else every run;
    with --sample only the prior runs among them."""
    from vqvae_faces.errors import ConfigError

    if args.runs:
        run_names = args.runs
    elif args.compare and config.compare:
        run_names = config.compare
    else:
        run_names = list(config.runs)
    run_names = config.training_order(run_names)
    if args.sample is not None:
        run_names = [name for name in run_names if config.runs[name].model == "prior"]
        if args.sample < 1 or not run_names:
            raise ConfigError(
                f"--sample {args.sample}: needs N >= 1 and a prior run among the selected runs "
                f"(prior runs: {sorted(n for n, r in config.runs.items() if r.model == 'prior')})."
            )
    return run_names


def load_data(args, config, out: Path, search_dirs: list[Path]):
    """The faces of `data.path`, and those of --test-data as `TestFaces` (None without it)."""
    from vqvae_faces import lfw_files
    from vqvae_faces.evaluation import TestFaces

    cache = out / "checkpoints" / "data_cache"
    faces = lfw_files.load_faces(config.data, cache, search_dirs)
    if not args.test_data:
        return faces, None
    other = lfw_files.load_faces(dataclasses.replace(config.data, path=args.test_data), cache, search_dirs)
    return faces, TestFaces(other.images, other.names, other.description + " (all images)")


def train_and_evaluate(args, config, run_names, faces, other_faces, out: Path, strategy):
    """Train (when enabled) and evaluate each run in order: (results by run, test face names by run, the
    last run's test faces)."""
    from vqvae_faces import training
    from vqvae_faces.run_folder import RunPaths, check_compatible

    results, test_names, test_faces = {}, {}, None
    # A non-chief worker trains into a scratch folder it keeps for all its runs, so a prior finds the
    # VQ-VAE this command trained before it; the chief (and every other process) gets None.
    with training.worker_scratch(config.enable_training) as scratch:
        for run_name in run_names:
            if not args.retrain:
                check_compatible(RunPaths.for_run(out, run_name), config, run_name)
            if scratch is not None:
                training.train_as_worker(config, run_name, faces, out, scratch, args.retrain, strategy)
                continue
            if config.enable_training:
                training.train_run(config, run_name, faces, out, retrain=args.retrain, strategy=strategy)
            evaluated = evaluate_trained(args, config, run_name, faces, other_faces, out)
            if evaluated is not None:
                results[run_name], test_faces = evaluated
                test_names[run_name] = list(test_faces.names)
    return results, test_names, test_faces


def evaluate_trained(args, config, run_name: str, faces, other_faces, out: Path):
    """Evaluate a trained run on its test faces (`other_faces` when given), or with --sample draw new faces
    from a prior run: (its result, the test faces), or None after --sample."""
    from vqvae_faces import prior_evaluation
    from vqvae_faces.evaluation import evaluate_run, test_set
    from vqvae_faces.inference import load_trained_model
    from vqvae_faces.prior_data import load_prior_source
    from vqvae_faces.run_folder import RunPaths, run_lock

    paths, run = RunPaths.for_run(out, run_name), config.runs[run_name]
    # A shared lock: other evaluations may read the run at once, a trainer may not rewrite it.
    lock = run_lock(paths.checkpoints, exclusive=False) if paths.checkpoints.is_dir() else None
    with lock or contextlib.nullcontext():
        model, _ = load_trained_model(paths, run_name)
        test_faces = other_faces or test_set(paths, faces)
        if run.model != "prior":
            result = evaluate_run(run_name, run, model, paths, test_faces)
        else:
            source = load_prior_source(config, run_name, faces, paths)
            training_faces = faces.subset(source.split["train"])
            if args.sample is not None:
                prior_evaluation.write_samples(
                    run_name, model, source.vqvae, args.sample, run.sampling, config.seed, training_faces, paths
                )
                return None
            result = prior_evaluation.evaluate_prior(
                run_name, run, model, paths, source, test_faces, training_faces, config.seed, other_faces is not None
            )
    log.info("run %s: metrics in %s", run_name, paths.images / "metrics.json")
    return result, test_faces


def run_codec(args, config) -> int:
    """--encode / --decode with the prior run (and its VQ-VAE) trained under --out, --models or ready-made."""
    from vqvae_faces import codec_files, ready_made

    prior_run = codec_files.choose_prior_run(config, args.runs)
    codec_files.check_inputs([Path(p) for p in args.encode or []], config.data.max_file_bytes)
    codec_files.check_inputs([Path(p) for p in args.decode or []])
    to = Path(args.to) if args.to else None
    runs = [prior_run, config.runs[prior_run].tokens_from]
    models, shipped = ready_made.models_folder(Path(args.out), runs, args.models)
    with codec_files.opened_codec(config, prior_run, models, locked=not shipped) as codec:
        if args.encode:
            rate_lambda = config.runs[prior_run].codec.rate_lambda
            photos = [Path(p) for p in args.encode]
            into = Path(args.into) if args.into else None
            codec_files.encode_photos(codec, photos, config, rate_lambda, to, args.overwrite, into, args.preview)
        if args.decode:
            codec_files.decode_files(codec, [Path(p) for p in args.decode], to, args.overwrite)
    return 0


def compare_runs(results, test_names, images, dataset, out: Path, config) -> None:
    """Write images_saved/compare/ for runs evaluated on the same test faces, with the `.vqf` codec's
    real file sizes when a prior run is among them."""
    from vqvae_faces import codec_files, compare
    from vqvae_faces.errors import EvaluationError
    from vqvae_faces.run_folder import RunPaths

    run_names = list(results)
    for name in run_names:
        if test_names[name] != test_names[run_names[0]]:
            raise EvaluationError(
                f"runs {run_names[0]!r} and {name!r} have different test faces (trained with other data or seed); "
                "retrain one of them with --retrain so they share the split."
            )
    run_images = {name: RunPaths.for_run(out, name).images for name in run_names}
    folder = out / "images_saved" / "compare"
    codec_rows = []
    for prior_run in [name for name in run_names if config.runs[name].model == "prior"]:
        with codec_files.opened_codec(config, prior_run, out) as codec:
            lambdas = config.runs[prior_run].codec.compare_lambdas
            names = test_names[run_names[0]]
            codec_rows += compare.vqf_rows(codec, prior_run, images, names, lambdas, folder / "vqf")
    table = compare.write_comparison(folder, images, results, run_images, dataset, codec_rows)
    print()
    print(compare.markdown_table(table))


# Seconds after which a SIGTERM or SIGINT that arrived inside a finalizer is sent again (see `_stop`).
RESIGNAL_SECONDS = 0.1


def _stop(signum, frame):
    """SIGINT (Ctrl-C): KeyboardInterrupt; SIGTERM: `Terminated`. Python prints and drops an exception
    raised inside a `__del__` (TensorFlow's finalizers run often during training), so a signal that lands
    there is sent again a moment later instead of being lost."""
    if frame is not None and frame.f_code.co_name == "__del__":
        threading.Timer(RESIGNAL_SECONDS, os.kill, (os.getpid(), signum)).start()
        return
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_runtime(args.verbose)
    # Ctrl-C keeps an ignored disposition (a job started in the background must not stop on it).
    stopping = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else [])
    previous_handlers = {signum: signal.signal(signum, _stop) for signum in stopping}
    try:
        return run(args)
    # Errors are logged as text: a log record holding the exception would keep its traceback's frames (models,
    # datasets, compiled functions) alive for as long as a handler keeps the record.
    except WorkerLost as error:
        # TensorFlow's collective runtime is aborted: leaving through the interpreter's normal exit
        # can block or print errors from its threads, so the process ends here.
        log.error("%s", str(error))
        logging.shutdown()
        os._exit(2)
    except UserFacingError as error:
        log.error("%s", str(error))
        return 2
    except OSError as error:  # an unexpected place could not read or write a file: say which and why
        where = f" {error.filename}" if error.filename else ""
        log.error("cannot access%s: %s", where, error.strerror or str(error))
        return 2
    except KeyboardInterrupt:
        log.error("interrupted: the last completed epoch is saved; run the same command again to resume.")
        return 130
    except Terminated:
        log.error("terminated (SIGTERM): the last completed epoch is saved; run the same command again to resume.")
        return 143
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
