"""Screen model variants at equal CPU training time, without the timing noise.

An 8-minute run of a variant does about `rate x 480 / batch` optimizer steps,
where `rate` is its training images/s on this CPU. Timed runs compare variants
through whatever else the machine was doing; this script instead trains each
variant for exactly its CPU-equivalent number of steps (the default's measured
rate in a real run times the variant's train-step speed ratio), with the same
callbacks as a real run and the learning-rate decay spread over those steps, and
measures it on the same identity-disjoint test faces as `vqvae_face_main.py`.
Each variant's JSON keeps its training loss per epoch, and the table its
`loss_rise`: the largest ratio of an epoch's loss to the lowest so far, about 1
for a run that never broke down (the complete collapse in `experiments/QUALITY.md` rose 27x).
Two single-threaded variants side by side use the two cores better than one
run does, and neither's result depends on the other. Winners are then confirmed
with real time-limited runs (`experiments/QUALITY.md`).

    # 1. each variant's train-step images/s, relative to the default (idle machine)
    python experiments/screen_variants.py rates --out experiments/screen_rates.json
    # 2. train and evaluate every variant for its CPU-equivalent steps
    python experiments/screen_variants.py train --data ../shared/data/lfw-deepfunneled-dev.tgz \\
        --rates experiments/screen_rates.json --cpu-images-per-s 129 --minutes 8 --jobs 2 --threads 1

Variants are overrides of the "vqvae" run of experiment.json, as `--set` takes them; the
"residual VQ" ones also swap in the residual quantizer of `experiments/residual_vq.py`.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from common import ROOT, report  # noqa: E402

EIGHT_BY_EIGHT = ["encoder_filters=[32,128,128]", "decoder_filters=[128,128,32]"]  # 3 down/upsamplings
VARIANTS = {
    "default": [],
    "the 2026-11-25 default (relu, 2e-3, no clipping, mse loss)": [
        "activation=relu",
        "learning_rate=0.002",
        "gradient_clipnorm=null",
        "reconstruction_loss=mse",
        "lr_schedule=cosine",
    ],
    "relu, 2e-3, no clipping (the earlier 2026-11-26 default)": [
        "activation=relu",
        "learning_rate=0.002",
        "gradient_clipnorm=null",
        "lr_schedule=cosine",
    ],
    "relu, 2e-3, clip 0.05": [
        "activation=relu",
        "learning_rate=0.002",
        "gradient_clipnorm=0.05",
        "lr_schedule=cosine",
    ],
    "no clipping": ["gradient_clipnorm=null"],
    "clip 0.05": ["gradient_clipnorm=0.05"],
    "learning rate 4e-3": ["learning_rate=0.004"],
    "learning rate 5e-3": ["learning_rate=0.005"],
    "residual hidden 64": ["residual_hidden_channels=64"],
    "3 residual blocks each side": ["num_residual_blocks=3"],
    "encoder 1 / decoder 3 blocks": ["num_residual_blocks=1", "decoder_residual_blocks=3"],
    "encoder 2 / decoder 4 blocks": ["decoder_residual_blocks=4"],
    "D=8": ["embedding_dim=8"],
    "D=32": ["embedding_dim=32"],
    "encoder [64,128] / decoder [128,64]": ["encoder_filters=[64,128]", "decoder_filters=[128,64]"],
    "decoder [128,64]": ["decoder_filters=[128,64]"],
    "commitment at most 0.1": ["commitment_cost=0.1", "annealing.max_cost=0.1"],
    "EMA decay 0.995": ["decay=0.995"],
    "revival threshold 0.03": ["revival.threshold=0.03"],
    "revival threshold 0.3": ["revival.threshold=0.3"],
    "ssim weight 0.01": ["ssim_weight=0.01"],
    "l1 weight 0.02": ["l1_weight=0.02"],
    "l2-normalized codes": ["l2_normalize=true"],
    "cosine to 2% (the default until 2026-11-27)": ["lr_schedule=cosine"],
    "cosine to 0": ["lr_schedule=cosine", "lr_final_fraction=0"],
    "linear to 0": ["lr_schedule=linear", "lr_final_fraction=0"],
    "linear to 2%": ["lr_schedule=linear"],
    "linear to 5%": ["lr_schedule=linear", "lr_final_fraction=0.05"],
    "clipped linear output": ["output_activation=clip"],
    "residual VQ: 8x8 grid, 4 stages, D=64": EIGHT_BY_EIGHT + ["embedding_dim=64"],
    "residual VQ: 8x8 grid, 4 stages, D=32": EIGHT_BY_EIGHT + ["embedding_dim=32"],
    "residual VQ: 8x8 grid, 4 stages, D=32, unit latents": EIGHT_BY_EIGHT + ["embedding_dim=32"],
    "residual VQ: 2x2 blocks of the 16x16 grid, 4 stages": [],
    "residual VQ: 2x2 blocks of the 16x16 grid, 4 stages, unit latents": [],
}

# Variants with a residual quantizer (experiments/residual_vq.py): name -> its ResidualVQVAE arguments.
# 4 stages of 512 codes on an 8x8 grid (or on 2x2 blocks of the 16x16 grid) are
# 8 x 8 x 4 x 9 = 2,304 bits, the default's budget.
RESIDUAL_VARIANTS = {
    name: dict(stages=4, normalize_latents=name.endswith("unit latents"), block=2 if "2x2 blocks" in name else 1)
    for name in VARIANTS
    if name.startswith("residual VQ")
}


# Settings that leave the train step's arithmetic as it is (up to a few element-wise ops):
# variants that change only these train at the default's rate.
SAME_COST_KEYS = {
    "learning_rate",
    "lr_schedule",
    "lr_final_fraction",
    "gradient_clipnorm",
    "commitment_cost",
    "decay",
    "annealing",
    "revival",
    "reconstruction_loss",
    "l2_normalize",
    "l1_weight",
    "output_activation",
}


def same_cost(name: str) -> bool:
    """Whether variant `name` trains at the default's rate (so it needs no measured one)."""
    keys = {item.split("=")[0].split(".")[0] for item in VARIANTS[name]}
    return name not in RESIDUAL_VARIANTS and keys <= SAME_COST_KEYS


def run_config(overrides: list[str]):
    from vqvae_faces.config import load_config

    return load_config(ROOT / "experiment.json", overrides, ["vqvae"])


def builder(name: str):
    """`model_settings.build_model`, or for a residual-quantizer variant a function with its signature."""
    from vqvae_faces.model_settings import build_model

    if name not in RESIDUAL_VARIANTS:
        return build_model
    from residual_vq import build_residual_model

    return functools.partial(build_residual_model, **RESIDUAL_VARIANTS[name])


def token_statistics(tokens, num_embeddings: int) -> dict:
    """Code usage and perplexity of token grids (N, h, w) or (N, h, w, stages): the worst stage's."""
    import numpy as np

    from vqvae_faces.evaluation import code_statistics

    stages = tokens.reshape(-1, 1) if tokens.ndim == 3 else tokens.reshape(-1, tokens.shape[-1])
    stats = [code_statistics(np.bincount(column, minlength=num_embeddings)) for column in stages.T]
    return {key: min(stat[key] for stat in stats) for key in ("codebook_usage", "perplexity")}


def measure_rates(args) -> None:
    """Train-step images/s of every variant on synthetic faces, interleaved rounds, median."""
    from bench_trunk import compiled_step, images_per_second
    from common import sample_images

    measured = {
        name: overrides
        for name, overrides in VARIANTS.items()
        if name == "default" or (not same_cost(name) and (not args.only or name in args.only))
    }
    steps = {}
    for name, overrides in measured.items():
        run = run_config(overrides).runs["vqvae"]
        step, batch, _ = compiled_step(run, sample_images(run.batch_size, 64), builder(name))
        steps[name] = (step, batch)
    rates = {name: [] for name in measured}
    for _ in range(args.rounds):
        for name, (step, batch) in steps.items():
            rates[name].append(images_per_second(step, batch, args.steps))
    base = statistics.median(rates["default"])
    rows = []
    for name in VARIANTS:
        if name not in rates and not same_cost(name):
            continue
        rate = statistics.median(rates[name]) if name in rates else base
        rows.append({"variant": name, "images_per_s": rate, "ratio_to_default": rate / base, "measured": name in rates})
    report("screen_rates", rows)
    out = Path(args.out)
    ratios = json.loads(out.read_text()) if out.is_file() else {}  # --only adds to the earlier measurements
    ratios.update({row["variant"]: row["ratio_to_default"] for row in rows})
    out.write_text(json.dumps(ratios, indent=2))


def speed_ratio(args) -> float:
    """The variant's training speed over the default's: 1 for same-cost variants, else the measured one."""
    if same_cost(args.variant):
        return 1.0
    rates_file = Path(args.rates)
    ratio = json.loads(rates_file.read_text()).get(args.variant) if rates_file.is_file() else None
    if ratio is None:
        sys.exit(f"no speed ratio for {args.variant!r} in {args.rates}: run `rates --only {args.variant!r}` first")
    return ratio


def train_one(args) -> dict:
    """Train variant `args.variant` for its CPU-equivalent steps; return its test metrics."""
    import keras
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    from residual_vq import later_stage_revivals

    from vqvae_faces import lfw_files, pipeline
    from vqvae_faces.callbacks import TrainingClock
    from vqvae_faces.training import policy_callbacks

    config = run_config(args.base + VARIANTS[args.variant])
    config.data.path = args.data
    run = config.runs["vqvae"]
    ratio = speed_ratio(args)
    steps = int(args.cpu_images_per_s * ratio * args.minutes * 60 / run.batch_size)

    faces = lfw_files.load_faces(config.data, ROOT / "checkpoints" / "data_cache", [])
    split = lfw_files.split_by_person(faces.persons, config.data.val_fraction, config.data.test_fraction, config.seed)
    train_images, test_images = faces.subset(split["train"]), faces.subset(split["test"])
    per_epoch = pipeline.steps_per_epoch(len(train_images), run.batch_size, False)
    epochs = steps / per_epoch

    seed = config.seed if args.training_seed is None else args.training_seed  # the split keeps config.seed
    keras.utils.set_random_seed(seed)
    model = builder(args.variant)(run, faces.channels, None, seed)
    model.build((None,) + faces.images.shape[1:])
    clock = TrainingClock(epochs)
    callbacks = [clock] + policy_callbacks(model, run, clock, run.learning_rate, seed)
    callbacks += later_stage_revivals(model, run, seed)
    done = []

    def stop_at_budget(batch, logs):
        done.append(batch)
        model.stop_training = len(done) >= steps

    callbacks.append(keras.callbacks.LambdaCallback(on_train_batch_end=stop_at_budget))
    dataset = pipeline.make_training_dataset(train_images, run.batch_size, seed, 0, math.ceil(epochs))
    started = time.perf_counter()
    history = model.fit(dataset, epochs=math.ceil(epochs), steps_per_epoch=per_epoch, callbacks=callbacks, verbose=0)
    seconds = time.perf_counter() - started
    losses = [float(value) for value in history.history["loss"]]

    return {
        "variant": args.variant,
        "base": " ".join(args.base),
        "training_seed": seed,
        "cpu_ratio": ratio,
        "steps": len(done),
        "epochs": epochs,
        **test_figures(model, test_images, run.num_embeddings),
        "device_seconds": seconds,
        "loss_rise": max(loss / lowest for loss, lowest in zip(losses, itertools.accumulate(losses, min))),
        "loss_per_epoch": losses,
    }


def test_figures(model, test_images, num_embeddings: int) -> dict:
    """PSNR, SSIM and the codebook's use on the test faces, from the nearest codes."""
    import numpy as np

    from vqvae_faces.evaluation import image_quality
    from vqvae_faces.inference import decode, tokenize

    tokens = tokenize(model, test_images, 128)
    quality = image_quality(test_images.astype(np.float32) / 255.0, decode(model, tokens, 128))
    stats = token_statistics(tokens, num_embeddings)
    return {
        "psnr": float(quality["psnr"].mean()),
        "ssim": float(quality["ssim"].mean()),
        "codebook_usage": stats["codebook_usage"],
        "perplexity": stats["perplexity"],
    }


def train_all(args) -> None:
    """Run every variant (or `--only`) in `--jobs` parallel processes; print the table."""
    names = args.only or list(VARIANTS)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    pending, running, rows = list(names), {}, []
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            out = results_dir / f"{name.replace(' ', '_').replace('/', '-')}.json"
            command = [sys.executable, __file__, "one", "--variant", name, "--result", str(out)]
            command += ["--data", args.data, "--rates", args.rates, "--minutes", str(args.minutes)]
            command += ["--cpu-images-per-s", str(args.cpu_images_per_s), "--threads", str(args.threads)]
            command += [item for setting in args.base for item in ("--base", setting)]
            if args.training_seed is not None:
                command += ["--training-seed", str(args.training_seed)]
            log = open(out.with_suffix(".log"), "w")
            running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), out)
        time.sleep(2)
        for name, (process, out) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                if process.returncode == 0:
                    result = json.loads(out.read_text())
                    rows.append({key: value for key, value in result.items() if key != "loss_per_epoch"})
                else:
                    print(f"variant {name!r} failed (exit {process.returncode}); see {out.with_suffix('.log')}")
    rows.sort(key=lambda row: names.index(row["variant"]))
    settings = {"minutes": args.minutes, "cpu_images_per_s": args.cpu_images_per_s, "base": " ".join(args.base)}
    report("screen_variants", rows, settings)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rates = commands.add_parser("rates", help="measure each variant's CPU train-step rate")
    rates.add_argument("--out", default=str(Path(__file__).parent / "screen_rates.json"))
    rates.add_argument("--steps", type=int, default=20)
    rates.add_argument("--rounds", type=int, default=7)
    rates.add_argument("--only", nargs="+", choices=list(VARIANTS), help="measure only these (and the default)")
    for name in ("train", "one"):
        sub = commands.add_parser(name)
        sub.add_argument("--data", required=True)
        sub.add_argument("--rates", default=str(Path(__file__).parent / "screen_rates.json"))
        sub.add_argument("--cpu-images-per-s", type=float, required=True, help="the default's rate in a real CPU run")
        sub.add_argument("--minutes", type=float, default=8.0)
        sub.add_argument("--threads", type=int, default=0, help="TensorFlow threads per variant (0: its default)")
        sub.add_argument("--training-seed", type=int, help="seed of the model and batches (default: config seed)")
        sub.add_argument(
            "--base", action="append", default=[], metavar="KEY=VALUE", help="an override under every variant"
        )
    commands.choices["train"].add_argument("--jobs", type=int, default=4)
    commands.choices["train"].add_argument("--only", nargs="+", choices=list(VARIANTS))
    commands.choices["train"].add_argument("--results", default=str(ROOT / "checkpoints" / "screen"))
    commands.choices["one"].add_argument("--variant", required=True, choices=list(VARIANTS))
    commands.choices["one"].add_argument("--result", required=True)
    args = parser.parse_args()
    if args.command == "rates":
        measure_rates(args)
    elif args.command == "train":
        train_all(args)
    else:
        Path(args.result).write_text(json.dumps(train_one(args)))


if __name__ == "__main__":
    main()
