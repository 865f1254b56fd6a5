"""Write `vqvae_faces/models/face_detector.npz`: MTCNN's trained weights (the `mtcnn` 1.0.0 wheel) as plain arrays.

    python experiments/export_detector.py [--to vqvae_faces/models/face_detector.npz]

The `mtcnn` package stores its weights as joblib pickles, and the program never unpickles anything, so this
script does it once, on files whose SHA-256 it checks first (the ones in the published 1.0.0 wheel), and writes
each network's weight list as `<network>/<index>` arrays; `face_alignment.FaceDetector` reads them back into
the package's own networks.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import joblib  # noqa: E402
import mtcnn  # noqa: E402
import numpy as np  # noqa: E402

from vqvae_faces.atomic_files import save_npz_atomically  # noqa: E402

WHEEL_WEIGHTS_SHA256 = {
    "pnet": "ea6b0c3e685ebee3165326ad6484acc95f2ef78f1c94fbf40a55704fa989f7b5",
    "rnet": "cb00e6460f3c98b0bfafaba3c0a0ded4bdf6e62cee7174d969e8670d7e757fee",
    "onet": "94f6ea2f4cf985275ee958cdd762d17b6009348a4fb9d8c6be39ba73ffd22ca3",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", default=str(ROOT / "vqvae_faces" / "models" / "face_detector.npz"))
    args = parser.parse_args()
    folder = Path(mtcnn.__file__).resolve().parent / "assets" / "weights"
    arrays = {}
    for network, expected in WHEEL_WEIGHTS_SHA256.items():
        path = folder / f"{network}.lz4"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            sys.exit(f"{path}: SHA-256 {digest}, not the mtcnn 1.0.0 wheel's {expected}; not unpickling it.")
        for index, weight in enumerate(joblib.load(path)):
            arrays[f"{network}/{index}"] = np.asarray(weight, np.float32)
    save_npz_atomically(Path(args.to), compressed=True, **arrays)
    print(f"{args.to}: {len(arrays)} arrays, {Path(args.to).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
