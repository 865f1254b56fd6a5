"""Autoregressive priors over a VQ-VAE's token grids: p(t_1, ..., t_n) in raster order.

Two architectures, both causal by construction and Keras-serializable:

  * `GatedPixelCNN` (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
    Decoders"): a vertical stack that sees only the rows above and a horizontal stack that
    sees the row so far, so there is no blind spot. Sampling runs one full pass per token.
  * `CausalTransformer`: pre-norm transformer blocks over the raster sequence with learned
    row and column embeddings. Sampling keeps each layer's keys and values, so a token
    costs one step, not a full pass.

Both take int token grids (B, h, w) and return logits (B, h, w, K) where position i's
logits depend only on the tokens before i. `log_likelihood` gives exact per-grid log
probabilities, `sample_tokens` draws grids with temperature, top-k and top-p, seeded.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from vqvae_faces import PACKAGE
from vqvae_faces.compiled import compiled
from vqvae_faces.replicas import replica_loss, step_logs

# Positions per chunk of cached keys and values: a cached step reads the chunks up to its own
# and writes only its own (bench/RESULTS.md: sampling 1.9x and the codec 1.6x faster with 64
# than with one 256-position cache; 32 no faster, with twice the XLA programs to compile).
CACHE_CHUNK = 64


class TokenPrior(keras.Model):
    """What both priors share: the loss (mean negative log-likelihood in nats per token),
    exact log-likelihoods and seeded sampling.

    Subclasses implement `call(tokens) -> logits (B, h, w, K)` and, when they have a
    faster path, `sample_tokens`.

    Args:
        num_embeddings: K, the size of the token alphabet.
        grid_size: (h, w) of the token grids.
    """

    def __init__(self, num_embeddings, grid_size, **kwargs):
        super().__init__(**kwargs)
        if num_embeddings < 2:
            raise ValueError(f"num_embeddings must be >= 2, received num_embeddings={num_embeddings}")
        grid_size = tuple(int(v) for v in grid_size)
        if len(grid_size) != 2 or min(grid_size) < 1:
            raise ValueError(f"grid_size must be (rows, columns) >= 1, received grid_size={grid_size}")
        self.num_embeddings = num_embeddings
        self.grid_size = grid_size
        self.nll_tracker = keras.metrics.Mean(name="loss")
        self.bits_tracker = keras.metrics.Mean(name="bits_per_token")

    @property
    def metrics(self):
        return [self.nll_tracker, self.bits_tracker]

    def code_lengths(self, tokens):
        """-log2 p(k | t_<i) in bits for every token k at every position, given the tokens before
        it in `tokens`: (B, h, w) int -> (B, h, w, K) float32."""
        logits = ops.cast(self(tokens), "float32")
        return ops.log_softmax(logits, axis=-1) * (-1.0 / math.log(2.0))

    def token_log_probs(self, tokens, training=False):
        """log p(t_i | t_<i) in nats for every position: (B, h, w) int -> (B, h, w) float32 (`training`: with
        the dropout of training)."""
        logits = ops.cast(self(tokens, training=training), "float32")
        log_probs = ops.log_softmax(logits, axis=-1)
        return ops.take_along_axis(log_probs, ops.cast(tokens, "int32")[..., None], axis=-1)[..., 0]

    def log_likelihood(self, tokens):
        """log p(grid) in nats, exact: (B, h, w) int -> (B,)."""
        return ops.sum(self.token_log_probs(tokens), axis=(1, 2))

    def _nll(self, tokens, training=False):
        return -ops.mean(self.token_log_probs(tokens, training))

    def train_step(self, data):
        tokens, _, _ = keras.utils.unpack_x_y_sample_weight(data)  # fit() gives grids, train_on_batch (grids,)
        with tf.GradientTape() as tape:
            loss = self._nll(tokens, training=True)
            scaled_loss = replica_loss(self.optimizer, loss)
        gradients = tape.gradient(scaled_loss, self.trainable_variables)
        self.optimizer.apply(gradients, self.trainable_variables)
        return self._record(loss)

    def test_step(self, data):
        tokens, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self._record(self._nll(tokens))

    def _record(self, loss):
        self.nll_tracker.update_state(loss)
        self.bits_tracker.update_state(loss / math.log(2.0))
        return step_logs({"loss": self.nll_tracker.result(), "bits_per_token": self.bits_tracker.result()})

    def build(self, input_shape):
        """Create every weight by running the prior once, eagerly, on one grid of zeros: cheaper than
        Keras's default, a traced symbolic call, which every load of a saved prior would pay."""
        self.call(ops.zeros((1, *self.grid_size), "int32"))
        self.built = True

    def sample_tokens(self, count, seed, temperature=1.0, top_k=None, top_p=None):
        """`count` grids (count, h, w) int32, one full pass per token (the reference path).

        `seed` is a stateless seed, int tensor (2,): the same seed gives the same grids.
        """
        rows, columns = self.grid_size
        tokens = tf.zeros((count, rows, columns), tf.int32)
        for position in range(rows * columns):
            row, column = divmod(position, columns)
            logits = ops.cast(self(tokens), "float32")[:, row, column]
            uniforms = position_uniforms(seed, position, count)
            chosen = choose_by_uniform(logits, uniforms, temperature, top_k, top_p)
            tokens = tf.tensor_scatter_nd_update(
                tokens,
                tf.stack([tf.range(count), tf.fill([count], row), tf.fill([count], column)], axis=1),
                chosen,
            )
        return tokens

    def get_config(self):
        return {**super().get_config(), "num_embeddings": self.num_embeddings, "grid_size": list(self.grid_size)}


def position_uniforms(seed, position, count):
    """The `count` uniform draws, in (0, 1], that pick the tokens at `position`: a pure function of
    the stateless `seed` (int tensor (2,)) and `position`, so every sampler draws the same grids."""
    return _uniforms((count,), tf.random.experimental.stateless_fold_in(seed, tf.cast(position, tf.int64)))


def _uniforms(shape, seed):
    """Uniform draws of `shape` in (0, 1] from the stateless `seed` (never 0, which no token's
    cumulative probability would stay below)."""
    return 1.0 - tf.random.stateless_uniform(shape, seed)


def choose_by_uniform(logits, uniforms, temperature=1.0, top_k=None, top_p=None):
    """One token per row of `logits` (B, K) by inverse transform sampling: the first token whose
    cumulative probability reaches `uniforms` (B,) in (0, 1] times the total. The probabilities are
    softened by `temperature` and restricted to the `top_k` most likely tokens and to the smallest
    set whose probability reaches `top_p`. Returns (B,) int32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, received temperature={temperature}")
    logits = tf.cast(logits, tf.float32) / temperature
    if top_k is not None:
        kth = tf.math.top_k(logits, k=int(top_k)).values[:, -1:]
        logits = tf.where(logits < kth, -np.inf, logits)
    if top_p is not None:
        ordered = tf.sort(logits, axis=-1, direction="DESCENDING")
        cumulative = tf.cumsum(tf.nn.softmax(ordered, axis=-1), axis=-1)
        # keep every token at least as likely as the one where the cumulative mass reaches top_p
        cutoff_index = tf.reduce_sum(tf.cast(cumulative < top_p, tf.int32), axis=-1, keepdims=True)
        cutoff = tf.gather(ordered, cutoff_index, batch_dims=1)
        logits = tf.where(logits < cutoff, -np.inf, logits)
    cumulative = tf.cumsum(tf.nn.softmax(logits, axis=-1), axis=-1)
    below = tf.cast(cumulative < uniforms[:, None] * cumulative[:, -1:], tf.int32)
    return tf.minimum(tf.reduce_sum(below, axis=-1), tf.shape(logits)[-1] - 1)


def choose_tokens(logits, seed, temperature=1.0, top_k=None, top_p=None):
    """Draw one token per row of `logits` (B, K), as `choose_by_uniform` says, with uniforms drawn
    from the stateless `seed` (int tensor (2,)). Returns (B,) int32."""
    return choose_by_uniform(logits, _uniforms(tf.shape(logits)[:1], seed), temperature, top_k, top_p)


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatedPixelCNN(TokenPrior):
    """Gated PixelCNN over token grids, without the blind spot.

    The vertical stack's features at row i see the rows up to i (every column); they reach
    the horizontal stack shifted down one row, so position (i, j) gets all of rows < i
    within the receptive field. The horizontal stack at (i, j) sees row i up to column
    j-1 in the first layer and up to column j after it (its input then no longer holds
    t_ij). Both use gated activations tanh(a) * sigmoid(b); the horizontal stack is residual.

    Args:
        num_embeddings, grid_size: see `TokenPrior`.
        channels: width of both stacks.
        num_layers: gated layers.
        kernel_size: odd width of the convolutions (the vertical ones are kernel_size // 2 + 1 high).

    Input shape: (B, h, w) int tokens. Output shape: (B, h, w, K) logits.
    """

    def __init__(self, num_embeddings, grid_size, channels=128, num_layers=4, kernel_size=3, **kwargs):
        super().__init__(num_embeddings, grid_size, **kwargs)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, received kernel_size={kernel_size}")
        self.channels, self.num_layers, self.kernel_size = channels, num_layers, kernel_size
        half = kernel_size // 2
        self.embed = layers.Embedding(num_embeddings, channels, name="embed")
        self.vertical = [layers.Conv2D(2 * channels, (half + 1, kernel_size)) for _ in range(num_layers)]
        self.horizontal = [layers.Conv2D(2 * channels, (1, half + 1)) for _ in range(num_layers)]
        self.vertical_to_horizontal = [layers.Conv2D(2 * channels, 1) for _ in range(num_layers)]
        self.horizontal_out = [layers.Conv2D(channels, 1) for _ in range(num_layers)]
        self.head = layers.Conv2D(num_embeddings, 1, name="head")

    def call(self, tokens):
        x = self.embed(ops.cast(tokens, "int32"))
        half = self.kernel_size // 2
        vertical, horizontal = x, x
        for index in range(self.num_layers):
            # output row i sees rows i-half .. i of the stack below
            v = self.vertical[index](ops.pad(vertical, [[0, 0], [half, 0], [half, half], [0, 0]]))
            # ... and reaches the horizontal stack from the row above: rows < i only
            v_above = ops.pad(v, [[0, 0], [1, 0], [0, 0], [0, 0]])[:, :-1]
            # the first layer sees columns j-half-1 .. j-1, later ones j-half .. j (their input excludes t_ij)
            if index == 0:
                h = self.horizontal[index](ops.pad(horizontal, [[0, 0], [0, 0], [half + 1, 0], [0, 0]]))[:, :, :-1]
            else:
                h = self.horizontal[index](ops.pad(horizontal, [[0, 0], [0, 0], [half, 0], [0, 0]]))
            h = h + self.vertical_to_horizontal[index](v_above)
            vertical = _gate(v)
            update = self.horizontal_out[index](_gate(h))
            horizontal = update if index == 0 else horizontal + update
        return self.head(ops.relu(horizontal))

    def get_config(self):
        return {
            **super().get_config(),
            "channels": self.channels,
            "num_layers": self.num_layers,
            "kernel_size": self.kernel_size,
        }


def _gate(x):
    a, b = ops.split(x, 2, axis=-1)
    return ops.tanh(a) * ops.sigmoid(b)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CausalTransformer(TokenPrior):
    """A decoder-only transformer over the raster sequence of a token grid.

    Position p's input is the token at p - 1 (a learned start vector at p = 0) plus
    learned row and column embeddings of p; causal self-attention lets it see inputs
    0..p, so its logits depend on tokens before p only. `sample_tokens` caches each
    layer's keys and values and runs one position per step.

    Args:
        num_embeddings, grid_size: see `TokenPrior`.
        width: model width; num_heads: attention heads (width divisible by it);
        num_layers: transformer blocks; mlp_ratio: hidden width of each MLP / width;
        dropout: rate of dropout on the attention weights and on each residual branch in training.

    Input shape: (B, h, w) int tokens. Output shape: (B, h, w, K) logits.
    """

    def __init__(
        self, num_embeddings, grid_size, width=128, num_heads=4, num_layers=4, mlp_ratio=4, dropout=0.0, **kwargs
    ):
        super().__init__(num_embeddings, grid_size, **kwargs)
        if width % num_heads:
            raise ValueError(f"width must be divisible by num_heads, received width={width}, num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), received dropout={dropout}")
        self.width, self.num_heads, self.num_layers, self.mlp_ratio = width, num_heads, num_layers, mlp_ratio
        self.dropout = dropout
        rows, columns = self.grid_size
        self.embed = layers.Embedding(num_embeddings, width, name="embed")
        self.start = layers.Embedding(1, width, embeddings_initializer="zeros", name="start")  # input of position 0
        self.row_embed = layers.Embedding(rows, width, name="row_embed")
        self.column_embed = layers.Embedding(columns, width, name="column_embed")
        self.blocks = [_Block(width, num_heads, mlp_ratio, dropout, name=f"block_{i}") for i in range(num_layers)]
        self.norm = layers.LayerNormalization(epsilon=1e-5, name="norm")
        self.head = layers.Dense(num_embeddings, name="head")

    def set_dropout(self, rate):
        """Train on with another dropout `rate` (set before the train step is traced)."""
        self.dropout = rate
        for block in self.blocks:
            block.dropout = block.attention_dropout.rate = block.residual_dropout.rate = rate

    def _inputs(self, previous_tokens, positions):
        """Embedded inputs for `positions` (n,) given the tokens before them (B, n), -1 = start."""
        columns = self.grid_size[1]
        embedded = self.embed(ops.maximum(previous_tokens, 0))
        start = self.start(ops.zeros_like(previous_tokens))
        embedded = ops.where((previous_tokens < 0)[..., None], start, embedded)
        place = self.row_embed(positions // columns) + self.column_embed(positions % columns)
        return embedded + place[None]

    def call(self, tokens, training=None):
        rows, columns = self.grid_size
        flat = ops.reshape(ops.cast(tokens, "int32"), (-1, rows * columns))
        previous = ops.concatenate([-ops.ones_like(flat[:, :1]), flat[:, :-1]], axis=1)
        x = self._inputs(previous, ops.arange(rows * columns))
        for block in self.blocks:
            x = block(x, training=training)
        logits = self.head(self.norm(x))
        return ops.reshape(logits, (-1, rows, columns, self.num_embeddings))

    def cache_chunks(self):
        """(start, length) of the chunks the cached keys and values are kept in, in raster order."""
        length = self.grid_size[0] * self.grid_size[1]
        return [(start, min(CACHE_CHUNK, length - start)) for start in range(0, length, CACHE_CHUNK)]

    def empty_chunks(self, count, length):
        """Zero keys and values of one chunk of `length` positions for `count` grids, one pair per block."""
        empty = tf.zeros((count, self.num_heads, length, self.width // self.num_heads))
        return tuple((empty, empty) for _ in self.blocks)

    def step_logits(self, previous, done, current, position):
        """Logits (B, K) of the token at `position` (int32 scalar) from the token before it
        (B, 1), -1 at position 0, and the keys and values of the earlier positions.

        `done` holds, per block, the full chunks before `position`'s chunk (a tuple of
        (keys, values), each (B, heads, chunk, head_width)), `current` per block the chunk
        `position` falls in; returns the logits and `current` with this position added.
        Sampling runs it, and so did the codec's format 1 (`chunk_probabilities`).
        """
        start = sum(keys.shape[2] for keys, _ in done[0]) if done else 0
        x = self._inputs(previous, tf.reshape(position, [1]))
        updated = []
        for block, block_done, block_current in zip(self.blocks, done, current):
            x, block_current = block.step(x, block_done, block_current, position - start)
            updated.append(block_current)
        return ops.cast(self.head(self.norm(x))[:, 0], "float32"), tuple(updated)

    def chunk_probabilities(self, previous, done, current, position, count):
        """Distributions of `count` positions from `position` on, all in the cache chunk
        `current`, computed one position after the other as `step_logits` does.

        The program of `.vqf` format 1 (`prior_stream.FloatStream`, which decodes such files;
        formats 2 and 3 compute in integers, `integer_prior.py`): an encoder, which knows every
        token, computed a whole chunk in one call, with the chunk's keys and values updated
        in place inside the loop; a decoder calls it for one position at a time. Both run
        the same compiled loop body, so on one computer they compute the same probabilities.

        Args:
            previous: (B, n) int32, column j the token before the chunk's position j
                (-1 before position 0); only the columns of the positions computed are read.
            done, current: as in `step_logits`; `current` is n positions long.
            position: int32 scalar, the first position computed.
            count: int32 scalar, how many positions (at most to the chunk's end).

        Returns:
            (n, B, K) float32 softmax probabilities (zero in the rows not computed), and
            `current` with the computed positions' keys and values written.
        """
        start = sum(keys.shape[2] for keys, _ in done[0]) if done else 0
        length = current[0][0].shape[2]
        batch = ops.shape(previous)[0]

        def body(at, current, probabilities):
            before = tf.gather(previous, at - start, axis=1)[:, None]
            logits, current = self.step_logits(before, done, current, at)
            row = tf.nn.softmax(logits, axis=-1)[None]
            return at + 1, current, tf.tensor_scatter_nd_update(probabilities, [[at - start]], row)

        empty = tf.zeros((length, batch, self.num_embeddings))
        _, current, probabilities = tf.while_loop(
            lambda at, *_: at < position + count, body, (position, current, empty)
        )
        return probabilities, current

    def sample_tokens(self, count, seed, temperature=1.0, top_k=None, top_p=None):
        """`count` grids (count, h, w) int32 with cached keys and values: one step per position.

        The whole loop over the positions is one XLA program (one while-loop per cache chunk,
        with that chunk as a loop variable updated in place); the uniform draws are made
        before it, as the full-pass sampler makes them, so a seed gives the same grids on
        either path (XLA's own random numbers differ from TensorFlow's).
        """
        if temperature <= 0:  # here too, so the error is not wrapped in the compiled loop's trace
            raise ValueError(f"temperature must be > 0, received temperature={temperature}")
        rows, columns = self.grid_size
        uniforms = tf.stack([position_uniforms(seed, position, count) for position in range(rows * columns)])
        sampler = compiled(self, CausalTransformer._sample_by_uniforms, jit_compile=True)
        tokens = sampler(uniforms, float(temperature), top_k, top_p)
        return tf.reshape(tokens, (count, rows, columns))

    def _sample_by_uniforms(self, uniforms, temperature, top_k, top_p):
        """Tokens (B, n) of B grids drawn position by position with `uniforms` (n, B)."""
        count = uniforms.shape[1]
        done = tuple(() for _ in self.blocks)
        previous = -tf.ones((count, 1), tf.int32)
        drawn = []
        for start, length in self.cache_chunks():

            def body(position, previous, current, chosen_so_far, done=done, start=start):
                logits, current = self.step_logits(previous, done, current, position)
                chosen = choose_by_uniform(logits, uniforms[position], temperature, top_k, top_p)
                return position + 1, chosen[:, None], current, chosen_so_far.write(position - start, chosen)

            loop = (tf.constant(start), previous, self.empty_chunks(count, length), tf.TensorArray(tf.int32, length))
            _, previous, current, chosen = tf.while_loop(lambda position, *_: position < start + length, body, loop)
            done = tuple(block_done + (block_current,) for block_done, block_current in zip(done, current))
            drawn.append(tf.transpose(chosen.stack()))
        return tf.concat(drawn, axis=1)

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "mlp_ratio": self.mlp_ratio,
            "dropout": self.dropout,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class _Block(layers.Layer):
    """Pre-norm causal self-attention and MLP, with a step for cached decoding; `dropout` on the attention
    weights and on both residual branches, in training only (the cached step runs at inference).

    Input/Output shape: (B, n, width).
    """

    def __init__(self, width, num_heads, mlp_ratio, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.num_heads, self.mlp_ratio, self.dropout = width, num_heads, mlp_ratio, dropout
        self.attention_dropout = layers.Dropout(dropout)
        self.residual_dropout = layers.Dropout(dropout)
        self.norm_1 = layers.LayerNormalization(epsilon=1e-5)
        self.norm_2 = layers.LayerNormalization(epsilon=1e-5)
        self.qkv = layers.Dense(3 * width)
        self.project = layers.Dense(width)
        self.mlp_in = layers.Dense(mlp_ratio * width, activation="gelu")
        self.mlp_out = layers.Dense(width)

    def build(self, input_shape):
        """Each sublayer's weights from its input shape (no traced call)."""
        for layer in (self.norm_1, self.norm_2, self.qkv, self.project, self.mlp_in):
            layer.build(input_shape)
        self.mlp_out.build((*input_shape[:-1], self.mlp_ratio * self.width))

    def _heads(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        x = ops.reshape(x, (batch, length, self.num_heads, self.width // self.num_heads))
        return ops.transpose(x, (0, 2, 1, 3))

    def _merge(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[2]
        return ops.reshape(ops.transpose(x, (0, 2, 1, 3)), (batch, length, self.width))

    def _attend(self, queries, keys, values, mask, training=None):
        scale = 1.0 / math.sqrt(self.width // self.num_heads)
        scores = ops.matmul(queries, ops.transpose(keys, (0, 1, 3, 2))) * scale
        scores = ops.where(mask, scores, -1e9)
        return ops.matmul(self.attention_dropout(ops.softmax(scores, axis=-1), training=training), values)

    def call(self, x, training=None):
        length = ops.shape(x)[1]
        q, k, v = ops.split(self.qkv(self.norm_1(x)), 3, axis=-1)
        causal = ops.arange(length)[:, None] >= ops.arange(length)[None, :]
        attended = self._attend(self._heads(q), self._heads(k), self._heads(v), causal[None, None], training)
        x = x + self.residual_dropout(self.project(self._merge(attended)), training=training)
        return x + self.residual_dropout(self.mlp_out(self.mlp_in(self.norm_2(x))), training=training)

    def step(self, x, done, current, offset):
        """One position (B, 1, width) with the keys and values of the earlier ones: the full
        chunks `done` (a tuple of (keys, values), each (B, heads, chunk, head_width)) and the
        chunk `current`, in which this position is at `offset`. Returns the output and
        `current` with this position's keys and values written at `offset`. Only the chunks
        are read and only `current` is written, so a step costs less early in the grid."""
        q, k, v = ops.split(self.qkv(self.norm_1(x)), 3, axis=-1)
        queries = self._heads(q)
        keys, values = current
        length = keys.shape[2]
        at = tf.one_hot(offset, length)[None, None, :, None]
        keys = keys * (1.0 - at) + at * self._heads(k)
        values = values * (1.0 - at) + at * self._heads(v)
        chunks = list(done) + [(keys, values)]
        scale = 1.0 / math.sqrt(self.width // self.num_heads)
        scores = [ops.matmul(queries, ops.transpose(chunk_keys, (0, 1, 3, 2))) * scale for chunk_keys, _ in chunks]
        scores[-1] = ops.where((tf.range(length) <= offset)[None, None, None, :], scores[-1], -1e9)
        weights = ops.softmax(ops.concatenate(scores, axis=-1), axis=-1)
        bounds = np.cumsum([score.shape[-1] for score in scores])[:-1].tolist()
        weights = ops.split(weights, bounds, axis=-1) if bounds else [weights]
        attended = sum(ops.matmul(weight, chunk_values) for weight, (_, chunk_values) in zip(weights, chunks))
        x = x + self.project(self._merge(attended))
        return x + self.mlp_out(self.mlp_in(self.norm_2(x))), (keys, values)

    def get_config(self):
        return {
            **super().get_config(),
            "width": self.width,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "dropout": self.dropout,
        }
