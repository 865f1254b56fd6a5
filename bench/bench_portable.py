"""Do `.vqf` files decode to the same faces on other computers? Held-out test faces are encoded here with
the run's settings, then decoded by `vqvae_face_main.py --decode` in fresh processes that imitate other
computers: XLA limited to older instruction sets, oneDNN off, other thread counts for TensorFlow and
for NumPy's BLAS. Every face must come back pixel for pixel as the codec decodes it here, from the
files and from one `.vqfs` container of them all.

    python bench/bench_portable.py --out OUT [--run prior] [--config experiment.json] [--data D] [--faces 100]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402 (after common, which sets the TensorFlow environment)
from common import ROOT, codec_benchmark_setup, report
from PIL import Image

from vqvae_faces import codec_files  # noqa: E402

ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
ENVIRONMENTS = {
    "default": {},
    "XLA up to AVX (no AVX2, no FMA)": {"XLA_FLAGS": "--xla_cpu_max_isa=AVX"},
    "XLA up to SSE4_2": {"XLA_FLAGS": "--xla_cpu_max_isa=SSE4_2"},
    "oneDNN off": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "one thread (TensorFlow and BLAS)": ONE_THREAD,
    "two threads (TensorFlow and BLAS)": {name: "2" for name in ONE_THREAD},
}


def decoded_elsewhere(arguments: list[str], files: list[Path], folder: Path, environment: dict) -> float:
    """Seconds of a `--decode` of `files` into `folder` by a fresh process with `environment` added."""
    command = [sys.executable, str(ROOT / "vqvae_face_main.py"), *arguments, "--decode", *map(str, files)]
    started = time.perf_counter()
    result = subprocess.run(
        [*command, "--to", str(folder)], capture_output=True, text=True, env={**os.environ, **environment}
    )
    if result.returncode != 0:
        raise SystemExit(f"--decode failed under {environment}:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    args, config, prior_run, out, images, overrides = codec_benchmark_setup(__doc__, 100, "the first N test faces")
    folder = Path(tempfile.mkdtemp(prefix="bench_portable_"))
    with codec_files.opened_codec(config, prior_run, out) as codec:
        encoded = codec.encode(images, config.runs[prior_run].codec.rate_lambda)
        expected = codec.pixels(encoded.grids)
    files = [folder / f"face{index:04d}.vqf" for index in range(len(images))]
    for path, data in zip(files, encoded.files):
        path.write_bytes(data)
    (folder / "all.vqfs").write_bytes(encoded.container)
    arguments = [
        "--out",
        str(out),
        "--config",
        args.config,
        "--run",
        prior_run,
        *sum((["--set", o] for o in overrides), []),
    ]
    rows = []
    for name, environment in ENVIRONMENTS.items():
        target = folder / f"decoded-{len(rows)}"
        seconds = decoded_elsewhere(arguments, [*files, folder / "all.vqfs"], target, environment)
        same = [
            np.array_equal(np.asarray(Image.open(target / f"{path.stem}.png")), face)
            for path, face in zip(files, expected)
        ]
        in_container = [
            np.array_equal(np.asarray(Image.open(target / f"all-{index + 1:0{len(str(len(expected)))}d}.png")), face)
            for index, face in enumerate(expected)
        ]
        rows.append(
            {
                "decoded by": name,
                "faces": len(images),
                "files, identical faces": int(np.sum(same)),
                "container, identical faces": int(np.sum(in_container)),
                "seconds": seconds,
            }
        )
    report("bench_portable", rows, {**vars(args), "test_faces": len(images)})


if __name__ == "__main__":
    main()
