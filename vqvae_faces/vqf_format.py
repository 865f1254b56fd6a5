"""The `.vqf` file and the `.vqfs` container: their bytes, checksums and fingerprints, and the errors
of a file that cannot be decoded. No TensorFlow: the codec (`codec.py`) fills in the range coder's
payload.

File layout, format 3 (written), big-endian:

    offset  bytes  field
    0       1      0xF3: a .vqf file of format version 3
    1       2      fingerprint of the two models (first 16 bits of the SHA-256 of their two fingerprints)
    3       2      checksum of the tokens (CRC-32 of the int16 grid, low 16 bits)
    5       ...    range coder words (little-endian uint32), trailing zero bytes dropped

The grid's size is the prior's, which the fingerprint names. Versions 1 and 2 (read, never written)
spend 11 bytes on the same facts:

    offset  bytes  field
    0       2      magic b"VQ"
    2       1      format version
    3       2      fingerprint of the VQ-VAE's model file (first 16 bits of its SHA-256)
    5       2      fingerprint of the prior's model file
    7       1      token grid rows
    8       1      token grid columns
    9       2      checksum of the tokens
    11      ...    range coder words, as above

The version says how the prior's probabilities were computed, which the decoder must repeat bit
for bit: 2 and 3, in integer arithmetic (`integer_prior.py`), the same on every computer; 1, in float32
by XLA, the same only with the writer's instruction set and TensorFlow.

A container (`.vqfs`, versions 1 and 2; 2 written) holds many faces behind one header and in one range-coder
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

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from vqvae_faces.errors import UserFacingError

FORMAT_VERSION = 3  # the .vqf version written
FLOAT_VERSION = 1  # the version of float32 probabilities, still read
# A .vqf of format 3 and later starts with one byte: FILE_TAG's high half, the version in the low half.
FILE_TAG = 0xF0
HEADER = struct.Struct(">BHH")
HEADER_BYTES = HEADER.size
# Versions 1 and 2 of the .vqf, and every version of the .vqfs, start with a two-byte magic and a version byte.
MAGIC = b"VQ"
LONG_VERSIONS = (FLOAT_VERSION, 2)
LONG_HEADER = struct.Struct(">2sBHHBBH")
READ_VERSIONS = (*LONG_VERSIONS, FORMAT_VERSION)
CONTAINER_VERSION = 2  # the .vqfs version written
CONTAINER_MAGIC = b"VS"
CONTAINER_HEADER = struct.Struct(">2sBHHBBII")
CONTAINER_HEADER_BYTES = CONTAINER_HEADER.size
# The most faces a container holds: a damaged count is refused before any decoding.
MAX_CONTAINER_FACES = 100_000


class CodecError(UserFacingError):
    """A `.vqf` file that cannot be decoded: not a .vqf, truncated, corrupt, another version or other models."""


@dataclass(frozen=True)
class Fingerprints:
    """16-bit fingerprints of the VQ-VAE's and the prior's model files, and where they came from."""

    vqvae: int
    prior: int
    vqvae_file: str = ""
    prior_file: str = ""

    @property
    def pair(self) -> int:
        """One 16-bit fingerprint of both models, as format 3 files carry it."""
        return int.from_bytes(hashlib.sha256(struct.pack(">HH", self.vqvae, self.prior)).digest()[:2], "big")

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


def payload_bytes(words: np.ndarray) -> bytes:
    """A range coder's words (uint32) as a file's payload: little-endian, trailing zero bytes dropped."""
    return words.astype("<u4").tobytes().rstrip(b"\0")


def payload_words(payload: bytes) -> np.ndarray:
    """The range coder's words (uint32) of a `payload_bytes` payload (the dropped zero bytes put back)."""
    payload += b"\0" * (-len(payload) % 4)
    return np.frombuffer(payload, "<u4").astype(np.uint32)


def file_bytes(fingerprints: Fingerprints, grid: np.ndarray, words: np.ndarray) -> bytes:
    """A `.vqf` file of one token grid (h, w) whose symbols the range coder's `words` hold."""
    header = HEADER.pack(FILE_TAG | FORMAT_VERSION, fingerprints.pair, token_checksum(grid))
    return header + payload_bytes(words)


def container_bytes(fingerprints: Fingerprints, grids: np.ndarray, words: np.ndarray) -> bytes:
    """A `.vqfs` container of the token grids (N, h, w) whose symbols the range coder's `words` hold."""
    count, rows, columns = grids.shape
    header = CONTAINER_HEADER.pack(
        CONTAINER_MAGIC,
        CONTAINER_VERSION,
        fingerprints.vqvae,
        fingerprints.prior,
        rows,
        columns,
        count,
        container_checksum(grids),
    )
    return header + payload_bytes(words)


@dataclass(frozen=True)
class Reader:
    """Checks headers against the models a decoder holds (`fingerprints`) and their token `grid` (h, w)."""

    fingerprints: Fingerprints
    grid: tuple[int, int]

    def file(self, data: bytes, name: str) -> tuple[int, int, np.ndarray]:
        """A `.vqf` file's format version, token checksum and payload words; `CodecError` when its header
        is wrong."""
        if data[:2] == MAGIC:
            self._check_start(data, name, MAGIC, LONG_HEADER.size, ".vqf", LONG_VERSIONS, READ_VERSIONS)
            _, version, vqvae, prior, rows, columns, checksum = LONG_HEADER.unpack_from(data)
            self._check_models(name, vqvae, prior, rows, columns)
            return version, checksum, payload_words(data[LONG_HEADER.size :])
        if not data or data[0] & 0xF0 != FILE_TAG:
            raise CodecError(
                f"{name} is not a .vqf file (it starts with neither {MAGIC!r} nor 0x{FILE_TAG | FORMAT_VERSION:X})."
            )
        if data[0] & 0x0F != FORMAT_VERSION:
            raise CodecError(f"{name} is .vqf format version {data[0] & 0x0F}; {self._reads(READ_VERSIONS)}.")
        if len(data) < HEADER_BYTES:
            raise CodecError(f"{name} is truncated: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header.")
        _, pair, checksum = HEADER.unpack_from(data)
        if pair != self.fingerprints.pair:
            mine = self.fingerprints
            raise CodecError(
                f"{name} was made with other models (fingerprint {pair:04x}) than these (VQ-VAE {mine.vqvae:04x} "
                f"{mine.vqvae_file}, prior {mine.prior:04x} {mine.prior_file}: fingerprint {mine.pair:04x}); "
                "decode it with the --out folder whose checkpoints made it."
            )
        return FORMAT_VERSION, checksum, payload_words(data[HEADER_BYTES:])

    def container(self, data: bytes, name: str) -> tuple[int, int, int, np.ndarray]:
        """A `.vqfs` container's format version, number of faces, CRC-32 of their tokens and payload words."""
        self._check_start(data, name, CONTAINER_MAGIC, CONTAINER_HEADER_BYTES, ".vqfs", LONG_VERSIONS)
        _, version, vqvae, prior, rows, columns, count, checksum = CONTAINER_HEADER.unpack_from(data)
        self._check_models(name, vqvae, prior, rows, columns)
        if count > MAX_CONTAINER_FACES:
            raise CodecError(f"{name} is corrupt: it claims {count} faces, more than a container holds.")
        return version, count, checksum, payload_words(data[CONTAINER_HEADER_BYTES:])

    @staticmethod
    def _reads(versions) -> str:
        return f"this program reads versions {', '.join(map(str, versions[:-1]))} and {versions[-1]}"

    def _check_start(self, data, name, magic, header_bytes, kind, versions, readable=None) -> None:
        """Refuses `data` that does not start with `magic` and one of `versions`, or is shorter than
        `header_bytes`; the message names the `readable` versions (default: `versions`)."""
        if len(data) < 3 or data[:2] != magic:
            raise CodecError(f"{name} is not a {kind} file (it does not start with {magic!r}).")
        if data[2] not in versions:
            raise CodecError(f"{name} is {kind} format version {data[2]}; {self._reads(readable or versions)}.")
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


def check_checksums(grids: np.ndarray, checksums: list[int], names: list[str], versions: list[int]) -> None:
    """A `CodecError` naming the first file whose decoded grid does not match its header's checksum."""
    for grid, checksum, name, version in zip(grids, checksums, names, versions):
        if token_checksum(grid) != checksum:
            raise undecodable(name, version)


def check_container_checksum(grids: np.ndarray, checksum: int, name: str, version: int) -> None:
    if container_checksum(grids) != checksum:
        raise undecodable(name, version)


def undecodable(name: str, version: int, detail: str = "its tokens do not match the checksum in its header"):
    """The error of a file whose decoding went astray (`detail` says how): a damaged file, or, for format 1,
    more likely other arithmetic than the writer's."""
    if version == FLOAT_VERSION:
        return CodecError(
            f"{name} is format version {FLOAT_VERSION}, whose probabilities were computed in float32: only a computer "
            "with the writer's instruction set and TensorFlow repeats them exactly, and this one did not "
            f"({detail}). Decode it where it was written, or encode the photo again (this version's files "
            "decode anywhere)."
        )
    return CodecError(f"{name} is corrupt: {detail}.")
