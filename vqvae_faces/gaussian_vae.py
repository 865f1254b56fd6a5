"""The Gaussian VAE the VQ-VAE is compared with: the same encoder/decoder trunk, a continuous latent."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from vqvae_class_keras import RandomStream, ReconstructionModel
from vqvae_faces import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class VAE(ReconstructionModel):
    """Gaussian VAE with the same encoder/decoder trunk, for the comparison.

    The encoder predicts a mean and log-variance per latent cell (B, h, w, latent_dim);
    training samples z = mean + exp(logvar / 2) * noise, inference uses the mean.
    Loss = MSE (or MSE / data_variance) + kl_beta * KL / (H * W * C), where KL is
    the KL divergence to N(0, I) in nats per image, so kl_beta weighs nats per
    pixel value against squared error.

    Args:
        latent_dim: latent channels per grid cell.
        kl_beta: weight of the KL term.
        **trunk: the `ReconstructionModel` trunk arguments.

    Input shape: (B, H, W, C) in [0, 1]. Output: reconstructions of the same shape.
    """

    metric_names = ("loss", "reconstruction_loss", "kl_loss", "kl_bits_per_image")

    def __init__(self, latent_dim=16, kl_beta=0.01, **trunk):
        super().__init__(latent_channels=2 * latent_dim, **trunk)
        self.model_config = dict(latent_dim=latent_dim, kl_beta=kl_beta)
        self.latent_dim = latent_dim
        self.kl_beta = kl_beta
        self.noise_seeds = RandomStream(self.trunk_config["seed"], name="noise_seeds")

    def build(self, input_shape):
        self.noise_seeds.build()
        super().build(input_shape)

    def posterior(self, images):
        """Mean and log-variance, each (B, h, w, latent_dim) float32."""
        stats = ops.cast(self.encoder(images), "float32")
        mean, log_variance = ops.split(stats, 2, axis=-1)
        return mean, ops.clip(log_variance, -30.0, 20.0)

    @staticmethod
    def kl_nats(mean, log_variance):
        """KL(N(mean, exp(log_variance)) || N(0, I)) in nats, one value per image: (B,)."""
        return 0.5 * ops.sum(ops.square(mean) + ops.exp(log_variance) - 1.0 - log_variance, axis=(1, 2, 3))

    def call(self, images, training=False):
        mean, _ = self.posterior(images)
        return self.decoder(mean)

    def decode_posterior_sample(self, images, seed):
        """Reconstruct from z ~ q(z|x) instead of the mean: (B, H, W, C) -> (B, H, W, C).

        A code of about KL bits can carry a posterior sample (relative-entropy
        coding), not the exact mean, so this is the VAE's honest point at its KL
        rate. `seed` is a stateless seed, int tensor (2,).
        """
        return self.decoder(self.sample_latents(*self.posterior(images), seed))

    @staticmethod
    def sample_latents(mean, log_variance, seed):
        """z = mean + exp(log_variance / 2) * noise, noise ~ N(0, I) drawn from the stateless `seed` (2,)."""
        noise = tf.random.stateless_normal(ops.shape(mean), seed=seed)
        return mean + ops.exp(0.5 * log_variance) * noise

    def compute_losses(self, images, training):
        mean, log_variance = self.posterior(images)
        latents = mean
        if training:
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            seed = tf.random.experimental.stateless_fold_in(self.noise_seeds.next(), replica)
            latents = self.sample_latents(mean, log_variance, seed)
        reconstructions = self.decoder(latents, training=training)
        reconstruction_loss = self.reconstruction_error(images, reconstructions)
        kl_per_image = self.kl_nats(mean, log_variance)
        values_per_image = float(np.prod(images.shape[1:]))
        kl_loss = ops.mean(kl_per_image) / values_per_image
        return {
            "loss": reconstruction_loss + self.kl_beta * kl_loss,
            "reconstruction_loss": reconstruction_loss,
            "kl_loss": kl_loss,
            "kl_bits_per_image": ops.mean(kl_per_image) / np.log(2.0),
        }
