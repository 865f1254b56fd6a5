"""Training speed with TensorFlow's oneDNN CPU kernels off and on.

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at import, and leaves oneDNN off on CPUs
other than recent Intel ones; `vqvae_face_main.py` turns it on. Each measurement is a
fresh process (train_step of the shipped "vqvae" run, synthetic 64x64 faces, no input
pipeline); the two settings alternate for `--rounds` rounds and the table gives the
median of each and their ratio, so a slow patch of a shared machine hits both.

    python experiments/bench_onednn.py [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from common import ROOT, report  # noqa: E402


def measure(steps: int) -> float:
    """Train-step images/s of the shipped "vqvae" run in this process."""
    from bench_trunk import compiled_step, images_per_second
    from common import sample_images

    from vqvae_faces.config import load_config

    run = load_config(ROOT / "experiment.json", [], ["vqvae"]).runs["vqvae"]
    step, batch, _ = compiled_step(run, sample_images(run.batch_size, 64))
    return images_per_second(step, batch, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.steps)))
        return
    rates = {"0": [], "1": []}
    for _ in range(args.rounds):
        for flag in rates:
            env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": flag}
            command = [sys.executable, __file__, "--worker", "--steps", str(args.steps)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            rates[flag].append(float(done.stdout.strip().splitlines()[-1]))
    medians = {flag: statistics.median(values) for flag, values in rates.items()}
    rows = [
        {"oneDNN": name, "images_per_s": medians[flag], "ratio_to_off": medians[flag] / medians["0"]}
        for flag, name in (("0", "off"), ("1", "on"))
    ]
    report("onednn", rows, {"rounds": rates})


if __name__ == "__main__":
    main()
