"""Face photos as files: reading, decoding, cropping (or aligning), caching, and the identity-disjoint split.

Sources, in order of preference:
  * `data.path` / `--data`: a folder or a `.tgz`/`.zip` archive (read member by member without extracting
    anything to disk) in LFW's layout (`<root>/<Person_Name>/<Person_Name>_0001.jpg`, optionally one level
    down), or flat (images in one folder: one identity per file), or named in a CSV (`data.identities`);
  * a `lfw-deepfunneled` folder or `lfw-deepfunneled.tgz` beside the script or in the
    current folder;
  * the 100 real LFW face crops bundled with scikit-image (`skimage.data.lfw_subset()`,
    25x25 grayscale), so the program runs anywhere.

Decoded images are kept as uint8 (N, S, S, C) arrays and cached as `.npz`; the
scaling to [0, 1] float32 and the augmentation happen on the fly in `pipeline`.
TensorFlow is imported only when an image needs the face detector (`face_alignment`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import json
import logging
import os
import posixpath
import stat
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from vqvae_faces.atomic_files import save_npz_atomically, write_json_atomically
from vqvae_faces.config import DataConfig
from vqvae_faces.errors import DataError
from vqvae_faces.face_alignment import DetectorOnDemand, detect_and_align, needs_detection

log = logging.getLogger("vqvae_faces.data")

BUNDLED_DESCRIPTION = "scikit-image lfw_subset (100 bundled LFW face crops, 25x25 grayscale)"
DEFAULT_SOURCE_NAMES = ("lfw-deepfunneled", "lfw-deepfunneled.tgz", "lfw-deepfunneled.tar.gz")
ATTRIBUTES_FILE = "lfw_attributes.txt"
CACHE_FORMAT_VERSION = 2
ARCHIVE_SUFFIXES = (".tgz", ".tar.gz", ".tar", ".zip")
# The only Pillow decoders that may open a data file: what LFW (JPEG) and common exports use.
# Naming them keeps every other decoder (EPS through Ghostscript, TIFF, ...) unreachable.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
DECODES_IN_FLIGHT_PER_WORKER = 4
PROGRESS_EVERY = 5000  # images between progress lines while a source is decoded (the detector takes a while)
UNSAFE_MEMBER = "unsafe archive member (link, absolute path, '..' or encrypted)"
# <wrapper>/<person>/<image>: a file deeper than this is skipped.
MAX_DEPTH = 3
TOO_DEEP = f"deeper than {MAX_DEPTH} levels (<wrapper>/<person>/<image>)"
OUTSIDE_LINK = "link pointing outside the data folder, or broken"


@dataclass
class FaceSet:
    """Decoded, preprocessed faces.

    images: (N, S, S, C) uint8, C is 1 (grayscale source) or 3.
    names: (N,) relative file names `Person_Name/Person_Name_0001.jpg`, sorted.
    persons: (N,) identity of each image (the split groups).
    """

    images: np.ndarray
    names: np.ndarray
    persons: np.ndarray
    description: str
    skipped: dict[str, int] = field(default_factory=dict)
    attributes: Optional[pd.DataFrame] = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: np.ndarray) -> np.ndarray:
        return self.images[indices]


# ---------------------------------------------------------------- sources


BUNDLED = "bundled"


def resolve_source(path: Optional[str], search_dirs: list[Path]) -> Optional[Path]:
    """The LFW folder or archive to read, or None for the bundled subset.

    `path` None searches `search_dirs` for `DEFAULT_SOURCE_NAMES`; `"bundled"`
    asks for the bundled faces whatever lies there.
    """
    if path == BUNDLED:
        return None
    if path:
        source = Path(path).expanduser()
        if not source.exists():
            raise DataError(
                f"data path {str(source)!r} does not exist: expected an LFW folder "
                "(<Person_Name>/<Person_Name>_0001.jpg) or the lfw-deepfunneled.tgz archive."
            )
        if source.is_file() and not source.name.endswith(ARCHIVE_SUFFIXES):
            raise DataError(f"data path {str(source)!r} is a file but not a .tgz/.tar.gz/.tar/.zip archive.")
        return source
    for folder in search_dirs:
        for name in DEFAULT_SOURCE_NAMES:
            candidate = folder / name
            if candidate.exists():
                return candidate
    return None


def _safe_member_name(name: str) -> Optional[str]:
    """Normalised archive member name, or None if it could escape the archive root."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return None
    normalised = posixpath.normpath(name.replace("\\", "/"))
    if normalised.startswith("..") or "/../" in f"/{normalised}/":
        return None
    return normalised


def _iter_archive(path: Path, skipped: dict[str, int], max_bytes: int) -> Iterator[tuple[str, bytes]]:
    """Yield (relative name, bytes) for the regular members of a tar or zip archive, at most `MAX_DEPTH`
    levels deep.

    Links, devices, absolute names and names with `..` are skipped and counted, and so are members
    larger than `max_bytes` (judged by the header, before anything is read); nothing is written to disk.
    """
    try:
        if zipfile.is_zipfile(path):
            yield from _iter_zip(path, skipped, max_bytes)
            return
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                name = _safe_member_name(member.name)
                if name is None or member.issym() or member.islnk():
                    _count(skipped, UNSAFE_MEMBER)
                    continue
                if not member.isfile():
                    if not member.isdir():
                        _count(skipped, UNSAFE_MEMBER)
                    continue
                if _member_fits(name, member.size, skipped, max_bytes):
                    handle = archive.extractfile(member)
                    if handle is not None:
                        yield name, handle.read()
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"cannot read archive {str(path)!r}: {exc}") from None


def _iter_zip(path: Path, skipped: dict[str, int], max_bytes: int) -> Iterator[tuple[str, bytes]]:
    """`_iter_archive` for a zip: links (Unix mode in the external attributes) and encrypted members are
    skipped and counted; a member is read to at most `max_bytes` + 1 bytes whatever its header says."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            name = _safe_member_name(info.filename)
            if name is None or stat.S_ISLNK(info.external_attr >> 16) or info.flag_bits & 0x1:
                _count(skipped, UNSAFE_MEMBER)
                continue
            if _member_fits(name, info.file_size, skipped, max_bytes):
                with archive.open(info) as handle:
                    data = handle.read(max_bytes + 1)
                if len(data) > max_bytes:
                    _count(skipped, f"larger than max_file_bytes={max_bytes}")
                    continue
                yield name, data


def _member_fits(name: str, size: int, skipped: dict[str, int], max_bytes: int) -> bool:
    """Whether an archive member is read: not the attributes table, not too deep, not too large."""
    parts = name.split("/")
    if parts[-1] == ATTRIBUTES_FILE:
        return False
    if len(parts) > MAX_DEPTH:
        _count(skipped, TOO_DEEP)
        return False
    if size > max_bytes:
        _count(skipped, f"larger than max_file_bytes={max_bytes}")
        return False
    return True


def _outside(path: Path, real_root: Path) -> bool:
    """Whether a link leads outside `real_root` or nowhere."""
    return path.is_symlink() and (not path.exists() or not path.resolve().is_relative_to(real_root))


def _iter_folder(root: Path, skipped: dict[str, int], max_bytes: int) -> Iterator[tuple[str, bytes]]:
    """Yield (relative name, bytes) for the files under `root`, at most `MAX_DEPTH` levels deep, in name
    order.

    Links (to folders or files) that lead outside the data folder or nowhere, files larger than
    `max_bytes` (judged before reading) and files that cannot be read are skipped and counted.
    """
    real_root = root.resolve()

    def walk(folder: Path, prefix: str, depth: int) -> Iterator[tuple[str, bytes]]:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            _count(skipped, "unreadable folder")
            return
        for entry in entries:
            if _outside(entry, real_root):
                _count(skipped, OUTSIDE_LINK)
                continue
            if entry.is_dir():
                if depth + 1 < MAX_DEPTH:
                    yield from walk(entry, f"{prefix}{entry.name}/", depth + 1)
                else:
                    _count(skipped, TOO_DEEP)
                continue
            if not entry.is_file() or entry.name == ATTRIBUTES_FILE:
                continue
            try:
                if entry.stat().st_size > max_bytes:
                    _count(skipped, f"larger than max_file_bytes={max_bytes}")
                    continue
                data = entry.read_bytes()
            except OSError:
                _count(skipped, "unreadable file")
                continue
            yield prefix + entry.name, data

    yield from walk(root, "", 0)


def _fingerprint(source: Path) -> str:
    """Cheap identity of a source: path, sizes and modification times."""
    digest = hashlib.sha256(str(source.resolve()).encode())
    if source.is_file():
        stat = source.stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                stat = os.stat(path) if os.path.exists(path) else os.lstat(path)  # a broken link has no target
                digest.update(f"{dirpath}/{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- decoding


def _count(counter: dict[str, int], reason: str) -> None:
    counter[reason] = counter.get(reason, 0) + 1


def _open_picture(data: bytes, settings: DataConfig) -> Image.Image:
    """The decoded image, upright (EXIF orientation applied), transparency laid on white, in mode "L" for
    grayscale sources and "RGB" for all others (CMYK, palette, ...). Raises `DataError` with the reason an
    image is unusable."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise DataError(f"larger than max_image_pixels={settings.max_image_pixels}")
            image.load()
            picture = ImageOps.exif_transpose(image)
            mode = "L" if picture.mode in ("L", "1", "I;16", "I", "LA") else "RGB"
            if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
                rgba = picture.convert("RGBA")
                picture = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            return picture.convert(mode)
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise DataError("not a readable image") from None
    except DataError:
        raise
    except Exception:  # a damaged file can make a decoder raise almost anything (struct.error, IndexError, ...)
        raise DataError("corrupt or truncated image") from None


def _crop(frame: Image.Image, border: int, image_size: int) -> np.ndarray:
    """`border` pixels cut from each side of `frame`, the rest resized to `image_size`; (S, S, C) uint8."""
    face = frame.crop((border, border, frame.width - border, frame.height - border))
    array = np.asarray(face.resize((image_size, image_size), Image.BILINEAR), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def decode_face(data: bytes, settings: DataConfig, detector: Optional[DetectorOnDemand] = None) -> np.ndarray | str:
    """One training image as a face: (S, S, C) uint8 with C = 1 for grayscale sources and 3 otherwise, or
    the reason it is skipped.

    A `source_size` square gets the fixed crop (`crop_border` each side) and the resize; an image of another
    size is aligned into such a square by the face detector when `face_alignment` says so, else skipped.
    """
    try:
        picture = _open_picture(data, settings)
        size = settings.source_size
        if needs_detection(settings.face_alignment, picture.size, size):
            picture, _ = detect_and_align(picture, settings, (detector or DetectorOnDemand())())
        elif size is not None and picture.size != (size, size):
            return f"not {size}x{size} pixels"
    except DataError as error:
        return str(error)
    if min(picture.size) <= 2 * settings.crop_border:
        return f"too small for crop_border={settings.crop_border}"
    return _crop(picture, settings.crop_border, settings.image_size)


def decode_photo(
    data: bytes, settings: DataConfig, channels: int, detector: Optional[DetectorOnDemand] = None
) -> tuple[np.ndarray, list[str]]:
    """A user's photo as the models see faces: (S, S, channels) uint8, and notes for the user (how it was
    framed, what may make it code worse).

    `face_alignment` decides: an LFW-style crop (`source_size` square) gets the training crop and resize;
    the detector aligns any other photo (`"auto"`, `"detect"`); under `"lfw"` another photo is cut to its
    centre square and cropped by LFW's fraction, right only for a face centred and framed like LFW's.
    A `DataError` when the bytes are not an image this program reads, or no face is found.
    """
    picture = _open_picture(data, settings).convert("L" if channels == 1 else "RGB")
    width, height = picture.size
    source = settings.source_size or min(width, height)
    if needs_detection(settings.face_alignment, picture.size, settings.source_size):
        frame, notes = detect_and_align(picture, settings, (detector or DetectorOnDemand())())
        return _crop(frame, settings.crop_border, settings.image_size), notes
    notes = []
    if (width, height) != (source, source):
        notes.append(
            f"{width}x{height} pixels, not a {source}x{source} LFW-style crop: its centre square is cropped by "
            f"{settings.crop_border / source:.0%} each side as LFW faces are (data.face_alignment=lfw); faces "
            "framed otherwise code worse, and face_alignment=auto finds the face"
        )
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    border = round(side * settings.crop_border / source)
    return _crop(picture.crop((left, top, left + side, top + side)), border, settings.image_size), notes


def _decode_all(members: Iterator[tuple[str, bytes]], settings: DataConfig, skipped: dict[str, int]):
    """Decode every member on a thread pool, in order.

    At most `DECODES_IN_FLIGHT_PER_WORKER` x workers files are read ahead of
    the decoded results, so memory stays flat however large the source is.
    """
    names, faces = [], []
    workers = min(8, os.cpu_count() or 1)
    detector = DetectorOnDemand()
    pending: collections.deque = collections.deque()
    started, done = time.monotonic(), 0

    def collect_oldest():
        nonlocal done
        name, future = pending.popleft()
        result = future.result()
        if isinstance(result, str):
            _count(skipped, result)
        else:
            names.append(name)
            faces.append(result)
        done += 1
        if done % PROGRESS_EVERY == 0:
            log.info("%d images read (%.0f per second)", done, done / (time.monotonic() - started))

    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for name, data in members:
            pending.append((name, pool.submit(decode_face, data, settings, detector)))
            if len(pending) >= workers * DECODES_IN_FLIGHT_PER_WORKER:
                collect_oldest()
        while pending:
            collect_oldest()
    return names, faces


def _stack_faces(faces: list[np.ndarray]) -> np.ndarray:
    """Stack; a mixed grayscale/colour set is stored as colour for all images."""
    if any(face.shape[-1] == 3 for face in faces):
        faces = [np.repeat(f, 3, axis=-1) if f.shape[-1] == 1 else f for f in faces]
    return np.stack(faces)


def _read_attributes(source: Path, names: list[str]) -> Optional[pd.DataFrame]:
    """Join lfw_attributes.txt (person, imagenum, 73 attributes) when it exists."""
    folder = source if source.is_dir() else source.parent
    candidates = [folder / ATTRIBUTES_FILE, folder.parent / ATTRIBUTES_FILE]
    attribute_file = next((c for c in candidates if c.is_file()), None)
    if attribute_file is None:
        return None
    try:
        with open(attribute_file, encoding="utf-8") as handle:
            handle.readline()
            header = [h for h in handle.readline().lstrip("#").strip().split("\t") if h]
        table = pd.read_csv(attribute_file, sep="\t", skiprows=2, header=None, names=header)
        person = table["person"].str.replace(" ", "_")
        table.index = person + "/" + person + "_" + table["imagenum"].astype(int).map("{:04d}".format) + ".jpg"
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
        log.warning("ignoring %s: cannot parse it (%s)", attribute_file, str(exc))
        return None
    joined = table.drop(columns=["person", "imagenum"]).reindex(names)
    log.info(
        "attributes: %d of %d images have entries in %s",
        int(joined.notna().any(axis=1).sum()),
        len(names),
        attribute_file,
    )
    return joined


def load_bundled_faces(settings: DataConfig) -> FaceSet:
    """The 100 LFW faces of scikit-image, resized to `image_size`, 1 channel.

    They are already tight 25x25 crops, so no border is cut. Identities are not
    shipped with them, so each image is its own split group.
    """
    from skimage.data import lfw_subset

    crops = lfw_subset()[:100]
    faces = []
    for crop in crops:
        image = Image.fromarray(np.round(crop * 255).astype(np.uint8), mode="L")
        image = image.resize((settings.image_size, settings.image_size), Image.BILINEAR)
        faces.append(np.asarray(image, dtype=np.uint8)[..., None])
    names = np.array([f"lfw_subset/face_{i:03d}.png" for i in range(len(faces))])
    return FaceSet(np.stack(faces), names, names.copy(), BUNDLED_DESCRIPTION)


def _cache_path(cache_dir: Path, source: Path, settings: DataConfig) -> Path:
    key = json.dumps(
        {
            "version": CACHE_FORMAT_VERSION,
            "source": _fingerprint(source),
            "image_size": settings.image_size,
            "crop_border": settings.crop_border,
            "source_size": settings.source_size,
            "max_image_pixels": settings.max_image_pixels,
            "max_file_bytes": settings.max_file_bytes,
            "face_alignment": settings.face_alignment,
            "identities": settings.identities,
            "identity_table": _fingerprint(Path(settings.identities)) if settings.identities.endswith(".csv") else None,
        },
        sort_keys=True,
    )
    return cache_dir / f"faces-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def load_faces(settings: DataConfig, cache_dir: Path, search_dirs: list[Path]) -> FaceSet:
    """Load, preprocess and cache the faces described by `settings`."""
    source = resolve_source(settings.path, search_dirs)
    if source is None:
        log.info(
            "no LFW data given: using the %s. For real LFW, download lfw-deepfunneled.tgz and pass "
            "--data PATH (folder or archive) or set data.path in experiment.json.",
            BUNDLED_DESCRIPTION,
        )
        return load_bundled_faces(settings)

    cache_file = _cache_path(cache_dir, source, settings)
    if cache_file.is_file():
        try:
            faces = _read_cache(cache_file)
            log.info("loaded %d faces from cache %s", len(faces), cache_file)
            faces.attributes = _read_attributes(source, list(faces.names))
            return faces
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("cache %s is unreadable (%s); rebuilding it", cache_file, exc or type(exc).__name__)

    skipped: dict[str, int] = {}
    log.info("decoding images from %s ...", source)
    if source.is_dir():
        members = _iter_folder(source, skipped, settings.max_file_bytes)
    else:
        members = _iter_archive(source, skipped, settings.max_file_bytes)
    names, faces = _decode_all(members, settings, skipped)
    names, persons, keep, description = _identities(names, settings.identities, source, skipped)
    faces = [faces[index] for index in keep]
    _report_skipped(skipped, source)
    if not faces:
        raise DataError(
            f"no usable images in {str(source)!r}: expected <Person_Name>/<Person_Name>_0001.jpg files (LFW "
            "layout), a flat folder of images, or images named in a CSV (data.identities), with faces of "
            f"{settings.source_size or 'any'}x{settings.source_size or 'any'} pixels or found by face_alignment."
        )
    face_set = FaceSet(
        images=_stack_faces(faces),
        names=np.array(names),
        persons=np.array(persons),
        description=description,
        skipped=skipped,
    )
    _write_cache(cache_file, face_set)
    face_set.attributes = _read_attributes(source, names)
    log.info(
        "decoded %d faces of %d people from %s (cached in %s)",
        len(face_set),
        len(set(face_set.persons)),
        source,
        cache_file,
    )
    return face_set


def _identities(
    names: list[str], identities: str, source: Path, skipped: dict[str, int]
) -> tuple[list[str], list[str], list[int], str]:
    """Each decoded image's name (without the wrapper folders all of them share), identity and index into `names`
    (the images kept), and a description of the data.

    `identities`: "folders" (the folder holding an image names its person: LFW's layout), "files" (each image
    its own identity), "auto" ("files" when all images sit in one folder, else "folders"), or the path of a
    CSV with columns `file` (as named here, or just its file name) and `identity`.
    """
    parts = [name.split("/") for name in names]
    shared = 0  # leading folders all names share, short of the one holding each image
    while parts and all(len(p) > shared + 2 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    names = ["/".join(p[shared:]) for p in parts]
    if identities == "auto":
        identities = "files" if len({name.rpartition("/")[0] for name in names}) == 1 else "folders"
    if identities == "folders":
        keep = [i for i, name in enumerate(names) if "/" in name]
        for _ in range(len(names) - len(keep)):
            _count(skipped, "file outside the <Person>/<image> layout")
        kept = [names[i] for i in keep]
        return kept, [name.rsplit("/", 1)[0] for name in kept], keep, f"LFW-layout data at {source}"
    if identities == "files":
        log.warning(
            "%s: identities unknown (one folder of images), so the split is by file and the same person may sit "
            "in training and test; name each file's identity in a CSV (data.identities) for an honest test split",
            source,
        )
        return names, list(names), list(range(len(names))), f"images at {source} (one identity per file)"
    table = _read_identity_table(Path(identities))
    by_file_name = collections.Counter(name.rsplit("/", 1)[-1] for name in names)
    keep, persons = [], []
    for index, name in enumerate(names):
        base = name.rsplit("/", 1)[-1]
        person = table.get(name, table.get(base) if by_file_name[base] == 1 else None)
        if person is None:
            _count(skipped, f"not named in {identities}")
            continue
        keep.append(index)
        persons.append(person)
    return [names[i] for i in keep], persons, keep, f"images at {source} (identities from {identities})"


def _read_identity_table(path: Path) -> dict[str, str]:
    """file -> identity from a CSV with columns `file` and `identity`; a `DataError` naming what is wrong."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read the identities CSV {str(path)!r}: {error}") from None
    if not {"file", "identity"} <= set(table.columns):
        raise DataError(
            f"the identities CSV {str(path)!r} needs columns 'file' and 'identity', has {list(table.columns)}"
        )
    files = table["file"].str.replace("\\", "/", regex=False)
    return dict(zip(files, table["identity"]))


def _report_skipped(skipped: dict[str, int], source: Path) -> None:
    if skipped:
        details = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        log.warning("skipped %d files in %s: %s", sum(skipped.values()), source, details)


def _write_cache(path: Path, faces: FaceSet) -> None:
    save_npz_atomically(
        path,
        images=faces.images,
        names=faces.names,
        persons=faces.persons,
        description=np.array(faces.description),
        skipped=np.array(json.dumps(faces.skipped)),
    )


def _read_cache(path: Path) -> FaceSet:
    with np.load(path, allow_pickle=False) as cached:
        return FaceSet(
            images=cached["images"],
            names=cached["names"],
            persons=cached["persons"],
            description=str(cached["description"]),
            skipped=json.loads(str(cached["skipped"])),
        )


# ---------------------------------------------------------------- split


def split_by_person(persons: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Identity-disjoint train/val/test indices (fractions are of people).

    Returns a dict of sorted index arrays. The same inputs always give the same
    split; no person appears in two splits.
    """
    groups = np.asarray(persons)
    if len(set(groups)) < 3:
        raise DataError(
            f"the data has {len(set(groups))} people; an identity-disjoint train/val/test split needs at least 3."
        )
    from sklearn.model_selection import GroupShuffleSplit  # imported here: it takes a second to load

    indices = np.arange(len(groups))
    outer = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
    train_val, test = next(outer.split(indices, groups=groups))
    inner_fraction = val_fraction / (1.0 - test_fraction)
    inner = GroupShuffleSplit(n_splits=1, test_size=inner_fraction, random_state=seed + 1)
    train, val = next(inner.split(train_val, groups=groups[train_val]))
    return {
        "train": np.sort(train_val[train]),
        "val": np.sort(train_val[val]),
        "test": np.sort(test),
    }


SPLIT_PARTS = ("train", "val", "test")


def images_fingerprint(faces: FaceSet, indices: np.ndarray) -> str:
    """SHA-256 (hex, 16 digits) of the decoded images at `indices`, in that order.

    Two LFW variants share file names (`lfw` and `lfw-deepfunneled`), so names
    alone cannot tell which images a split was made of; the pixels can.
    """
    return pixels_fingerprint(faces.images[index] for index in indices)


def pixels_fingerprint(images) -> str:
    """SHA-256 (hex, 16 digits) of uint8 images (an (N, H, W, C) array or an iterable of (H, W, C)), in order:
    which faces a figure was measured on."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(image.tobytes())
    return digest.hexdigest()[:16]


def save_split(path: Path, faces: FaceSet, split: dict[str, np.ndarray]) -> None:
    """Persist the file names of each split (JSON), with a fingerprint of their images, for evaluation."""
    record = {"dataset": faces.description}
    record.update({part: faces.names[idx].tolist() for part, idx in split.items()})
    record["fingerprint"] = images_fingerprint(faces, np.concatenate([split[part] for part in SPLIT_PARTS]))
    write_json_atomically(record, path)


def load_split(path: Path, faces: FaceSet) -> dict[str, np.ndarray]:
    """Indices into `faces` of a split saved by `save_split`.

    A `DataError` when the file is missing or corrupt, or when `faces` lacks
    the named images or has other images under those names (another dataset).
    """
    if not path.is_file():
        raise DataError(f"no saved split at {str(path)!r}: train this run first.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        names = {part: list(map(str, record[part])) for part in SPLIT_PARTS}
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise DataError(
            f"the saved split {str(path)!r} is corrupt ({error}), so the run's test faces are unknown. "
            "Restore it, evaluate on other faces with --test-data PATH, or retrain the run with --retrain."
        ) from None
    position = {name: i for i, name in enumerate(faces.names)}
    split = {}
    for part in SPLIT_PARTS:
        missing = [name for name in names[part] if name not in position]
        if missing:
            raise DataError(
                f"the saved split {str(path)!r} names {len(missing)} {part} images that are not "
                f"in {faces.description} (e.g. {missing[0]!r}): evaluate with the data the run "
                "was trained on."
            )
        split[part] = np.array([position[name] for name in names[part]], dtype=np.int64)
    recorded = record.get("fingerprint")
    if recorded is not None:
        found = images_fingerprint(faces, np.concatenate([split[part] for part in SPLIT_PARTS]))
        if found != recorded:
            raise DataError(
                f"the images named in {str(path)!r} differ from those in {faces.description} (fingerprint "
                f"{found}, recorded {recorded}): the run was trained on {record.get('dataset')}. Use that data, "
                "or evaluate on other faces with --test-data PATH."
            )
    return split
