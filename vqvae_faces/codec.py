"""The face codec: a VQ-VAE's token grid, range-coded with its token prior, in a `.vqf` file.

Encoding: each face's tokens are the encoder's nearest codes, quantized position by position in
raster order: at each position the prior's distribution given the tokens chosen so far is
computed, the token minimising `distance to the encoder's latent + rate_lambda x (-log2 p)` is
chosen (the distance in units of the face's mean nearest-code distance; `rate_lambda` 0: the
nearest code), and the grid is range-coded (`constriction`) with those distributions. With
`search_steps` the tokens are chosen by decoding instead (`token_search.search_tokens`, better faces,
slower), with the prior's code lengths in the search's cost when `rate_lambda` > 0, and coded as
they are. Decoding runs the prior position by position with the tokens decoded so far, so
both sides compute the same probabilities: the same XLA program
(`CausalTransformer.chunk_probabilities`, a loop over the positions of a cache chunk, called
for a whole chunk when the tokens are known and for one position when decoding) on inputs of
the same shapes (`CODEC_BATCH` grids, padded, the same cache chunks), converted to float64
the same way. The file carries a checksum of its tokens, so a decoder that ever computed
other probabilities reports the file as undecodable instead of returning wrong faces.

File layout (version 1), big-endian:

    offset  bytes  field
    0       2      magic b"VQ"
    2       1      format version
    3       2      fingerprint of the VQ-VAE's model file (first 16 bits of its SHA-256)
    5       2      fingerprint of the prior's model file
    7       1      token grid rows
    8       1      token grid columns
    9       2      checksum of the tokens (CRC-32 of the int16 grid, low 16 bits)
    11      ...    range coder words (little-endian uint32), trailing zero bytes dropped

A container (`.vqfs`, version 1) holds many faces behind one header and in one range-coder
stream, so a face costs its code length and nothing more; its symbols are in the order the
decoder reads them: group by group of `CODEC_BATCH` faces, and within a group position by
position, every face of the group at each position:

    offset  bytes  field
    0       2      magic b"VS"
    2       1      format version
    3       2      fingerprint of the VQ-VAE's model file
    5       2      fingerprint of the prior's model file
    7       1      token grid rows
    8       1      token grid columns
    9       4      number of faces
    13      4      CRC-32 of all the token grids (int16, in order)
    17      ...    range coder words, as above
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import constriction
import numpy as np
import tensorflow as tf

from vqvae_faces.errors import UserFacingError
from vqvae_faces.token_search import distance_unit, search_tokens

MAGIC = b"VQ"
FORMAT_VERSION = 1
HEADER = struct.Struct(">2sBHHBBH")
HEADER_BYTES = HEADER.size
CONTAINER_MAGIC = b"VS"
CONTAINER_HEADER = struct.Struct(">2sBHHBBII")
CONTAINER_HEADER_BYTES = CONTAINER_HEADER.size
# The most faces a container holds: a damaged count is refused before any decoding.
MAX_CONTAINER_FACES = 100_000
# Grids are coded in groups of this many, padded: every probability is computed on inputs of one shape.
# A step costs about the same for 16 grids as for 64 on 2 cores, so larger groups code faster
# (bench/RESULTS.md); a single file still pays for a whole group.
CODEC_BATCH = 64


class CodecError(UserFacingError):
    """A `.vqf` file that cannot be decoded: not a .vqf, truncated, corrupt, another version or other models."""


@dataclass(frozen=True)
class Fingerprints:
    """16-bit fingerprints of the VQ-VAE's and the prior's model files, and where they came from."""

    vqvae: int
    prior: int
    vqvae_file: str = ""
    prior_file: str = ""

    @classmethod
    def from_digests(cls, vqvae_digest: str, prior_digest: str, vqvae_file: str = "", prior_file: str = ""):
        """From `run_folder.file_digest` hex digests."""
        return cls(int(vqvae_digest[:4], 16), int(prior_digest[:4], 16), vqvae_file, prior_file)


def token_checksum(grid: np.ndarray) -> int:
    """16-bit checksum of one token grid (h, w)."""
    return zlib.crc32(np.ascontiguousarray(grid, dtype="<i2").tobytes()) & 0xFFFF


def container_checksum(grids: np.ndarray) -> int:
    """32-bit checksum of a container's token grids (N, h, w), in order."""
    return zlib.crc32(np.ascontiguousarray(grids, dtype="<i2").tobytes())


def _payload(encoder) -> bytes:
    """A range encoder's words as bytes (little-endian uint32), trailing zero bytes dropped."""
    return encoder.get_compressed().astype("<u4").tobytes().rstrip(b"\0")


def _decoder(payload: bytes):
    """A range decoder of `_payload` bytes (the dropped zero bytes put back)."""
    payload += b"\0" * (-len(payload) % 4)
    return constriction.stream.queue.RangeDecoder(np.frombuffer(payload, "<u4").astype(np.uint32))


# The range coder's model family, one for every encoder and decoder call. perfect=False: constriction gives
# every symbol a nonzero probability after quantization, so even a token the prior thinks impossible can be coded.
CODER_MODEL = constriction.stream.model.Categorical(perfect=False)


class FaceCodec:
    """Encode face images to `.vqf` bytes and back, with a VQ-VAE and its `CausalTransformer` prior.

    Args:
        vqvae: the VQ-VAE whose tokens the prior learned.
        prior: a `CausalTransformer` (the codec needs its one-position step).
        fingerprints: written into every file and checked when decoding.
        search_steps: steps of `token_search.search_tokens` (with the rate term in its cost) choosing
            the tokens; 0 codes from the encoder's nearest codes. Decoding never searches,
            so files decode alike.
        search_step_size: the search's step size (the VQ-VAE run's `token_search_step_size`).
    """

    def __init__(self, vqvae, prior, fingerprints: Fingerprints, search_steps: int = 0, search_step_size: float = 0.0):
        if not hasattr(prior, "compiled_chunk_probabilities"):
            raise UserFacingError(
                f'the codec needs a prior with a one-position step (prior.architecture "transformer"); '
                f"this prior is a {type(prior).__name__}."
            )
        if search_steps < 0 or (search_steps > 0 and search_step_size <= 0):
            raise ValueError(
                f"search_steps must be >= 0 and search_step_size > 0 when searching, received "
                f"search_steps={search_steps}, search_step_size={search_step_size}"
            )
        self.vqvae, self.prior, self.fingerprints = vqvae, prior, fingerprints
        self.search_steps, self.search_step_size = search_steps, search_step_size
        self._searches = {}
        self._nearest = tf.function(vqvae.encode_to_tokens)
        self.grid = tuple(prior.grid_size)
        self.length = self.grid[0] * self.grid[1]
        self._chunk = prior.compiled_chunk_probabilities()

    # -- the shared program ------------------------------------------------------------------------

    def _probabilities(self, previous: np.ndarray, caches: list, position: int) -> np.ndarray:
        """float64 distributions (CODEC_BATCH, K) of `position` given the tokens `previous` (CODEC_BATCH,)
        before it; adds this position's keys and values to `caches` (`CausalTransformer.empty_caches`)."""
        chunk, done = self.prior.caches_at(caches, position)
        start, length = self.prior.cache_chunks()[chunk]
        before = np.zeros((CODEC_BATCH, length), np.int32)
        before[:, position - start] = previous
        probabilities, caches[chunk] = self._chunk(
            tf.constant(before), done, caches[chunk], tf.constant(position, tf.int32), tf.constant(1, tf.int32)
        )
        return probabilities[position - start].numpy().astype(np.float64)

    def _all_probabilities(self, tokens: np.ndarray) -> np.ndarray:
        """float64 distributions (CODEC_BATCH, L, K) of every position of the grids `tokens` (CODEC_BATCH, L),
        a cache chunk per call of the program `_probabilities` calls for one position."""
        previous = np.concatenate([-np.ones((CODEC_BATCH, 1)), tokens[:, :-1]], axis=1).astype(np.int32)
        caches = self.prior.empty_caches(CODEC_BATCH)
        distributions = np.empty((CODEC_BATCH, self.length, self.prior.num_embeddings))
        for chunk, (start, length) in enumerate(self.prior.cache_chunks()):
            _, done = self.prior.caches_at(caches, start)
            probabilities, caches[chunk] = self._chunk(
                tf.constant(previous[:, start : start + length]),
                done,
                caches[chunk],
                tf.constant(start, tf.int32),
                tf.constant(length, tf.int32),
            )
            distributions[:, start : start + length] = probabilities.numpy().transpose(1, 0, 2)
        return distributions

    # -- encoding ---------------------------------------------------------------------------------

    def choose_tokens(self, images: np.ndarray, rate_lambda: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (N, h, w) int16 for uint8 images (N, H, W, C), and their code lengths in bits (N,).

        With `rate_lambda` 0 the tokens are the encoder's nearest codes (the searched tokens
        with `search_steps`). Otherwise each position takes the code minimising its squared
        distance to the encoder's latent (in units of the face's mean nearest-code distance)
        + `rate_lambda` x (-log2 p(code | tokens before it)); with `search_steps` the search
        minimises the decoded face's error + `rate_lambda` x the grid's code length. A larger
        `rate_lambda` gives shorter files and blurrier faces.
        """
        grids, bits = [], []
        for start in range(0, len(images), CODEC_BATCH):
            chunk = images[start : start + CODEC_BATCH]
            tokens, lengths = self._choose_chunk(chunk, rate_lambda)
            grids.append(tokens[: len(chunk)])
            bits.append(lengths[: len(chunk)])
        if not grids:
            return np.zeros((0, *self.grid), np.int16), np.zeros(0)
        return np.concatenate(grids), np.concatenate(bits)

    def encode(self, images: np.ndarray, rate_lambda: float = 0.0, on_group=None) -> tuple[list[bytes], np.ndarray]:
        """`.vqf` bytes of each uint8 image (N, H, W, C), and the token grids they hold (N, h, w).
        `on_group(n)` is called after each group of n faces (a progress bar's `add`)."""
        files, _, grids = self._encode_images(images, rate_lambda, on_group, files=True, container=False)
        return files, grids

    def encode_container(self, images: np.ndarray, rate_lambda: float = 0.0, on_group=None) -> tuple[bytes, np.ndarray]:
        """One `.vqfs` container of the uint8 images (N, H, W, C), and the token grids it holds (N, h, w)."""
        _, container, grids = self._encode_images(images, rate_lambda, on_group, files=False, container=True)
        return container, grids

    def encode_all(
        self, images: np.ndarray, rate_lambda: float = 0.0, on_group=None
    ) -> tuple[list[bytes], bytes, np.ndarray]:
        """Each uint8 image (N, H, W, C) as `.vqf` bytes, all of them as one `.vqfs` container, and the
        token grids both hold (N, h, w): the prior runs once for both."""
        return self._encode_images(images, rate_lambda, on_group, files=True, container=True)

    def encode_tokens(self, grids: np.ndarray) -> tuple[list[bytes], bytes]:
        """`.vqf` bytes of each given token grid (N, h, w), and one `.vqfs` container of them all."""
        files, container, _ = self._encode_groups(
            lambda start: self._choose_chunk(
                None, 0.0, keep_probabilities=True, given=grids[start : start + CODEC_BATCH]
            ),
            len(grids),
        )
        return files, container

    def _encode_images(self, images, rate_lambda, on_group, files: bool, container: bool):
        """`_encode_groups` of uint8 images, their tokens chosen at `rate_lambda`."""
        return self._encode_groups(
            lambda start: self._choose_chunk(images[start : start + CODEC_BATCH], rate_lambda, keep_probabilities=True),
            len(images),
            on_group,
            files,
            container,
        )

    def _encode_groups(
        self, choose, count: int, on_group=None, files: bool = True, container: bool = True
    ) -> tuple[list[bytes], bytes, np.ndarray]:
        """Files (with `files`, else []), container (with `container`, else b"") and grids of `count`
        faces whose groups `choose(start)` codes."""
        if count > MAX_CONTAINER_FACES:
            raise ValueError(f"at most {MAX_CONTAINER_FACES} faces per call, received {count}")
        written, grids = [], []
        stream = constriction.stream.queue.RangeEncoder()
        for start in range(0, count, CODEC_BATCH):
            size = min(CODEC_BATCH, count - start)
            tokens, _, probabilities = choose(start)
            if files:
                written += [self._write(tokens[index], probabilities[index]) for index in range(size)]
            if container:
                symbols = tokens[:size].reshape(size, self.length).T.reshape(-1).astype(np.int32)
                by_position = probabilities[:size].transpose(1, 0, 2).reshape(len(symbols), -1)
                stream.encode(symbols, CODER_MODEL, by_position)
            grids.append(tokens[:size])
            if on_group is not None:
                on_group(size)
        grids = np.concatenate(grids) if grids else np.zeros((0, *self.grid), np.int16)
        if not container:
            return written, b"", grids
        rows, columns = self.grid
        header = CONTAINER_HEADER.pack(
            CONTAINER_MAGIC,
            FORMAT_VERSION,
            self.fingerprints.vqvae,
            self.fingerprints.prior,
            rows,
            columns,
            count,
            container_checksum(grids),
        )
        return written, header + _payload(stream), grids

    def _targets(self, images: np.ndarray, rate_lambda: float) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The tokens (CODEC_BATCH, L) of up to CODEC_BATCH uint8 images, and what the coding pass still
        chooses between: None when they are coded as they are (`rate_lambda` 0, or searched tokens, whose
        search had the rate term in its cost), else each position's squared distances from its encoder
        latent to every code (CODEC_BATCH, L, K), in units of the face's mean nearest-code distance, so
        that `rate_lambda` means the same for every face."""
        padded = np.zeros((CODEC_BATCH, *images.shape[1:]), np.float32)
        padded[: len(images)] = images.astype(np.float32) / 255.0
        padded = tf.constant(padded)
        if self.search_steps:
            return self._searched(padded, rate_lambda).numpy().reshape(CODEC_BATCH, self.length), None
        if rate_lambda == 0.0:
            return self._nearest(padded).numpy().reshape(CODEC_BATCH, self.length), None
        latents = self.vqvae.encoder(padded)
        tokens = self.vqvae.quantizer.encode_indices(latents).numpy().reshape(CODEC_BATCH, self.length)
        distances = self.vqvae.quantizer.squared_distances(latents)
        unit = distance_unit(distances).numpy().astype(np.float64)
        return tokens, (distances.numpy().astype(np.float64) / unit).reshape(CODEC_BATCH, self.length, -1)

    def _searched(self, images: tf.Tensor, rate_lambda: float) -> tf.Tensor:
        """`token_search.search_tokens` of the images (CODEC_BATCH, H, W, C) with the prior's code lengths in its
        cost; one compiled search per `rate_lambda`."""
        if rate_lambda not in self._searches:
            vqvae, steps, step_size = self.vqvae, self.search_steps, self.search_step_size
            self._searches[rate_lambda] = tf.function(
                lambda x: search_tokens(vqvae, x, steps, step_size, self.prior.code_lengths, rate_lambda)
            )
        return self._searches[rate_lambda](images)

    def _choose_chunk(self, images, rate_lambda: float, keep_probabilities: bool = False, given=None):
        """Tokens (CODEC_BATCH, h, w) of up to CODEC_BATCH images (or the `given` grids), their code
        lengths (CODEC_BATCH,) and, when asked, the distributions they are coded with (CODEC_BATCH, L, K).
        Tokens known before coding get their distributions a chunk at a time; tokens chosen by the
        rate term position by position, each from its position's distribution."""
        if given is not None:
            targets, costs = np.zeros((CODEC_BATCH, self.length), np.int64), None
            targets[: len(given)] = given.reshape(len(given), self.length)
        else:
            targets, costs = self._targets(images, rate_lambda)
        if costs is None:
            tokens, probabilities = targets, self._all_probabilities(targets)
        else:
            tokens, probabilities = self._choose_by_rate(costs, rate_lambda)
        chosen = np.take_along_axis(probabilities, tokens[..., None], axis=-1)[..., 0]
        bits = -np.log2(np.maximum(chosen, 1e-30)).sum(axis=1)
        grids = tokens.reshape(CODEC_BATCH, *self.grid).astype(np.int16)
        return (grids, bits, probabilities) if keep_probabilities else (grids, bits)

    def _choose_by_rate(self, costs: np.ndarray, rate_lambda: float) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (CODEC_BATCH, L) minimising `costs` (CODEC_BATCH, L, K) + rate_lambda x bits position by
        position, and their distributions (CODEC_BATCH, L, K)."""
        tokens = np.zeros((CODEC_BATCH, self.length), np.int64)
        kept = []
        previous = -np.ones(CODEC_BATCH, np.int64)
        caches = self.prior.empty_caches(CODEC_BATCH)
        for position in range(self.length):
            probabilities = self._probabilities(previous, caches, position)
            rate = -np.log2(np.maximum(probabilities, 1e-30))
            previous = tokens[:, position] = np.argmin(costs[:, position] + rate_lambda * rate, axis=-1)
            kept.append(probabilities)
        return tokens, np.stack(kept, axis=1)

    def _write(self, grid: np.ndarray, probabilities: np.ndarray) -> bytes:
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(grid.reshape(-1).astype(np.int32), CODER_MODEL, probabilities)
        rows, columns = self.grid
        header = HEADER.pack(
            MAGIC, FORMAT_VERSION, self.fingerprints.vqvae, self.fingerprints.prior, rows, columns, token_checksum(grid)
        )
        return header + _payload(encoder)

    # -- decoding ---------------------------------------------------------------------------------

    def read_header(self, data: bytes, name: str) -> int:
        """Check a `.vqf` file's header against this codec; returns its token checksum. `CodecError` otherwise."""
        self._check_start(data, name, MAGIC, HEADER_BYTES, ".vqf")
        _, _, vqvae, prior, rows, columns, checksum = HEADER.unpack_from(data)
        self._check_models(name, vqvae, prior, rows, columns)
        return checksum

    def read_container_header(self, data: bytes, name: str) -> tuple[int, int]:
        """Check a `.vqfs` container's header; returns (number of faces, CRC-32 of their tokens)."""
        self._check_start(data, name, CONTAINER_MAGIC, CONTAINER_HEADER_BYTES, ".vqfs")
        _, _, vqvae, prior, rows, columns, count, checksum = CONTAINER_HEADER.unpack_from(data)
        self._check_models(name, vqvae, prior, rows, columns)
        if count > MAX_CONTAINER_FACES:
            raise CodecError(f"{name} is corrupt: it claims {count} faces, more than a container holds.")
        return count, checksum

    @staticmethod
    def _check_start(data: bytes, name: str, magic: bytes, header_bytes: int, kind: str) -> None:
        if len(data) < 3 or data[:2] != magic:
            raise CodecError(f"{name} is not a {kind} file (it does not start with {magic!r}).")
        if data[2] != FORMAT_VERSION:
            raise CodecError(f"{name} is {kind} format version {data[2]}; this program reads version {FORMAT_VERSION}.")
        if len(data) < header_bytes:
            raise CodecError(f"{name} is truncated: {len(data)} bytes, shorter than the {header_bytes}-byte header.")

    def _check_models(self, name: str, vqvae: int, prior: int, rows: int, columns: int) -> None:
        mine = self.fingerprints
        if (vqvae, prior) != (mine.vqvae, mine.prior):
            raise CodecError(
                f"{name} was made with other models (VQ-VAE {vqvae:04x}, prior {prior:04x}) than these "
                f"(VQ-VAE {mine.vqvae:04x} {mine.vqvae_file}, prior {mine.prior:04x} {mine.prior_file}); "
                "decode it with the --out folder whose checkpoints made it."
            )
        if (rows, columns) != self.grid:
            raise CodecError(f"{name} holds a {rows}x{columns} grid; these models use {self.grid[0]}x{self.grid[1]}.")

    def decode(self, files: list[bytes], names: list[str]) -> np.ndarray:
        """Token grids (N, h, w) int16 of `.vqf` bytes; a `CodecError` naming the first bad file."""
        checksums = [self.read_header(data, name) for data, name in zip(files, names)]
        grids = []
        for start in range(0, len(files), CODEC_BATCH):
            group, group_names = files[start : start + CODEC_BATCH], names[start : start + CODEC_BATCH]
            decoders = [_decoder(data[HEADER_BYTES:]) for data in group]

            def read(probabilities, decoders=decoders, group_names=group_names):
                tokens = np.zeros(len(decoders), np.int64)
                for index, decoder in enumerate(decoders):
                    tokens[index] = self._read_symbols(decoder, probabilities[index : index + 1], group_names[index])[0]
                return tokens

            grids.append(self._decode_group(len(group), read))
        grids = np.concatenate(grids) if grids else np.zeros((0, *self.grid), np.int16)
        for grid, checksum, name in zip(grids, checksums, names):
            if token_checksum(grid) != checksum:
                raise CodecError(f"{name} is corrupt: its tokens do not match the checksum in its header.")
        return grids

    def decode_container(self, data: bytes, name: str, on_group=None) -> np.ndarray:
        """Token grids (N, h, w) int16 of a `.vqfs` container's bytes; a `CodecError` when it is bad.
        `on_group(n)` is called after each group of n faces."""
        count, checksum = self.read_container_header(data, name)
        decoder = _decoder(data[CONTAINER_HEADER_BYTES:])
        grids = []
        for start in range(0, count, CODEC_BATCH):
            size = min(CODEC_BATCH, count - start)
            grids.append(self._decode_group(size, lambda p: self._read_symbols(decoder, p, name)))
            if on_group is not None:
                on_group(size)
        grids = np.concatenate(grids) if grids else np.zeros((0, *self.grid), np.int16)
        if container_checksum(grids) != checksum:
            raise CodecError(f"{name} is corrupt: its tokens do not match the checksum in its header.")
        return grids

    @staticmethod
    def _read_symbols(decoder, probabilities: np.ndarray, name: str) -> np.ndarray:
        try:
            return decoder.decode(CODER_MODEL, probabilities)
        except Exception as error:  # the coder's own complaint about a damaged stream
            raise CodecError(f"{name} is corrupt or truncated ({error}).") from None

    def _decode_group(self, count: int, read) -> np.ndarray:
        """Token grids (count, h, w) of one group: at each position the shared step's distributions of the
        CODEC_BATCH rows, of which `read(probabilities[:count])` returns the count decoded tokens."""
        tokens = np.zeros((CODEC_BATCH, self.length), np.int64)
        caches = self.prior.empty_caches(CODEC_BATCH)
        previous = -np.ones(CODEC_BATCH, np.int64)
        for position in range(self.length):
            probabilities = self._probabilities(previous, caches, position)
            tokens[:count, position] = read(probabilities[:count])
            previous = tokens[:, position]
        return tokens[:count].reshape(count, *self.grid).astype(np.int16)
