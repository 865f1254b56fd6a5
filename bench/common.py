"""Helpers shared by the benchmark scripts: machine description, tables, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as vqvae_face_main.py sets it
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def machine() -> dict:
    """CPU model and core count (from /proc/cpuinfo on Linux), plus the GPUs TensorFlow sees when the
    benchmark uses it (one that does not, such as the PyTorch race, must not load it beside PyTorch)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return {"cpu": model, "cores": os.cpu_count()}
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {"cpu": model, "cores": os.cpu_count(), "gpus": gpus, "tensorflow": tf.__version__}


def sample_images(count: int, size: int = 64, data: str | None = None) -> np.ndarray:
    """`count` uint8 faces from an LFW source (via the decoding cache), or smooth synthetic ones."""
    if data:
        from vqvae_faces.config import DataConfig
        from vqvae_faces.lfw_files import load_faces

        faces = load_faces(DataConfig(path=data, image_size=size), ROOT / "checkpoints" / "data_cache", [])
        reps = -(-count // len(faces))
        return np.concatenate([faces.images] * reps)[:count]
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(2 * np.pi * (x * a + y * b)) for a, b in rng.uniform(0.5, 3, (3, 2))], -1)
    base = (127 + 100 * base).astype(np.float32)
    shifts = rng.normal(0, 10, (count, 1, 1, 3)).astype(np.float32)
    images = np.empty((count, size, size, 3), np.uint8)
    for start in range(0, count, 256):
        images[start : start + 256] = np.clip(base[None] + shifts[start : start + 256], 0, 255)
    return images


def timed(function, repeats: int = 3) -> float:
    """Best wall-clock seconds of `repeats` calls (after one warm-up call)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def report(name: str, rows: list[dict], extra: dict | None = None) -> None:
    """Print `rows` as a table and write them with the machine description to bench/<name>.json."""
    table = pd.DataFrame(rows)
    info = {"date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), **machine(), **(extra or {})}
    print(f"# {name}  ({info['date']}, {info['cpu']}, {info['cores']} cores, TF {info.get('tensorflow')})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    out = Path(__file__).resolve().parent / f"{name}.json"
    out.write_text(json.dumps({**info, "rows": rows}, indent=2))


def codec_benchmark_setup(description: str, faces: int | None, faces_help: str):
    """Parse the arguments of a benchmark of a trained prior run's codec (--out, --run, --config, --data,
    --faces) and load what they name. Returns the arguments, the config, the prior run's name, the --out
    folder, its test faces (uint8, the first --faces of them) and the config overrides (--data)."""
    import argparse

    from vqvae_faces import codec_files, lfw_files
    from vqvae_faces.config import load_config
    from vqvae_faces.run_folder import RunPaths

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder holding checkpoints/<prior run> and its VQ-VAE run")
    parser.add_argument("--run", default=None, help="prior run (default: the first in the config)")
    parser.add_argument("--config", default=str(ROOT / "experiment.json"))
    parser.add_argument("--data", default=None, help="the data the runs were trained on (default: data.path)")
    parser.add_argument("--faces", type=int, default=faces, help=faces_help)
    args = parser.parse_args()
    overrides = [f'data.path="{args.data}"'] if args.data else []
    config = load_config(args.config, overrides)
    prior_run = codec_files.choose_prior_run(config, [args.run] if args.run else None)
    out = Path(args.out)
    loaded = lfw_files.load_faces(config.data, out / "checkpoints" / "data_cache", [ROOT])
    split = lfw_files.load_split(RunPaths.for_run(out, prior_run).split, loaded)
    return args, config, prior_run, out, loaded.subset(split["test"])[: args.faces], overrides
