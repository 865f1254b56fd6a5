"""Where MTCNN puts the five landmarks in deepfunneled LFW crops, and how well the detector path reproduces the
fixed crop (`face_alignment.LFW_LANDMARKS` and the alignment figures of the README).

    python experiments/face_template.py template --data LFW.tgz --split OUT/checkpoints/vqvae/split.json
    python experiments/face_template.py check --data ... --split ... [--models vqvae_faces/models]

`template` averages the landmarks of the face nearest the centre over the split's training images. `check`
aligns the split's test images (people the template never saw) both ways and reports: the share of faces
found, the share whose detector crop lies within 2 pixels (of the 64x64 face) of the fixed crop at every
corner, and the codec's PSNR (nearest codes, integer decoder) on both crops.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from vqvae_faces import lfw_files  # noqa: E402
from vqvae_faces.config import DataConfig  # noqa: E402
from vqvae_faces.errors import DataError  # noqa: E402
from vqvae_faces.face_alignment import LFW_SOURCE_SIZE, DetectorOnDemand, locate  # noqa: E402


def read_images(data: Path, names: list[str]) -> dict[str, bytes]:
    """The bytes of `names` (`Person/file.jpg`) from an LFW-layout archive or folder."""
    wanted, found = set(names), {}
    if data.is_dir():
        for name in names:
            found[name] = next(data.rglob(name.split("/")[-1])).read_bytes()
        return found
    with tarfile.open(data) as archive:
        for member in archive:
            name = "/".join(member.name.split("/")[-2:])
            if member.isfile() and name in wanted:
                found[name] = archive.extractfile(member).read()
    return found


def template(images: dict[str, bytes], detector) -> None:
    centre = np.array([LFW_SOURCE_SIZE / 2, LFW_SOURCE_SIZE / 2])
    marks = []
    for data in images.values():
        picture = lfw_files._open_picture(data, DataConfig()).convert("RGB")
        faces = detector().faces(np.asarray(picture))
        if faces:
            marks.append(min(faces, key=lambda f: np.linalg.norm(f.landmarks.mean(0) - centre)).landmarks)
    marks = np.stack(marks)
    print(f"{len(marks)} of {len(images)} faces found; mean landmarks (x, y), then their standard deviation:")
    print(np.array2string(marks.mean(0), precision=2, separator=", "))
    print(np.array2string(marks.std(0), precision=2, separator=", "))


def check(images: dict[str, bytes], detector, models: Path) -> None:
    settings = DataConfig(image_size=64)
    fixed, aligned, shifts = [], [], []
    for data in images.values():
        face, _ = lfw_files.decode_photo(data, settings, 3, detector)
        try:
            detected, _ = lfw_files.decode_photo(data, DataConfig(image_size=64, face_alignment="detect"), 3, detector)
        except DataError:
            continue
        transform, _ = locate(lfw_files._open_picture(data, settings), 250, detector())
        low, high = settings.crop_border, 250 - settings.crop_border
        corners = np.array([[low, low, 1], [high, low, 1], [low, high, 1], [high, high, 1]], np.float64)
        shift = np.linalg.norm((corners @ transform.T - corners)[:, :2], axis=1).max() * 64 / (high - low)
        fixed.append(face)
        aligned.append(detected)
        shifts.append(shift)
    shifts = np.array(shifts)
    print(f"found: {len(shifts)} of {len(images)} ({len(shifts) / len(images):.1%})")
    print(
        f"corner shift (64x64 pixels): median {np.median(shifts):.2f}, 95th percentile "
        f"{np.percentile(shifts, 95):.2f}; within 2 px: {np.mean(shifts <= 2):.1%}"
    )
    if models is None:
        return
    from vqvae_faces.codec_files import opened_codec
    from vqvae_faces.config import load_config

    config = load_config(str(ROOT / "experiment.json"), [])
    with opened_codec(config, "prior", models, locked=False) as codec:
        for label, faces in (("fixed crop", fixed), ("detector crop", aligned)):
            faces = np.stack(faces)
            grids, bits = codec.choose_tokens(faces)
            pixels = codec.pixels(grids).astype(np.float64)
            mse = ((pixels - faces) ** 2).reshape(len(faces), -1).mean(1)
            psnr = np.mean(10 * np.log10(255.0**2 / mse))
            print(f"codec on the {label}: {psnr:.2f} dB, {bits.mean():.0f} bits per face ({len(faces)} faces)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["template", "check"])
    parser.add_argument("--data", required=True, help="LFW deepfunneled archive or folder")
    parser.add_argument("--split", required=True, help="a run's split.json (training and test people)")
    parser.add_argument("--faces", type=int, default=600, help="images drawn at random from the part used")
    parser.add_argument("--models", default=None, help="an --out folder with trained vqvae and prior runs (check)")
    args = parser.parse_args()
    split = json.loads(Path(args.split).read_text())
    names = split["train" if args.action == "template" else "test"]
    names = sorted(np.random.default_rng(0).choice(names, min(args.faces, len(names)), replace=False).tolist())
    images = read_images(Path(args.data), names)
    detector = DetectorOnDemand()
    if args.action == "template":
        template(images, detector)
    else:
        check(images, detector, Path(args.models) if args.models else None)


if __name__ == "__main__":
    main()
