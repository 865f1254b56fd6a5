"""A residual vector quantizer on a coarser grid, screened against the default (bench only).

The default spends its 2,304 bits as one 9-bit token per cell of a 16x16 grid. A
residual quantizer (Juang and Gray 1982; SoundStream, Zeghidour et al. 2021)
spends the same bits as `stages` 9-bit tokens per cell of an 8x8 grid: stage s
quantizes what the stages before it left over, so a cell can take any of
512**stages code sums, which no single codebook could hold. This module holds
the model; `experiments/screen_variants.py` trains and measures it at equal CPU time.
In the tenth round of `experiments/QUALITY.md` it lost 0.9 dB or more (and broke down
without unit-length latents), so it stays out of the package.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from vqvae_class_keras import VQVAE, VectorQuantizerEMA
from vqvae_faces.callbacks import DeadCodeRevival
from vqvae_faces.model_settings import build_model


@keras.saving.register_keras_serializable(package="vqvae_faces_bench")
class ResidualVQVAE(VQVAE):
    """`VQVAE` whose latent vectors are quantized in `stages` residual steps, one EMA codebook each.

    With r_0 = z (the encoder output of a cell), stage s picks c_s, the code of
    codebook s nearest to r_s, and leaves r_{s+1} = r_s - c_s; the decoder gets
    sum_s c_s, with the gradient passed straight through to z. Each stage's
    codebook is an EMA of the residuals assigned to it, initialised from and
    revived with its own residuals (`quantizers[s].latent_sample`). The
    commitment loss is on the sum: cost_0 x mean((z - sg[sum_s c_s])^2), with
    the first stage's (annealed) cost. Metrics report the first stage.

    Args:
        stages: codebooks per cell; a token grid is (B, h, w, stages),
            stages x log2(num_embeddings) bits per cell.
        normalize_latents: scale each vector to unit length before the first
            stage, so the latents cannot drift in scale (the later stages
            quantize the residuals as they are).
        block: quantize each `block` x `block` group of the encoder's grid as one
            vector of block^2 x embedding_dim values (space-to-depth), so the
            token grid is (B, h / block, w / block, stages).
        **kwargs: as `VQVAE`.
    """

    def __init__(self, stages=4, normalize_latents=False, block=1, **kwargs):
        super().__init__(**kwargs)
        if stages < 1 or block < 1:
            raise ValueError(f"stages and block must be >= 1, received stages={stages}, block={block}")
        self.model_config = {
            **self.model_config,
            "stages": stages,
            "normalize_latents": normalize_latents,
            "block": block,
        }
        self.stages, self.normalize_latents, self.block = stages, normalize_latents, block
        config = self.model_config
        seed = self.trunk_config["seed"]
        self.quantizers = [
            VectorQuantizerEMA(
                config["num_embeddings"],
                config["embedding_dim"] * block * block,
                config["commitment_cost"],
                config["decay"],
                config["epsilon"],
                config["codebook_init"],
                config["l2_normalize"],
                seed=None if seed is None else seed + stage,
                name="quantizer" if stage == 0 else f"quantizer_{stage}",
            )
            for stage in range(stages)
        ]
        self.quantizer = self.quantizers[0]

    def quantize_latents(self, latents, training=False):
        """(B, h, w, D) latents -> (straight-through sum of the codes (B, h, w, D), indices
        (B, h / block, w / block, stages), commitment loss, the first stage's outputs)."""
        latents = self._to_blocks(ops.cast(latents, "float32"))
        if self.normalize_latents:
            latents = ops.normalize(latents, axis=-1, epsilon=1e-12)
        residual, total, outputs = latents, ops.zeros_like(latents), []
        for quantizer in self.quantizers:
            outputs.append(quantizer(residual, training=training))
            codes = ops.stop_gradient(outputs[-1]["quantized"])
            total, residual = total + codes, residual - codes
        commitment = self.quantizer.commitment_cost * ops.mean(ops.square(latents - ops.stop_gradient(total)))
        quantized = self._from_blocks(latents + ops.stop_gradient(total - latents))
        indices = ops.stack([out["indices"] for out in outputs], axis=-1)
        return quantized, indices, commitment, outputs[0]

    def call(self, images, training=False):
        return self.decoder(self.quantize_latents(self.encoder(images), training)[0])

    def compute_losses(self, images, training):
        quantized, _, commitment, first = self.quantize_latents(self.encoder(images, training=training), training)
        reconstructions = self.decoder(quantized, training=training)
        reconstruction_loss = self.reconstruction_error(images, reconstructions)
        return {
            "loss": reconstruction_loss + commitment,
            "reconstruction_loss": reconstruction_loss,
            "commitment_loss": commitment,
            "perplexity": first["perplexity"],
            "active_code_fraction": first["active_fraction"],
        }

    def encode_to_tokens(self, images):
        """(B, H, W, C) images -> (B, h, w, stages) int32 code indices, stage by stage."""
        return self.quantize_latents(self.encoder(images))[1]

    def decode_tokens(self, tokens):
        """(B, h, w, stages) int code indices -> (B, H, W, C) reconstructions."""
        codes = [quantizer.lookup(tokens[..., stage]) for stage, quantizer in enumerate(self.quantizers)]
        return self.decoder(self._from_blocks(ops.sum(ops.stack(codes), axis=0)))

    def _to_blocks(self, grid):
        """(B, h, w, D) -> (B, h / block, w / block, block^2 x D)."""
        return grid if self.block == 1 else tf.nn.space_to_depth(grid, self.block)

    def _from_blocks(self, grid):
        """The inverse of `_to_blocks`."""
        return grid if self.block == 1 else tf.nn.depth_to_space(grid, self.block)


def build_residual_model(run, channels, data_variance, seed, **residual):
    """`model_settings.build_model`'s compiled model for `run`, with a residual quantizer:
    `residual` holds `ResidualVQVAE`'s own arguments (stages, normalize_latents)."""
    default = build_model(run, channels, data_variance, seed)
    model = ResidualVQVAE(**residual, **default.trunk_config, **default.model_config)
    optimizer = keras.optimizers.deserialize(keras.optimizers.serialize(default.optimizer))
    model.compile(optimizer=optimizer, jit_compile=run.jit_compile)
    return model


def later_stage_revivals(model, run, seed):
    """`DeadCodeRevival` for stages 1.. of `model` with the run's revival settings (stage 0's comes from
    `training.policy_callbacks`); each revives from its own stage's residuals."""
    if not isinstance(model, ResidualVQVAE) or not run.revival.enabled:
        return []
    r = run.revival
    return [
        DeadCodeRevival(
            quantizer, r.threshold, r.max_revivals_per_batch, r.every_n_batches, r.noise, r.source, seed + stage
        )
        for stage, quantizer in enumerate(model.quantizers[1:], start=1)
    ]
