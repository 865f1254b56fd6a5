"""A coarse-to-fine token grid (VQ-VAE-2), screened against the one-grid recipe at equal epochs (bench only).

The default sends one 16x16 grid of tokens and its prior reads them in raster order, so a
token's context is the rows above it and the row so far. Here a face is two grids, as in
VQ-VAE-2 (Razavi et al. 2019): a top 8x8 grid quantized from the bottom latents, and a
16x16 bottom grid quantized from the bottom latents with the decoded top grid beside
them; the decoder reads both. A file would hold the top grid (coded by a prior over 8x8
grids) and then the bottom grid, coded by a prior that sees the whole top grid at every
position, below and to the right of it too. Whether that context pays for the top grid's
bits is what `main` measures: the test faces' PSNR and the two priors' bits per face,
against the codebook-size curve of `experiments/PRIOR.md` (the same split, 25 + 6 epochs).

Both grids travel as one int grid (B, 16, 16, 2): channel 0 the bottom tokens, channel 1
the top token of each cell's 2x2 block (`pack`), so the priors' data pipeline, which
gathers whole grids, needs no change.

    python experiments/coarse_to_fine.py --data ../shared/data/lfw-deepfunneled-dev.tgz --out /tmp/c2f \\
        --set num_embeddings=256 --top-codes 256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vqvae_class_keras import VQVAE, ResidualBlock, VectorQuantizerEMA  # noqa: E402
from vqvae_faces.compiled import compiled  # noqa: E402
from vqvae_faces.inference import decode, tokenize  # noqa: E402
from vqvae_faces.token_prior import CausalTransformer, position_uniforms  # noqa: E402

PACKAGE = "vqvae_faces_bench"


def pack(top, bottom):
    """(B, h/2, w/2) top and (B, h, w) bottom tokens -> (B, h, w, 2) int32: bottom, and each cell's top token."""
    top = ops.repeat(ops.repeat(ops.cast(top, "int32"), 2, axis=1), 2, axis=2)
    return ops.stack([ops.cast(bottom, "int32"), top], axis=-1)


def unpack(grids):
    """The inverse of `pack`: (B, h, w, 2) -> top (B, h/2, w/2), bottom (B, h, w)."""
    return grids[:, ::2, ::2, 1], grids[..., 0]


@keras.saving.register_keras_serializable(package=PACKAGE)
class TwoLevelVQVAE(VQVAE):
    """`VQVAE` with a second, coarser grid: top tokens quantized from the bottom latents at half the resolution.

    z_b = encoder(x) (B, h, w, D); z_t = top_encoder(z_b) (B, h/2, w/2, D), quantized by
    `top_quantizer` to q_t; u = top_decoder(q_t) (B, h, w, D); the bottom quantizer takes
    bottom_mix([z_b, u]) to q_b; the decoder reads [q_b, u]. The loss is the reconstruction
    loss plus both commitment losses; both codebooks are EMA codebooks (the annealing and
    revival callbacks are per quantizer). Metrics report the bottom quantizer, and the top
    one's perplexity.

    Args:
        top_num_embeddings: codes of the top codebook.
        top_channels: width of the top encoder and decoder.
        **kwargs: as `VQVAE` (its quantizer is the bottom one).

    Input shape: (B, H, W, C). Tokens: (B, h, w, 2), see `pack`.
    """

    metric_names = VQVAE.metric_names + ("top_perplexity",)

    def __init__(self, top_num_embeddings=256, top_channels=128, **kwargs):
        super().__init__(**kwargs)
        self.model_config = {
            **self.model_config,
            "top_num_embeddings": top_num_embeddings,
            "top_channels": top_channels,
        }
        config, trunk = self.model_config, self.trunk_config
        dim, activation = config["embedding_dim"], trunk["activation"]
        hidden = trunk["residual_hidden_channels"]
        self.top_encoder = keras.Sequential(
            [
                layers.Conv2D(top_channels, 4, strides=2, padding="same", activation=activation),
                ResidualBlock(top_channels, hidden, activation),
                layers.Activation(activation),
                layers.Conv2D(dim, 1),
            ],
            name="top_encoder",
        )
        self.top_decoder = keras.Sequential(
            [
                layers.Conv2D(top_channels, 3, padding="same"),
                ResidualBlock(top_channels, hidden, activation),
                layers.Activation(activation),
                layers.Conv2DTranspose(dim, 4, strides=2, padding="same"),
            ],
            name="top_decoder",
        )
        self.bottom_mix = layers.Conv2D(dim, 1, name="bottom_mix")
        seed = trunk["seed"]
        self.top_quantizer = VectorQuantizerEMA(
            top_num_embeddings,
            dim,
            config["commitment_cost"],
            config["decay"],
            config["epsilon"],
            config["codebook_init"],
            config["l2_normalize"],
            seed=None if seed is None else seed + 1,
            name="top_quantizer",
        )

    def _levels(self, images, training=False):
        """The quantizers' outputs and the top grid's decoded features u."""
        bottom_latents = self.encoder(images, training=training)
        top = self.top_quantizer(self.top_encoder(bottom_latents, training=training), training=training)
        features = self.top_decoder(top["quantized"], training=training)
        mixed = self.bottom_mix(ops.concatenate([bottom_latents, features], axis=-1))
        return top, self.quantizer(mixed, training=training), features

    def call(self, images, training=False):
        _, bottom, features = self._levels(images, training)
        return self.decoder(ops.concatenate([bottom["quantized"], features], axis=-1))

    def compute_losses(self, images, training):
        top, bottom, features = self._levels(images, training)
        reconstructions = self.decoder(ops.concatenate([bottom["quantized"], features], axis=-1), training=training)
        reconstruction_loss = self.reconstruction_error(images, reconstructions)
        commitment = bottom["commitment_loss"] + top["commitment_loss"]
        return {
            "loss": reconstruction_loss + commitment,
            "reconstruction_loss": reconstruction_loss,
            "commitment_loss": commitment,
            "perplexity": bottom["perplexity"],
            "active_code_fraction": bottom["active_fraction"],
            "top_perplexity": top["perplexity"],
        }

    def encode_to_tokens(self, images):
        """(B, H, W, C) images -> (B, h, w, 2) int32 packed grids of the nearest codes of both levels."""
        top, bottom, _ = self._levels(images)
        return pack(top["indices"], bottom["indices"])

    def decode_tokens(self, tokens):
        """(B, h, w, 2) packed grids -> (B, H, W, C) reconstructions."""
        top, bottom = unpack(ops.cast(tokens, "int32"))
        features = self.top_decoder(self.top_quantizer.lookup(top))
        return self.decoder(ops.concatenate([self.quantizer.lookup(bottom), features], axis=-1))


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConditionedTransformer(CausalTransformer):
    """`CausalTransformer` over the bottom grid, each position also seeing the whole top grid.

    The top tokens are embedded on their own grid, mixed by two 3x3 convolutions (so each
    cell sees its neighbours' top tokens), repeated to the bottom grid's cells and added to
    every position's input. The top grid is known before the bottom one is coded, so this
    keeps position p's logits a function of the bottom tokens before p and of the top grid.

    Args:
        top_num_embeddings: size of the top grid's alphabet.
        **kwargs: as `CausalTransformer` (num_embeddings and grid_size of the bottom grid).

    Input shape: (B, h, w, 2) int packed grids (see `pack`). Output shape: (B, h, w, K) logits.
    """

    def __init__(self, num_embeddings, grid_size, top_num_embeddings=256, **kwargs):
        super().__init__(num_embeddings, grid_size, **kwargs)
        self.top_num_embeddings = top_num_embeddings
        self.top_embed = layers.Embedding(top_num_embeddings, self.width, name="top_embed")
        self.top_mix = [
            layers.Conv2D(self.width, 3, padding="same", activation="gelu", name="top_mix_0"),
            layers.Conv2D(self.width, 3, padding="same", name="top_mix_1"),
        ]

    def _condition(self, top):
        """(B, h/2, w/2) top tokens -> (B, h x w, width), in the bottom grid's raster order."""
        x = self.top_embed(top)
        x = x + self.top_mix[1](self.top_mix[0](x))
        x = ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)
        return ops.reshape(x, (-1, self.grid_size[0] * self.grid_size[1], self.width))

    def call(self, grids, training=None):
        top, bottom = unpack(ops.cast(grids, "int32"))
        rows, columns = self.grid_size
        flat = ops.reshape(bottom, (-1, rows * columns))
        previous = ops.concatenate([-ops.ones_like(flat[:, :1]), flat[:, :-1]], axis=1)
        x = CausalTransformer._inputs(self, previous, ops.arange(rows * columns)) + self._condition(top)
        for block in self.blocks:
            x = block(x, training=training)
        logits = self.head(self.norm(x))
        return ops.reshape(logits, (-1, rows, columns, self.num_embeddings))

    def _inputs(self, previous_tokens, positions):
        """`CausalTransformer`'s inputs plus the condition of the top grids `sample_bottom` draws for; only
        the cached steps of sampling call it (`call` adds the condition itself)."""
        inputs = CausalTransformer._inputs(self, previous_tokens, positions)
        return inputs + ops.take(self._sampling_condition, positions, axis=1)

    def sample_bottom(self, top, seed, temperature=1.0):
        """Bottom grids (B, h, w) int32 drawn for top grids `top` (B, h/2, w/2) with cached keys and values.

        Every call must draw the same number of grids: the condition lives in one variable of that batch's
        shape, which the compiled sampler reads. `seed`: a stateless seed, int tensor (2,).
        """
        condition = self._condition(ops.cast(top, "int32"))
        if getattr(self, "_sampling_condition", None) is None:
            object.__setattr__(self, "_sampling_condition", tf.Variable(condition, trainable=False))
        self._sampling_condition.assign(condition)
        rows, columns = self.grid_size
        count = condition.shape[0]
        uniforms = tf.stack([position_uniforms(seed, position, count) for position in range(rows * columns)])
        sampler = compiled(self, CausalTransformer._sample_by_uniforms, jit_compile=True)
        return tf.reshape(sampler(uniforms, float(temperature), None, None), (count, rows, columns))

    def token_log_probs(self, grids, training=False):
        """log p(b_i | b_<i, top) in nats for every bottom position: (B, h, w, 2) -> (B, h, w)."""
        logits = ops.cast(self(grids, training=training), "float32")
        log_probs = ops.log_softmax(logits, axis=-1)
        targets = ops.cast(grids, "int32")[..., 0]
        return ops.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]

    def build(self, input_shape):
        self.call(ops.zeros((1, *self.grid_size, 2), "int32"))
        self.built = True

    def get_config(self):
        return {**super().get_config(), "top_num_embeddings": self.top_num_embeddings}


def bits_per_face(prior, grids, batch_size=256):
    """-log2 p of each face's grid (N,) under `prior` (its `token_log_probs` summed over positions)."""
    score = tf.function(
        lambda batch: -tf.reduce_sum(prior.token_log_probs(batch), axis=(1, 2)) / math.log(2.0), autograph=False
    )
    dataset = tf.data.Dataset.from_tensor_slices(grids.astype(np.int32)).batch(batch_size)
    return np.concatenate([score(batch).numpy() for batch in dataset])


def sample_figures(
    model, top_prior, bottom_prior, test_images, reconstructions, training, seed, out, count=2000, batch=64
):
    """Draw `count` faces (top grid, then the bottom grid given it, temperature 1, batch i seeded (seed, i + 1)),
    save some in samples.png, and measure them as `--eval` measures a prior's samples: the FID of the samples and of the
    test faces' reconstructions against the test faces, the memorisation check on the first 256 and the speed."""
    from vqvae_faces import fid, prior_metrics
    from vqvae_faces.prior_evaluation import save_sample_grid

    network = fid.feature_network(None)
    if network is None:
        sys.exit("--fid needs the StyleGAN3 Inception: pip install -r requirements-fid.txt")
    name, features = network
    grids, seconds = [], 0.0
    for number in range(math.ceil(count / batch)):
        started = time.perf_counter()
        seed_pair = tf.constant([seed, number + 1], tf.int64)
        top = top_prior.sample_tokens(batch, seed_pair)
        bottom = bottom_prior.sample_bottom(top, tf.random.experimental.stateless_fold_in(seed_pair, 7))
        grids.append(pack(top, bottom).numpy())
        seconds += time.perf_counter() - started
    grids = np.concatenate(grids)[:count]
    samples = np.clip(decode(model, grids, 128), 0.0, 1.0)
    save_sample_grid(samples, out / "samples.png", "top grid, then bottom grid given it")
    real = fid.inception_features(features, test_images.astype(np.float32) / 255.0)
    return {
        "fid_network": name,
        "fid_samples": fid.frechet_distance(real, fid.inception_features(features, samples)),
        "fid_reconstructions": fid.frechet_distance(real, fid.inception_features(features, reconstructions)),
        "sampling_faces_per_second": count / seconds,
        "memorisation": prior_metrics.memorisation_check(samples[:256], reconstructions, training),
    }


def train_vqvae(args, config, faces, split, out: Path):
    """Train the two-level VQ-VAE as the main script trains a VQ-VAE run (its callbacks for both quantizers)."""
    from vqvae_faces import pipeline
    from vqvae_faces.callbacks import CommitmentAnnealing, DeadCodeRevival, TrainingClock
    from vqvae_faces.model_settings import build_model
    from vqvae_faces.training import policy_callbacks

    run = config.runs["vqvae"]
    keras.utils.set_random_seed(config.seed)
    default = build_model(run, faces.channels, None, config.seed)
    model = TwoLevelVQVAE(
        top_num_embeddings=args.top_codes,
        top_channels=args.top_channels,
        **default.trunk_config,
        **default.model_config,
    )
    model.compile(optimizer=keras.optimizers.deserialize(keras.optimizers.serialize(default.optimizer)))
    model.optimizer.global_clipnorm = run.gradient_clipnorm
    model.build((None,) + faces.images.shape[1:])
    clock = TrainingClock(args.epochs)
    callbacks = [clock] + policy_callbacks(model, run, clock, run.learning_rate, config.seed)
    r, a = run.revival, run.annealing
    callbacks.append(
        DeadCodeRevival(
            model.top_quantizer,
            r.threshold,
            r.max_revivals_per_batch,
            r.every_n_batches,
            r.noise,
            r.source,
            config.seed + 1,
        )
    )
    callbacks.append(
        CommitmentAnnealing(model.top_quantizer, a.target_low, a.target_high, a.factor, a.decay, a.min_cost, a.max_cost)
    )
    train_images = faces.subset(split["train"])
    per_epoch = pipeline.steps_per_epoch(len(train_images), run.batch_size, False)
    dataset = pipeline.make_training_dataset(train_images, run.batch_size, config.seed, 0, args.epochs)
    started = time.perf_counter()
    history = model.fit(dataset, epochs=args.epochs, steps_per_epoch=per_epoch, callbacks=callbacks, verbose=2)
    minutes = (time.perf_counter() - started) / 60
    model.save(out / "two_level.keras")
    return model, {
        "vqvae_minutes": minutes,
        "vqvae_history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
    }


def train_prior(prior, run, train_grids, val_grids, epochs, seed, name):
    """Fit `prior` (built, not compiled) with the prior run's recipe; returns its minutes and history."""
    from vqvae_faces import pipeline
    from vqvae_faces.callbacks import TrainingClock
    from vqvae_faces.model_settings import apply_training_policy
    from vqvae_faces.training import policy_callbacks

    optimizer = (
        keras.optimizers.AdamW(run.learning_rate, weight_decay=run.weight_decay)
        if run.weight_decay
        else keras.optimizers.Adam(run.learning_rate)
    )
    prior.compile(optimizer=optimizer)
    apply_training_policy(prior, run, run.learning_rate)
    clock = TrainingClock(epochs)
    callbacks = [clock] + policy_callbacks(prior, run, clock, run.learning_rate, seed)
    train = pipeline.make_token_training_dataset(train_grids, run.batch_size, seed, 0, epochs)
    val = pipeline.make_token_dataset(val_grids, run.batch_size)
    started = time.perf_counter()
    history = prior.fit(
        train,
        validation_data=val,
        epochs=epochs,
        steps_per_epoch=pipeline.steps_per_epoch(len(train_grids), run.batch_size, False),
        callbacks=callbacks,
        verbose=2,
    )
    print(f"{name}: {len(history.history['loss'])} epochs", flush=True)
    return {
        f"{name}_minutes": (time.perf_counter() - started) / 60,
        f"{name}_history": {key: [float(v) for v in values] for key, values in history.history.items()},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="folder for the models, token grids and results.json")
    parser.add_argument("--set", action="append", default=[], help="override of the vqvae run, as --set takes it")
    parser.add_argument("--prior-set", action="append", default=[], help="override of the prior run")
    parser.add_argument("--top-codes", type=int, default=256)
    parser.add_argument("--top-channels", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=25, help="VQ-VAE epochs")
    parser.add_argument("--prior-epochs", type=int, default=6, help="epochs of each prior")
    parser.add_argument("--fid", type=int, default=0, help="samples to draw for the FID (needs requirements-fid.txt)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N faces (a smoke test)")
    args = parser.parse_args()

    from vqvae_faces import lfw_files
    from vqvae_faces.config import load_config
    from vqvae_faces.evaluation import code_statistics, image_quality

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parent.parent
    data = [f'data.path="{args.data}"']
    config = load_config(root / "experiment.json", data + args.set, ["vqvae"])
    prior_run = load_config(root / "experiment.json", data + args.prior_set, ["prior"]).runs["prior"]
    faces = lfw_files.load_faces(config.data, out / "data_cache", [])
    if args.limit:
        keep = slice(0, args.limit)
        faces = dataclasses.replace(
            faces, images=faces.images[keep], names=faces.names[keep], persons=faces.persons[keep]
        )
    split = lfw_files.split_by_person(faces.persons, config.data.val_fraction, config.data.test_fraction, config.seed)
    results = {"arguments": vars(args), "faces": {part: int(len(index)) for part, index in split.items()}}

    if (out / "two_level.keras").is_file():
        model = keras.saving.load_model(out / "two_level.keras", safe_mode=True)
        results.update(json.loads((out / "vqvae.json").read_text()))
    else:
        model, trained = train_vqvae(args, config, faces, split, out)
        (out / "vqvae.json").write_text(json.dumps(trained))
        results.update(trained)

    train = faces.subset(split["train"])
    grids = {
        "train": np.concatenate(
            [tokenize(model, train, 128), tokenize(model, np.ascontiguousarray(train[:, :, ::-1]), 128)]
        ),
        "val": tokenize(model, faces.subset(split["val"]), 128),
        "test": tokenize(model, faces.subset(split["test"]), 128),
    }
    test_images = faces.subset(split["test"])
    reconstructions = np.clip(decode(model, grids["test"], 128), 0.0, 1.0)
    quality = image_quality(test_images.astype(np.float32) / 255.0, reconstructions)
    top_test, bottom_test = (np.asarray(part) for part in unpack(grids["test"]))
    vq = config.runs["vqvae"]
    results.update(
        psnr=float(quality["psnr"].mean()),
        ssim=float(quality["ssim"].mean()),
        top_entropy=code_statistics(np.bincount(top_test.reshape(-1), minlength=args.top_codes))["token_entropy_bits"],
        bottom_entropy=code_statistics(np.bincount(bottom_test.reshape(-1), minlength=vq.num_embeddings))[
            "token_entropy_bits"
        ],
        top_codes_used=int(len(np.unique(top_test))),
        bottom_codes_used=int(len(np.unique(bottom_test))),
    )
    print(json.dumps({k: v for k, v in results.items() if not k.endswith("history")}, indent=1), flush=True)

    width = dict(
        width=prior_run.transformer.width,
        num_heads=prior_run.transformer.num_heads,
        num_layers=prior_run.transformer.num_layers,
        mlp_ratio=prior_run.transformer.mlp_ratio,
    )
    rows, columns = grids["test"].shape[1:3]
    top_grids = {part: np.asarray(unpack(value)[0]) for part, value in grids.items()}
    if (out / "bottom_prior.keras").is_file():
        top_prior = keras.saving.load_model(out / "top_prior.keras", safe_mode=True)
        bottom_prior = keras.saving.load_model(out / "bottom_prior.keras", safe_mode=True)
        results.update(json.loads((out / "priors.json").read_text()))
    else:
        top_prior = CausalTransformer(args.top_codes, (rows // 2, columns // 2), **width)
        top_prior.build(None)
        trained = train_prior(
            top_prior, prior_run, top_grids["train"], top_grids["val"], args.prior_epochs, config.seed, "top_prior"
        )
        bottom_prior = ConditionedTransformer(
            vq.num_embeddings, (rows, columns), top_num_embeddings=args.top_codes, **width
        )
        bottom_prior.build(None)
        trained.update(
            train_prior(
                bottom_prior, prior_run, grids["train"], grids["val"], args.prior_epochs, config.seed, "bottom_prior"
            )
        )
        top_prior.save(out / "top_prior.keras")
        bottom_prior.save(out / "bottom_prior.keras")
        (out / "priors.json").write_text(json.dumps(trained))
        results.update(trained)
    top_bits, bottom_bits = bits_per_face(top_prior, top_grids["test"]), bits_per_face(bottom_prior, grids["test"])
    total = top_bits + bottom_bits
    half_width = 1.96 * total.std(ddof=1) / math.sqrt(len(total))
    results.update(
        top_bits_per_token=float(top_bits.mean() / (rows * columns / 4)),
        bottom_bits_per_token=float(bottom_bits.mean() / (rows * columns)),
        top_bits_per_face=float(top_bits.mean()),
        bottom_bits_per_face=float(bottom_bits.mean()),
        bits_per_face=float(total.mean()),
        bits_per_face_ci95=[float(total.mean() - half_width), float(total.mean() + half_width)],
    )
    if args.fid:
        training = np.clip(decode(model, grids["train"][: len(train)], 128), 0.0, 1.0)
        results.update(
            sample_figures(model, top_prior, bottom_prior, test_images, reconstructions, training, config.seed, out)
        )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if not k.endswith("history")}, indent=1))


if __name__ == "__main__":
    main()
