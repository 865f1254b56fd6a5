"""The VQ-VAE for faces: encoder, decoder, EMA vector quantizer, and the model that trains them.

`ReconstructionModel` is the trunk and training loop the VQ-VAE shares with the Gaussian VAE it is
compared with (`vqvae_faces.gaussian_vae`); the token search is `vqvae_faces.token_search`. All classes
are registered as Keras serializable (package "vqvae_faces"), so a `.keras` file saved by `model.save()`
reloads with `keras.saving.load_model(..., safe_mode=True)` once this module is imported.

Shapes use B = batch, H x W = image size, h x w = token grid
(H / 2**len(encoder_filters)), C = image channels (1 or 3), D = embedding_dim,
K = num_embeddings.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from vqvae_faces import PACKAGE
from vqvae_faces.replicas import all_reduce_sum, broadcast_from_first_replica, replica_loss, step_logs

OUTPUT_ACTIVATIONS = ("sigmoid", "clip")


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResidualBlock(layers.Layer):
    """act -> 3x3 conv -> act -> 1x1 conv, added to the input (van den Oord et al. 2017, who use ReLU).

    Input/Output shape: (B, h, w, channels).
    """

    def __init__(self, channels, hidden_channels=None, activation="silu", **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.hidden_channels = hidden_channels or channels
        self.activation = activation
        self.act = keras.activations.get(activation)
        self.conv_3x3 = layers.Conv2D(self.hidden_channels, 3, padding="same")
        self.conv_1x1 = layers.Conv2D(channels, 1)

    def build(self, input_shape):
        if input_shape[-1] != self.channels:
            raise ValueError(
                f"ResidualBlock expects {self.channels} input channels, received input_shape={input_shape}"
            )
        self.conv_3x3.build(input_shape)
        self.conv_1x1.build(tuple(input_shape[:-1]) + (self.hidden_channels,))

    def call(self, x):
        h = self.conv_3x3(self.act(x))
        return x + self.conv_1x1(self.act(h))

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "hidden_channels": self.hidden_channels,
            "activation": self.activation,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class Encoder(layers.Layer):
    """Images to a latent grid: one stride-2 4x4 conv per entry of `filters`, residual blocks, 1x1 projection.

    Input shape: (B, H, W, C). Output shape: (B, H / 2**len(filters), W / 2**len(filters), output_channels).
    """

    def __init__(
        self,
        filters=(32, 128),
        num_residual_blocks=2,
        output_channels=16,
        residual_hidden_channels=32,
        activation="silu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = list(filters)
        self.num_residual_blocks = num_residual_blocks
        self.output_channels = output_channels
        self.residual_hidden_channels = residual_hidden_channels
        self.activation = activation
        self.act = keras.activations.get(activation)
        self.downsamplers = [
            layers.Conv2D(f, 4, strides=2, padding="same", activation=activation) for f in self.filters
        ]
        self.blocks = [
            ResidualBlock(self.filters[-1], residual_hidden_channels, activation) for _ in range(num_residual_blocks)
        ]
        self.project = layers.Conv2D(output_channels, 1)

    def build(self, input_shape):
        """Each layer's weights from the shape it receives (no traced call)."""
        shape = tuple(input_shape)
        for layer in self.downsamplers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        for block in self.blocks:
            block.build(shape)
        self.project.build(shape)

    def call(self, images):
        x = images
        for layer in self.downsamplers:
            x = layer(x)
        for block in self.blocks:
            x = block(x)
        return self.project(self.act(x))

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "num_residual_blocks": self.num_residual_blocks,
            "output_channels": self.output_channels,
            "residual_hidden_channels": self.residual_hidden_channels,
            "activation": self.activation,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class Decoder(layers.Layer):
    """Latent grid to images in [0, 1]: 3x3 conv to filters[0], residual blocks, then one
    stride-2 4x4 transposed conv per entry of `filters`: to filters[1], filters[2], ...,
    and the last one straight to the image channels (as in van den Oord et al. 2017).

    The output layer always computes in float32 (also under mixed precision). Its
    `output_activation` is "sigmoid", or "clip": a linear output clipped to [0, 1]
    with a straight-through gradient, so pixels near 0 or 1 (dark hair, highlights)
    keep the full gradient a sigmoid would shrink by sigma * (1 - sigma).
    Input shape: (B, h, w, D). Output shape: (B, h * 2**len(filters), w * 2**len(filters), image_channels).
    """

    def __init__(
        self,
        filters=(128, 32),
        num_residual_blocks=2,
        image_channels=3,
        residual_hidden_channels=32,
        activation="silu",
        output_activation="sigmoid",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output_activation must be one of {OUTPUT_ACTIVATIONS}, "
                f"received output_activation={output_activation!r}"
            )
        self.filters = list(filters)
        self.num_residual_blocks = num_residual_blocks
        self.image_channels = image_channels
        self.output_activation = output_activation
        self.residual_hidden_channels = residual_hidden_channels
        self.activation = activation
        self.act = keras.activations.get(activation)
        self.mix = layers.Conv2D(self.filters[0], 3, padding="same")
        self.blocks = [
            ResidualBlock(self.filters[0], residual_hidden_channels, activation) for _ in range(num_residual_blocks)
        ]
        self.upsamplers = [
            layers.Conv2DTranspose(f, 4, strides=2, padding="same", activation=activation) for f in self.filters[1:]
        ]
        self.to_image = layers.Conv2DTranspose(
            image_channels,
            4,
            strides=2,
            padding="same",
            activation="sigmoid" if output_activation == "sigmoid" else None,
            dtype="float32",
        )

    def build(self, input_shape):
        """Each layer's weights from the shape it receives (no traced call)."""
        self.mix.build(input_shape)
        shape = self.mix.compute_output_shape(input_shape)
        for block in self.blocks:
            block.build(shape)
        for layer in self.upsamplers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.to_image.build(shape)

    def features(self, latents):
        """What the output layer reads: (B, h, w, D) -> (B, H / 2, W / 2, filters[-1])."""
        x = self.mix(latents)
        for block in self.blocks:
            x = block(x)
        x = self.act(x)
        for layer in self.upsamplers:
            x = layer(x)
        return x

    def call(self, latents):
        images = self.to_image(self.features(latents))
        if self.output_activation == "clip":
            images = images + ops.stop_gradient(ops.clip(images, 0.0, 1.0) - images)
        return images

    def get_config(self):
        return {
            **super().get_config(),
            "filters": self.filters,
            "num_residual_blocks": self.num_residual_blocks,
            "image_channels": self.image_channels,
            "residual_hidden_channels": self.residual_hidden_channels,
            "activation": self.activation,
            "output_activation": self.output_activation,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class RandomStream(layers.Layer):
    """Seeds for stateless random ops, from a position that is saved with the model.

    Keras does not store a `SeedGenerator`'s state in `.keras` files, so a resumed
    run would replay its random draws from the start. This layer keeps
    (seed, draws so far) in a non-trainable int64 weight of shape (2,), which
    checkpoints save and restore like any other weight.

    Args:
        seed: int, or None for a random one.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed

    def build(self, input_shape=None):
        start = [self.seed if self.seed is not None else int(np.random.randint(2**31)), 0]
        self.position = self.add_weight(
            name="position",
            shape=(2,),
            dtype="int64",
            initializer=lambda shape, dtype: ops.convert_to_tensor(start, dtype),
            trainable=False,
            aggregation="only_first_replica",
        )

    def next(self):
        """The current seed, an int64 tensor (2,); advances the stream by one draw."""
        current = ops.convert_to_tensor(self.position)
        self.position.assign(current + ops.convert_to_tensor([0, 1], "int64"))
        return current

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class VectorQuantizerEMA(layers.Layer):
    """Vector quantizer whose codebook is an exponential moving average of its assigned inputs.

    Follows van den Oord et al. 2017 (appendix A.1) and Sonnet's `VectorQuantizerEMA`:
    each input vector z is replaced by its nearest code e_k (squared Euclidean
    distance), gradients pass straight through (z + sg[e - z]), and the loss is
    only the commitment term `commitment_cost * mean((z - sg[e])^2)`: the
    codebook is moved by the EMA update, not by gradients. In training:

        N_i <- decay * N_i + (1 - decay) * n_i              (n_i: inputs assigned to i)
        m_i <- decay * m_i + (1 - decay) * sum of those inputs
        N_i' = (N_i + epsilon) / (sum(N) + K * epsilon) * sum(N)   (Laplace smoothing)
        e_i  = m_i / N_i'

    Under tf.distribute the per-replica n_i and sums are all-reduced first, and
    random samples of the inputs (data initialisation, `latent_sample`) are
    taken from replica 0, so every replica applies the same update. All
    arithmetic is float32.

    Args:
        num_embeddings: K, codebook size.
        embedding_dim: D, size of each code; must match the last input axis.
        commitment_cost: initial weight of the commitment loss. Stored in a
            non-trainable weight so `CommitmentAnnealing` can change it and
            checkpoints keep the annealed value.
        decay: EMA decay in [0, 1).
        epsilon: Laplace smoothing constant.
        codebook_init: "data" sets the codebook (and its EMA state) from random
            encoder outputs of the first training batch, so no code starts far
            from the data; "uniform" keeps the random-uniform initialisation of
            the textbook recipe (prone to codebook collapse).
        l2_normalize: quantize unit vectors (Yu et al. 2022, "ViT-VQGAN"): inputs
            are scaled to norm 1 before the lookup and every code is kept at norm
            1, so the nearest code is the one of highest cosine similarity and
            code lengths cannot drift apart.
        rate_lambda: entropy-constrained assignment (Chou, Lookabaugh and Gray
            1989) in training and encoding alike: each vector takes the code k
            minimising |z - e_k|^2 + rate_lambda * u * l_k, with l_k = -log2 of
            the code's share of the EMA counts (its length under the codebook's
            own usage) and u the EMA of the mean squared distance to the nearest
            code, so rate_lambda is in bits per unit of the usual quantization
            error (the codec's unit). u does not depend on which codes the rate
            term picks: a unit that grew with the error of the picked codes would
            let popular codes feed their own popularity. 0: the nearest code.

    Input shape: (..., D) float. Call returns a dict:
        quantized (..., D): straight-through quantized vectors;
        indices (...): int32 code of each vector;
        commitment_loss (): scalar;
        perplexity (): exp(entropy) of the batch's code histogram;
        active_fraction (): fraction of the K codes used in this batch.

    Non-trainable weights: embeddings (K, D), ema_cluster_size (K,),
    ema_embedding_sum (K, D), commitment_cost (), initialized (),
    latent_sample (K, D) (a random sample of the last training batch's inputs,
    where `revive_dead_codes` takes new codes from); with rate_lambda > 0 also
    rate_unit () (u above; 0 until the first training batch).
    """

    CHUNK_ROWS = 512

    def __init__(
        self,
        num_embeddings,
        embedding_dim,
        commitment_cost=0.25,
        decay=0.99,
        epsilon=1e-5,
        codebook_init="data",
        l2_normalize=False,
        rate_lambda=0.0,
        seed=None,
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if rate_lambda < 0:
            raise ValueError(f"rate_lambda must be >= 0, received rate_lambda={rate_lambda}")
        if num_embeddings < 2:
            raise ValueError(f"num_embeddings must be >= 2, received num_embeddings={num_embeddings}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), received decay={decay}")
        if codebook_init not in ("data", "uniform"):
            raise ValueError(f"codebook_init must be 'data' or 'uniform', received codebook_init={codebook_init!r}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.initial_commitment_cost = commitment_cost
        self.decay = decay
        self.epsilon = epsilon
        self.codebook_init = codebook_init
        self.l2_normalize = l2_normalize
        self.rate_lambda = rate_lambda
        self.seed = seed
        self.random_stream = RandomStream(seed, name="random_stream")

    def build(self, input_shape):
        if input_shape[-1] != self.embedding_dim:
            raise ValueError(
                f"VectorQuantizerEMA(embedding_dim={self.embedding_dim}) received inputs with "
                f"last axis {input_shape[-1]}: input_shape={input_shape}"
            )
        k, d = self.num_embeddings, self.embedding_dim
        limit = float(np.sqrt(3.0 / d))
        sync = "only_first_replica"

        def state(name, shape, initializer):
            return self.add_weight(
                name=name, shape=shape, initializer=initializer, trainable=False, aggregation=sync, dtype="float32"
            )

        self.embeddings = state("embeddings", (k, d), keras.initializers.RandomUniform(-limit, limit, seed=self.seed))
        self.ema_cluster_size = state("ema_cluster_size", (k,), "ones")
        self.ema_embedding_sum = state("ema_embedding_sum", (k, d), "zeros")
        self.embeddings.assign(self._as_code_space(self.embeddings))
        self.ema_embedding_sum.assign(self.embeddings)
        self.commitment_cost = state("commitment_cost", (), keras.initializers.Constant(self.initial_commitment_cost))
        self.initialized = state("initialized", (), "zeros")
        self.latent_sample = state("latent_sample", (k, d), "zeros")
        if self.rate_lambda > 0:  # only then: checkpoints of nearest-code quantizers keep their weights
            self.rate_unit = state("rate_unit", (), "zeros")
        self.random_stream.build()

    def nearest_codes(self, flat):
        """Index (N,) int32 of the nearest code, by squared Euclidean distance, for flat inputs (N, D)
        (with rate_lambda, plus rate_lambda * rate_unit * code length).

        argmin_k |z - e_k|^2 = argmin_k (|e_k|^2 - 2 z.e_k): one matmul against the
        codebook with the code norms computed once per call. Rows are processed in
        chunks of `CHUNK_ROWS` so each (rows, K) score block stays in the CPU cache;
        on 2 cores this is 3-4x faster than materialising the whole (N, K) matrix
        (see bench/RESULTS.md).
        """
        rows = self.CHUNK_ROWS
        count = ops.shape(flat)[0]
        padded = tf.pad(flat, [[0, (-count) % rows], [0, 0]])
        chunks = ops.reshape(padded, (-1, rows, self.embedding_dim))
        code_norms = ops.sum(ops.square(self.embeddings), axis=1)
        if self.rate_lambda > 0:
            code_norms = code_norms + self.rate_lambda * self.rate_unit * self.code_lengths()
        codebook = ops.convert_to_tensor(self.embeddings)

        def nearest(chunk):
            scores = code_norms[None, :] - 2.0 * ops.matmul(chunk, ops.transpose(codebook))
            return tf.argmin(scores, axis=1, output_type=tf.int32)

        parallel = None if tf.executing_eagerly() else 2
        indices = tf.map_fn(nearest, chunks, fn_output_signature=tf.int32, parallel_iterations=parallel)
        return ops.reshape(indices, (-1,))[:count]

    def code_lengths(self):
        """-log2 of each code's share of the (Laplace-smoothed) EMA counts: (K,) float32 bits."""
        counts = ops.convert_to_tensor(self.ema_cluster_size) + self.epsilon
        return -ops.log(counts / ops.sum(counts)) / np.log(2.0)

    def _as_code_space(self, vectors):
        """float32 (..., D) vectors as the codebook sees them: unit length when l2_normalize."""
        vectors = ops.cast(vectors, "float32")
        return ops.normalize(vectors, axis=-1, epsilon=1e-12) if self.l2_normalize else vectors

    def encode_indices(self, latents):
        """Nearest-code indices: (..., D) float -> (...) int32."""
        latents = self._as_code_space(latents)
        indices = self.nearest_codes(ops.reshape(latents, (-1, self.embedding_dim)))
        return ops.reshape(indices, ops.shape(latents)[:-1])

    def squared_distances(self, latents):
        """|z - e_k|^2 to every code: (..., D) float -> (..., K) float32 (in code space when l2_normalize)."""
        latents = self._as_code_space(latents)
        codes = ops.convert_to_tensor(self.embeddings)
        cross = ops.einsum("...d,kd->...k", latents, codes)
        return ops.sum(ops.square(latents), axis=-1, keepdims=True) - 2.0 * cross + ops.sum(ops.square(codes), axis=1)

    def lookup(self, indices):
        """Codes for indices: (...) int -> (..., D) float32."""
        return ops.take(self.embeddings, ops.cast(indices, "int32"), axis=0)

    def call(self, inputs, training=False):
        inputs = self._as_code_space(inputs)
        flat = ops.reshape(inputs, (-1, self.embedding_dim))
        if training:
            sample = broadcast_from_first_replica(self._sample_rows(flat, self.num_embeddings))
            self._initialize_from_data_once(sample)
        flat_indices = self.nearest_codes(flat)
        quantized = ops.reshape(ops.take(self.embeddings, flat_indices, axis=0), ops.shape(inputs))
        counts = tf.math.unsorted_segment_sum(tf.ones_like(flat_indices, tf.float32), flat_indices, self.num_embeddings)
        if training:
            if self.rate_lambda > 0:
                self._update_rate_unit(flat)
            self._ema_update(flat, flat_indices, counts)
            self.latent_sample.assign(sample)
        commitment_loss = self.commitment_cost * ops.mean(ops.square(inputs - ops.stop_gradient(quantized)))
        perplexity = _perplexity(counts)
        active_fraction = ops.mean(ops.cast(counts > 0, "float32"))
        return {
            "quantized": inputs + ops.stop_gradient(quantized - inputs),
            "indices": ops.reshape(flat_indices, ops.shape(inputs)[:-1]),
            "commitment_loss": commitment_loss,
            "perplexity": perplexity,
            "active_fraction": active_fraction,
        }

    def codebook_evenness(self):
        """Perplexity of the EMA code counts divided by K, a scalar in (0, 1].

        1 when every code is used equally often, 1/K when one code takes every
        input. The counts average over about 1 / (1 - decay) batches, so unlike the
        per-batch `active_fraction` this does not depend on the batch size.
        """
        return _perplexity(ops.convert_to_tensor(self.ema_cluster_size)) / self.num_embeddings

    def _initialize_from_data_once(self, sample):
        """With codebook_init="data": on the first training call, codes := `sample` (K, D) of the inputs.

        The EMA counts restart at 1 (as at construction), so codes the data does
        not use fall below the revival threshold within a few dozen steps. Written
        as a blend with the `initialized` flag rather than a tf.cond, because
        replica-synchronised assignments are not allowed inside control flow.
        """
        if self.codebook_init != "data":
            return
        done = self.initialized
        self.embeddings.assign(done * self.embeddings + (1.0 - done) * sample)
        self.ema_embedding_sum.assign(done * self.ema_embedding_sum + (1.0 - done) * sample)
        self.ema_cluster_size.assign(done * self.ema_cluster_size + (1.0 - done))
        self.initialized.assign(1.0)

    def _sample_rows(self, flat, count):
        """`count` distinct rows of `flat` when it has that many (rows repeat otherwise).

        The permutation is the argsort of uniform draws: `stateless_shuffle` has no
        XLA kernel, and this runs inside the train step, which `jit_compile` compiles.
        """
        rows = ops.shape(flat)[0]
        order = tf.argsort(tf.random.stateless_uniform([rows], seed=self.random_stream.next()))
        return ops.take(flat, ops.take(order, ops.arange(count) % rows), axis=0)

    def _update_rate_unit(self, flat):
        """rate_unit := EMA (`decay`) of the mean squared distance to the nearest codes, over all replicas;
        the first batch sets it."""
        total = all_reduce_sum(ops.sum(ops.min(self.squared_distances(flat), axis=-1)))
        count = all_reduce_sum(ops.cast(ops.shape(flat)[0], "float32"))
        batch_mean = total / count
        started = ops.cast(self.rate_unit > 0, "float32")
        blend = started * self.decay
        self.rate_unit.assign(blend * self.rate_unit + (1.0 - blend) * batch_mean)

    def _ema_update(self, flat, flat_indices, counts):
        dw = tf.math.unsorted_segment_sum(flat, flat_indices, self.num_embeddings)
        counts, dw = all_reduce_sum(counts), all_reduce_sum(dw)
        decay = self.decay
        cluster_size = decay * self.ema_cluster_size + (1.0 - decay) * counts
        embedding_sum = decay * self.ema_embedding_sum + (1.0 - decay) * dw
        total = ops.sum(cluster_size)
        smoothed = (cluster_size + self.epsilon) / (total + self.num_embeddings * self.epsilon) * total
        self.ema_cluster_size.assign(cluster_size)
        self.ema_embedding_sum.assign(embedding_sum)
        self.embeddings.assign(self._as_code_space(embedding_sum / smoothed[:, None]))

    def reset_codes(self, code_indices, vectors):
        """Move codes `code_indices` (n,) to `vectors` (n, D) with fresh, consistent EMA state.

        Each reset code gets the mean EMA cluster size as its count (so it is not
        "dead" again at once) and count * vector as its EMA sum (so the next EMA
        step starts from e_i = vector).
        """
        code_indices = ops.reshape(ops.cast(code_indices, "int32"), (-1, 1))
        vectors = self._as_code_space(vectors)
        count = ops.mean(self.ema_cluster_size)
        counts = ops.full((ops.shape(code_indices)[0],), count)
        self.embeddings.assign(tf.tensor_scatter_nd_update(self.embeddings, code_indices, vectors))
        self.ema_cluster_size.assign(tf.tensor_scatter_nd_update(self.ema_cluster_size, code_indices, counts))
        self.ema_embedding_sum.assign(
            tf.tensor_scatter_nd_update(self.ema_embedding_sum, code_indices, vectors * count)
        )

    def revive_dead_codes(self, threshold, max_revivals, noise, source, seed):
        """Replace dead codes; returns how many were replaced (int32 tensor).

        A code is dead when its EMA cluster size is below `threshold` times the mean
        EMA cluster size (so the rule does not depend on batch size, grid size or K;
        a codebook whose counts are all zero is entirely dead). At most
        `max_revivals` of them, least used first, move to candidate vectors plus
        Gaussian noise (`noise` x the candidates' RMS): rows of the last training
        batch's inputs (`source="encoder"`, from `latent_sample`) or randomly chosen
        live codes (`source="codes"`), with fresh EMA state (`reset_codes`). If every
        code is dead, the whole codebook is reset from the inputs. The random choices
        are a pure function of `seed`, an int64 tensor (2,).
        """
        if source not in ("encoder", "codes"):
            raise ValueError(f"source must be 'encoder' or 'codes', received source={source!r}")
        num_codes = self.num_embeddings
        usage = ops.convert_to_tensor(self.ema_cluster_size)
        dead = usage < tf.maximum(threshold * tf.reduce_mean(usage), 1e-12)
        num_dead = tf.reduce_sum(tf.cast(dead, tf.int32))

        def candidates(count, pool):
            rows = tf.random.stateless_uniform(
                [count], tf.random.experimental.stateless_fold_in(seed, 0), maxval=tf.shape(pool)[0], dtype=tf.int32
            )
            chosen = tf.gather(pool, rows)
            scale = tf.sqrt(tf.reduce_mean(tf.square(chosen)) + 1e-12)
            jitter = tf.random.stateless_normal(tf.shape(chosen), tf.random.experimental.stateless_fold_in(seed, 1))
            return chosen + noise * scale * jitter

        def reset_all():
            self.reset_codes(tf.range(num_codes), candidates(num_codes, self.latent_sample))
            return tf.constant(num_codes, tf.int32)

        def reset_some():
            count = tf.minimum(num_dead, max_revivals)
            least_used = tf.argsort(usage, stable=True)[:count]
            pool = tf.boolean_mask(self.embeddings, tf.logical_not(dead)) if source == "codes" else self.latent_sample
            self.reset_codes(least_used, candidates(count, pool))
            return count

        return tf.cond(
            tf.equal(num_dead, num_codes),
            reset_all,
            lambda: tf.cond(num_dead > 0, reset_some, lambda: tf.constant(0, tf.int32)),
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "commitment_cost": self.initial_commitment_cost,
            "decay": self.decay,
            "epsilon": self.epsilon,
            "codebook_init": self.codebook_init,
            "l2_normalize": self.l2_normalize,
            "rate_lambda": self.rate_lambda,
            "seed": self.seed,
        }


def _perplexity(counts):
    """exp(entropy) of the distribution proportional to non-negative `counts` (K,)."""
    probabilities = counts / ops.sum(counts)
    return ops.exp(-ops.sum(probabilities * ops.log(probabilities + 1e-10)))


class ReconstructionModel(keras.Model):
    """Shared trunk and training loop of the two autoencoders.

    Args:
        latent_channels: encoder outputs per grid cell (set by the subclass).
        image_channels: C, 1 or 3, taken from the data.
        encoder_filters / decoder_filters: one entry per 2x down/upsampling.
        num_residual_blocks: residual blocks at the token-grid resolution, each side.
        residual_hidden_channels: bottleneck width inside each residual block.
        decoder_residual_blocks: residual blocks of the decoder; None: as many
            as the encoder (`num_residual_blocks`).
        activation: nonlinearity of the trunk ("relu", "silu", "gelu", ...).
        output_activation: "sigmoid" or "clip", see `Decoder`.
        reconstruction_loss: "mse", or "psnr": the per-image squared errors
            weighted so the gradient is that of the mean per-image log MSE, the
            quantity mean PSNR measures (see `_reconstruction_error`).
        ssim_weight: weight of (1 - mean SSIM) added to the reconstruction loss.
        l1_weight: weight of the mean absolute error added to the reconstruction loss.
        data_variance: if set, the reconstruction loss is divided by
            data_variance (as in the original recipe); None keeps plain MSE.
        seed: seed of the model's random draws.

    Builds `self.encoder` (with `latent_channels` outputs per grid cell) and
    `self.decoder` from the trunk arguments. Subclasses implement
    `compute_losses(images, training) -> dict` whose "loss" entry is minimised;
    every entry named in `metric_names` is tracked with a `keras.metrics.Mean`
    and reported under that name. `get_config` returns the trunk arguments plus
    the subclass's `model_config`.
    """

    metric_names: tuple[str, ...] = ("loss",)

    def __init__(
        self,
        latent_channels,
        image_channels=3,
        encoder_filters=(32, 128),
        decoder_filters=(128, 32),
        num_residual_blocks=2,
        residual_hidden_channels=32,
        decoder_residual_blocks=None,
        activation="silu",
        output_activation="sigmoid",
        reconstruction_loss="psnr",
        ssim_weight=0.01,
        l1_weight=0.0,
        data_variance=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction_loss must be one of {RECONSTRUCTION_LOSSES}, "
                f"received reconstruction_loss={reconstruction_loss!r}"
            )
        self.trunk_config = dict(
            image_channels=image_channels,
            encoder_filters=list(encoder_filters),
            decoder_filters=list(decoder_filters),
            num_residual_blocks=num_residual_blocks,
            residual_hidden_channels=residual_hidden_channels,
            decoder_residual_blocks=decoder_residual_blocks,
            activation=activation,
            output_activation=output_activation,
            reconstruction_loss=reconstruction_loss,
            ssim_weight=ssim_weight,
            l1_weight=l1_weight,
            data_variance=data_variance,
            seed=seed,
        )
        self.reconstruction_loss = reconstruction_loss
        self.ssim_weight = ssim_weight
        self.l1_weight = l1_weight
        self.data_variance = data_variance
        self.encoder = Encoder(
            encoder_filters, num_residual_blocks, latent_channels, residual_hidden_channels, activation, name="encoder"
        )
        decoder_blocks = num_residual_blocks if decoder_residual_blocks is None else decoder_residual_blocks
        self.decoder = Decoder(
            decoder_filters,
            decoder_blocks,
            image_channels,
            residual_hidden_channels,
            activation,
            output_activation,
            name="decoder",
        )
        self.trackers = {name: keras.metrics.Mean(name=name) for name in self.metric_names}

    def get_config(self):
        return {**super().get_config(), **self.trunk_config, **self.model_config}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def compute_losses(self, images, training):
        raise NotImplementedError

    def reconstruction_error(self, images, reconstructions):
        """This model's reconstruction loss (a scalar), see `_reconstruction_error`."""
        return _reconstruction_error(
            images, reconstructions, self.reconstruction_loss, self.data_variance, self.ssim_weight, self.l1_weight
        )

    def _record(self, values):
        for name, tracker in self.trackers.items():
            tracker.update_state(values[name])
        return step_logs({name: tracker.result() for name, tracker in self.trackers.items()})

    def train_step(self, data):
        with tf.GradientTape() as tape:
            values = self.compute_losses(data, training=True)
            scaled_loss = replica_loss(self.optimizer, values["loss"])
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self._record(values)

    def test_step(self, data):
        return self._record(self.compute_losses(data, training=False))

    def build(self, input_shape):
        """Create every weight by running the layers once on zeros of `input_shape`."""
        self.compute_losses(ops.zeros((1,) + tuple(input_shape[1:])), training=False)
        self.built = True


RECONSTRUCTION_LOSSES = ("mse", "psnr")


def _reconstruction_error(images, reconstructions, kind, data_variance, ssim_weight=0.0, l1_weight=0.0):
    """The reconstruction loss, a scalar, for images and reconstructions (B, H, W, C) in [0, 1].

    "mse": mean squared error. "psnr": sum_i w_i * mse_i / B with constant
    (stop-gradient) weights w_i = mean(mse) / mse_i. Its value equals the MSE,
    and its gradient is mean(mse) times the gradient of mean_i log(mse_i), so
    it maximises the mean per-image PSNR (which weighs every face equally,
    where MSE favours the hard ones) at the same loss scale as MSE, leaving the
    balance with the commitment and KL terms unchanged. A non-zero
    `ssim_weight` adds ssim_weight * (1 - mean SSIM) (`tf.image.ssim`, data range
    1), for structure that squared error weighs little (SSIM is 1 for a perfect match).
    A non-zero `l1_weight` adds l1_weight * mean |images - reconstructions|, whose
    gradient does not fade as an error gets small, unlike the squared error's.
    """
    images, reconstructions = ops.cast(images, "float32"), ops.cast(reconstructions, "float32")
    difference = images - reconstructions
    per_image = ops.mean(ops.square(difference), axis=(1, 2, 3))
    error = ops.mean(per_image)
    if kind == "psnr":
        weights = ops.stop_gradient(error / ops.maximum(per_image, 1e-12))
        error = ops.mean(weights * per_image)
    error = error / data_variance if data_variance else error
    if ssim_weight:
        ssim = tf.image.ssim(images, reconstructions, max_val=1.0)
        error = error + ssim_weight * (1.0 - ops.mean(ssim))
    if l1_weight:
        error = error + l1_weight * ops.mean(ops.abs(difference))
    return error


@keras.saving.register_keras_serializable(package=PACKAGE)
class VQVAE(ReconstructionModel):
    """Encoder -> VectorQuantizerEMA -> Decoder, trained on MSE + commitment loss.

    Args:
        embedding_dim, num_embeddings, commitment_cost, decay, epsilon,
        codebook_init, l2_normalize, rate_lambda: see `VectorQuantizerEMA`.
        **trunk: the `ReconstructionModel` trunk arguments (image_channels,
            encoder_filters, decoder_filters, num_residual_blocks,
            residual_hidden_channels, decoder_residual_blocks, activation, output_activation,
            reconstruction_loss, data_variance, seed).

    Input shape: (B, H, W, C) in [0, 1]. Output: reconstructions of the same shape.
    Tokens: `encode_to_tokens` gives (B, h, w) int32 (the nearest codes; with rate_lambda, the
    entropy-constrained ones the decoder was trained on), and `decode_tokens`
    inverts them (and the tokens `token_search.search_tokens` picks).
    """

    metric_names = ("loss", "reconstruction_loss", "commitment_loss", "perplexity", "active_code_fraction")

    def __init__(
        self,
        embedding_dim=16,
        num_embeddings=512,
        commitment_cost=0.25,
        decay=0.99,
        epsilon=1e-5,
        codebook_init="data",
        l2_normalize=False,
        rate_lambda=0.0,
        **trunk,
    ):
        super().__init__(latent_channels=embedding_dim, **trunk)
        self.model_config = dict(
            embedding_dim=embedding_dim,
            num_embeddings=num_embeddings,
            commitment_cost=commitment_cost,
            decay=decay,
            epsilon=epsilon,
            codebook_init=codebook_init,
            l2_normalize=l2_normalize,
            rate_lambda=rate_lambda,
        )
        self.quantizer = VectorQuantizerEMA(
            num_embeddings,
            embedding_dim,
            commitment_cost,
            decay,
            epsilon,
            codebook_init,
            l2_normalize,
            rate_lambda,
            seed=self.trunk_config["seed"],
            name="quantizer",
        )

    def call(self, images, training=False):
        quantized = self.quantizer(self.encoder(images), training=training)["quantized"]
        return self.decoder(quantized)

    def compute_losses(self, images, training):
        vq = self.quantizer(self.encoder(images, training=training), training=training)
        reconstructions = self.decoder(vq["quantized"], training=training)
        reconstruction_loss = self.reconstruction_error(images, reconstructions)
        return {
            "loss": reconstruction_loss + vq["commitment_loss"],
            "reconstruction_loss": reconstruction_loss,
            "commitment_loss": vq["commitment_loss"],
            "perplexity": vq["perplexity"],
            "active_code_fraction": vq["active_fraction"],
        }

    def encode_to_tokens(self, images):
        """(B, H, W, C) images -> (B, h, w) int32 code indices (the quantizer's assignment)."""
        return self.quantizer.encode_indices(self.encoder(images))

    def decode_tokens(self, tokens):
        """(B, h, w) int code indices -> (B, H, W, C) reconstructions."""
        return self.decoder(self.quantizer.lookup(tokens))
