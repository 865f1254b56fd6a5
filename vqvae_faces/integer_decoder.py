"""A VQ-VAE's decoder in integer arithmetic (`integer_arithmetic.py`): token grids to 8-bit pixels, the
same on every computer, for `--decode`."""

from __future__ import annotations

import numpy as np

from vqvae_faces.integer_arithmetic import ACTIVATIONS, Convolution, clipped_pixels, quantized, sigmoid_pixels


class IntegerDecoder:
    """The `Decoder` of a trained VQ-VAE and its codebook, read once from the float32 weights.

    Args:
        vqvae: the `VQVAE`.

    `pixels(tokens)`: (B, h, w) int token grids -> (B, H, W, C) uint8, what the float decoder's output
    rounds to, to within a level where a value lies near a rounding boundary.
    """

    def __init__(self, vqvae):
        decoder = vqvae.decoder
        if decoder.activation not in ACTIVATIONS:
            raise ValueError(
                f"the integer decoder computes {sorted(ACTIVATIONS)}, received activation={decoder.activation!r}"
            )
        self.codebook = quantized(vqvae.quantizer.embeddings.numpy())
        self.act = ACTIVATIONS[decoder.activation]
        self.mix = Convolution(*decoder.mix.get_weights())
        self.blocks = [
            (Convolution(*block.conv_3x3.get_weights()), Convolution(*block.conv_1x1.get_weights()))
            for block in decoder.blocks
        ]
        self.upsamplers = [Convolution(*layer.get_weights(), upsample=True) for layer in decoder.upsamplers]
        self.to_image = Convolution(*decoder.to_image.get_weights(), upsample=True)
        self.output = sigmoid_pixels if decoder.output_activation == "sigmoid" else clipped_pixels

    def pixels(self, tokens: np.ndarray) -> np.ndarray:
        x = self.mix(self.codebook[np.asarray(tokens, np.int64)])
        for conv_3x3, conv_1x1 in self.blocks:
            x = x + conv_1x1(self.act(conv_3x3(self.act(x))))
        x = self.act(x)
        for upsampler in self.upsamplers:
            x = self.act(upsampler(x))
        return self.output(self.to_image(x))
