"""The face codec: a VQ-VAE's token grid, range-coded (`constriction`) with its token prior, in a
`.vqf` file or a `.vqfs` container (their bytes: `vqf_format.py`).

Encoding chooses each face's tokens (`token_choice.py`) and codes them with the distributions the
prior gives each position given the tokens before it; decoding runs the prior position by position
with the tokens decoded so far, in groups of `CODEC_BATCH` faces. Both sides compute those
distributions in integer arithmetic (`prior_stream.ExactStream`), and the faces come from the
VQ-VAE's decoder in integer arithmetic too (`integer_decoder.py`), so a file decodes to the same
pixels on any computer; files of format 1 (float32 probabilities) are decoded with the float
program that wrote them. The files carry a checksum of their tokens, so a decoder that ever
computed other probabilities reports the file as undecodable instead of returning wrong faces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import constriction
import numpy as np

from vqvae_faces import vqf_format
from vqvae_faces.integer_decoder import IntegerDecoder
from vqvae_faces.prior_stream import ExactStream, FloatStream
from vqvae_faces.token_choice import TokenChooser, code_lengths_in_bits
from vqvae_faces.vqf_format import FLOAT_VERSION, MAX_CONTAINER_FACES, CodecError, Fingerprints

# Grids are coded in groups of this many: a decoding step costs little more for 64 grids than for one
# (bench/RESULTS.md). The container's symbols are in this order, and format 1 computed its probabilities
# on groups of exactly this many grids, padded.
CODEC_BATCH = 64

# The range coder's model family, one for every encoder and decoder call. perfect=False: constriction gives
# every symbol a nonzero probability after quantization, so even a token the prior thinks impossible can be coded.
CODER_MODEL = constriction.stream.model.Categorical(perfect=False)


@dataclass
class Encoded:
    """What `FaceCodec.encode` made: `.vqf` bytes per face (when asked), one `.vqfs` container of all
    of them (when asked, else b""), the token grids they hold (N, h, w) int16 and each grid's code
    length in bits (N,)."""

    grids: np.ndarray
    bits: np.ndarray
    files: list[bytes] = field(default_factory=list)
    container: bytes = b""


class FaceCodec:
    """Encode face images to `.vqf` bytes and back, with a VQ-VAE and its `CausalTransformer` prior.

    Args:
        vqvae: the VQ-VAE whose tokens the prior learned.
        prior: a `CausalTransformer` (the codec needs its one-position step).
        fingerprints: written into every file and checked when decoding.
        search_steps, search_step_size: see `TokenChooser`. Decoding never searches, so files
            decode alike.
    """

    def __init__(self, vqvae, prior, fingerprints: Fingerprints, search_steps: int = 0, search_step_size: float = 0.0):
        self.vqvae, self.prior, self.fingerprints = vqvae, prior, fingerprints
        self.stream = ExactStream(prior)
        self._float_stream = None  # format 1's program, compiled when a format 1 file is decoded
        self._decoder = None  # the integer decoder, read from the VQ-VAE when faces are first asked for
        self.chooser = TokenChooser(vqvae, self.stream, search_steps, search_step_size)
        self.search_steps = search_steps
        self.grid = tuple(prior.grid_size)
        self.reader = vqf_format.Reader(fingerprints, self.grid)

    # -- encoding ---------------------------------------------------------------------------------

    def _groups(self, images=None, grids=None, rate_lambda=0.0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(faces, tokens (faces, L), distributions (faces, L, K)) of each group of uint8 `images`
        (N, H, W, C), their tokens chosen at `rate_lambda`, or of the given `grids` (N, h, w)."""
        count = len(images) if grids is None else len(grids)
        for start in range(0, count, CODEC_BATCH):
            size = min(CODEC_BATCH, count - start)
            if grids is None:
                padded = np.zeros((CODEC_BATCH, *images.shape[1:]), np.float32)
                padded[:size] = images[start : start + size].astype(np.float32) / 255.0
                yield (size, *self.chooser.choose(padded, size, rate_lambda))
            else:
                yield (size, *self.chooser.given(grids[start : start + size].reshape(size, -1).astype(np.int64)))

    def choose_tokens(self, images: np.ndarray, rate_lambda: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (N, h, w) int16 the codec sends for uint8 images (N, H, W, C), and their code lengths
        in bits (N,); see `token_choice` for `rate_lambda`."""
        encoded = self._encode(self._groups(images, rate_lambda=rate_lambda), len(images), files=False, container=False)
        return encoded.grids, encoded.bits

    def encode(
        self, images: np.ndarray, rate_lambda: float = 0.0, on_group=None, files: bool = True, container: bool = True
    ) -> Encoded:
        """uint8 images (N, H, W, C) as `.vqf` bytes each (with `files`) and as one `.vqfs` container (with
        `container`); the prior runs once for both. `on_group(n)` is called after each group of n faces
        (a progress bar's `add`)."""
        return self._encode(self._groups(images, rate_lambda=rate_lambda), len(images), on_group, files, container)

    def encode_tokens(self, grids: np.ndarray) -> Encoded:
        """`.vqf` bytes of each given token grid (N, h, w), and one `.vqfs` container of them all."""
        return self._encode(self._groups(grids=grids), len(grids))

    def _encode(self, groups, count: int, on_group=None, files: bool = True, container: bool = True) -> Encoded:
        if count > MAX_CONTAINER_FACES:
            raise ValueError(f"at most {MAX_CONTAINER_FACES} faces per call, received {count}")
        written, grids, bits = [], [], []
        stream = constriction.stream.queue.RangeEncoder()
        for size, tokens, distributions in groups:
            grid = tokens.reshape(size, *self.grid).astype(np.int16)
            chosen = np.take_along_axis(distributions, tokens[:, :, None], axis=-1)[..., 0]
            if files:
                written += [self._file(grid[index], distributions[index]) for index in range(size)]
            if container:
                symbols = tokens.T.reshape(-1).astype(np.int32)
                stream.encode(symbols, CODER_MODEL, distributions.transpose(1, 0, 2).reshape(len(symbols), -1))
            grids.append(grid)
            bits.append(code_lengths_in_bits(chosen).sum(axis=1))
            if on_group is not None:
                on_group(size)
        grids = np.concatenate(grids) if grids else np.zeros((0, *self.grid), np.int16)
        packed = vqf_format.container_bytes(self.fingerprints, grids, stream.get_compressed()) if container else b""
        return Encoded(grids, np.concatenate(bits) if bits else np.zeros(0), written, packed)

    def _file(self, grid: np.ndarray, distributions: np.ndarray) -> bytes:
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(grid.reshape(-1).astype(np.int32), CODER_MODEL, distributions)
        return vqf_format.file_bytes(self.fingerprints, grid, encoder.get_compressed())

    # -- decoding ---------------------------------------------------------------------------------

    def decode(self, files: list[bytes], names: list[str]) -> np.ndarray:
        """Token grids (N, h, w) int16 of `.vqf` bytes; a `CodecError` naming the first bad file."""
        headers = [self.reader.file(data, name) for data, name in zip(files, names)]
        grids = np.zeros((len(files), *self.grid), np.int16)
        for version in sorted({version for version, _, _ in headers}):
            chosen = [index for index, header in enumerate(headers) if header[0] == version]
            for start in range(0, len(chosen), CODEC_BATCH):
                group = chosen[start : start + CODEC_BATCH]
                decoders = [constriction.stream.queue.RangeDecoder(headers[index][2]) for index in group]

                def read(probabilities, decoders=decoders, group=group, version=version):
                    return np.array(
                        [
                            _read_symbols(decoder, probabilities[row : row + 1], names[index], version)[0]
                            for row, (decoder, index) in enumerate(zip(decoders, group))
                        ]
                    )

                grids[group] = self._decode_group(len(group), read, version)
        vqf_format.check_checksums(grids, [header[1] for header in headers], names, [header[0] for header in headers])
        return grids

    def decode_container(self, data: bytes, name: str, on_group=None) -> np.ndarray:
        """Token grids (N, h, w) int16 of a `.vqfs` container's bytes; a `CodecError` when it is bad.
        `on_group(n)` is called after each group of n faces."""
        version, count, checksum, words = self.reader.container(data, name)
        decoder = constriction.stream.queue.RangeDecoder(words)
        grids = []
        for start in range(0, count, CODEC_BATCH):
            size = min(CODEC_BATCH, count - start)
            read = lambda probabilities: _read_symbols(decoder, probabilities, name, version)  # noqa: E731
            grids.append(self._decode_group(size, read, version))
            if on_group is not None:
                on_group(size)
        grids = np.concatenate(grids) if grids else np.zeros((0, *self.grid), np.int16)
        vqf_format.check_container_checksum(grids, checksum, name, version)
        return grids

    def _decode_group(self, count: int, read: Callable[[np.ndarray], np.ndarray], version: int) -> np.ndarray:
        """Token grids (count, h, w) of one group: at each position `read(probabilities)` returns the count
        tokens decoded from the distributions (count, K) given the tokens before them. Format 1 computes
        them on a padded group of CODEC_BATCH grids, as its encoder did."""
        if version != FLOAT_VERSION:
            tokens, _ = self.stream.run(lambda position, probabilities: read(probabilities), count)
            return tokens.reshape(count, *self.grid).astype(np.int16)
        if self._float_stream is None:
            self._float_stream = FloatStream(self.prior, CODEC_BATCH)

        def choose(position, probabilities):
            tokens = np.zeros(CODEC_BATCH, np.int64)
            tokens[:count] = read(probabilities[:count])
            return tokens

        tokens, _ = self._float_stream.run(choose, CODEC_BATCH)
        return tokens[:count].reshape(count, *self.grid).astype(np.int16)

    def pixels(self, grids: np.ndarray) -> np.ndarray:
        """The faces (N, H, W, C) uint8 of token grids (N, h, w), by the VQ-VAE's decoder in integer arithmetic:
        the same pixels on any computer."""
        if self._decoder is None:
            self._decoder = IntegerDecoder(self.vqvae)
        groups = range(0, len(grids), CODEC_BATCH)
        return np.concatenate([self._decoder.pixels(grids[start : start + CODEC_BATCH]) for start in groups])


def _read_symbols(decoder, probabilities: np.ndarray, name: str, version: int) -> np.ndarray:
    try:
        return decoder.decode(CODER_MODEL, probabilities)
    except Exception as error:  # the coder's own complaint about a damaged stream
        if version == FLOAT_VERSION:
            raise vqf_format.undecodable(name, version, f"the range decoder stopped: {error}") from None
        raise CodecError(f"{name} is corrupt or truncated ({error}).") from None
