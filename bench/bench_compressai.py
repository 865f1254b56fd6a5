"""The learned codecs a user would pick instead of `.vqf`: CompressAI's scale hyperprior (Balle et al. 2018,
`bmshj2018-hyperprior`) and mean-scale hyperprior (Minnen et al. 2018, `mbt2018-mean`), trained here from
scratch with CompressAI's own rate-distortion loss (lambda x 255^2 x MSE + bits per pixel, and the
entropy bottleneck's auxiliary loss) on the training faces of a trained VQ-VAE run, for `--minutes` of
training per model and lambda; then real bitstreams of its test faces (`compress`, `decompress` in
another order of batches): bits per face, PSNR, encoding and decoding faces/s. Besides bench/'s JSON, the
points go to OUT/images_saved/compare/compressai.json (with each face's error and a fingerprint of the
test faces), where the next `--compare` of these runs puts them in its table, its curve and report.html.

A face's bits are its y and z strings plus 2 bytes that say where one ends (what a file of it needs
besides the shape, which every face shares). PSNR is measured like the VQ-VAE's: the decoded float
image clipped to [0, 1] against the original.

    pip install -r requirements-compressai.txt
    python bench/bench_compressai.py --out OUT --data lfw-deepfunneled.tgz --run vqvae \
        --minutes 60 --lambdas 0.0067 0.013 0.025

Fair use of the budget: Adam at `--learning-rate` decaying linearly to 0 over the minutes (a short
run's schedule, where CompressAI's examples use 1e-4 for millions of steps), the auxiliary loss with
its own Adam at 1e-3 as in CompressAI's examples, batches of 16 shuffled faces, `--threads` CPU threads.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from common import ROOT, report

from vqvae_faces import lfw_files
from vqvae_faces.atomic_files import write_json_atomically
from vqvae_faces.config import load_config

COMPRESSAI_FILE = "compressai.json"  # = compare.COMPRESSAI_FILE (compare.py loads TensorFlow: not beside PyTorch)

MODELS = {"bmshj2018-hyperprior": "bmshj2018_hyperprior", "mbt2018-mean": "mbt2018_mean"}


def faces_of_run(args):
    """uint8 training and test faces (N, H, W, 3) of the VQ-VAE run `args.run` under `args.out`."""
    overrides = [f'data.path="{args.data}"'] if args.data else []
    config = load_config(args.config, overrides)
    out = Path(args.out)
    faces = lfw_files.load_faces(config.data, out / "checkpoints" / "data_cache", [ROOT])
    # run_folder.RunPaths says the same, but importing it loads TensorFlow, which must not share a process with PyTorch
    split = lfw_files.load_split(out / "checkpoints" / args.run / "split.json", faces)
    return faces.subset(split["train"]), faces.subset(split["test"])


def as_tensor(images):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def train(name: str, lmbda: float, train_images, args):
    """A CompressAI model trained for `args.minutes` with its rate-distortion loss at `lmbda`."""
    import numpy as np
    import torch
    from compressai import zoo
    from compressai.losses import RateDistortionLoss

    torch.manual_seed(args.seed)
    net = getattr(zoo, MODELS[name])(quality=args.quality, metric="mse", pretrained=False)
    main_parameters = [p for n, p in net.named_parameters() if not n.endswith(".quantiles")]
    aux_parameters = [p for n, p in net.named_parameters() if n.endswith(".quantiles")]
    optimizer = torch.optim.Adam(main_parameters, lr=args.learning_rate)
    aux_optimizer = torch.optim.Adam(aux_parameters, lr=1e-3)
    criterion = RateDistortionLoss(lmbda=lmbda)
    rng = np.random.default_rng(args.seed)
    budget, started, steps = args.minutes * 60, time.perf_counter(), 0
    net.train()
    while (elapsed := time.perf_counter() - started) < budget:
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * (1 - elapsed / budget)
        batch = as_tensor(train_images[rng.integers(0, len(train_images), args.batch_size)])
        optimizer.zero_grad()
        aux_optimizer.zero_grad()
        loss = criterion(net(batch), batch)
        loss["loss"].backward()
        torch.nn.utils.clip_grad_norm_(main_parameters, 1.0)
        optimizer.step()
        net.aux_loss().backward()
        aux_optimizer.step()
        steps += 1
    net.update(force=True)
    return net.eval(), steps, float(loss["bpp_loss"].detach()), float(loss["mse_loss"].detach())


def bitstreams(net, test_images, batch_size: int = 64) -> tuple[dict, list[float]]:
    """Bits per face, PSNR and faces/s of real bitstreams of the test faces, decoded in reverse batch order;
    and each face's mean squared error."""
    import numpy as np
    import torch

    coded, started = [], time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(test_images), batch_size):
            coded.append(net.compress(as_tensor(test_images[start : start + batch_size])))
        encode_seconds = time.perf_counter() - started
        decoded, started = {}, time.perf_counter()
        for index in reversed(range(len(coded))):
            decoded[index] = net.decompress(coded[index]["strings"], coded[index]["shape"])["x_hat"].clamp(0, 1)
        decode_seconds = time.perf_counter() - started
    x_hat = torch.cat([decoded[index] for index in range(len(coded))]).permute(0, 2, 3, 1).numpy()
    mse = ((x_hat - test_images / 255.0) ** 2).mean(axis=(1, 2, 3))
    lengths = [sum(len(s[i]) for s in item["strings"]) + 2 for item in coded for i in range(len(item["strings"][0]))]
    return {
        "bits_per_face": 8 * float(np.mean(lengths)),
        "psnr": float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12)))),
        "encode_faces_per_second": len(test_images) / encode_seconds,
        "decode_faces_per_second": len(test_images) / decode_seconds,
    }, mse.astype(float).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder holding the VQ-VAE run's checkpoints (its split)")
    parser.add_argument("--run", default="vqvae", help="the VQ-VAE run whose training and test faces are used")
    parser.add_argument("--config", default=str(ROOT / "experiment.json"))
    parser.add_argument("--data", default=None, help="the data the run was trained on (default: data.path)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.0067, 0.013, 0.025])
    parser.add_argument("--minutes", type=float, default=60.0, help="training minutes per model and lambda")
    parser.add_argument("--quality", type=int, default=3, help="the zoo's quality index: its N and M channels")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    train_images, test_images = faces_of_run(args)
    rows, errors = [], []
    for name in args.models:
        for lmbda in args.lambdas:
            net, steps, bpp, mse = train(name, lmbda, train_images, args)
            row = {"model": name, "lambda": lmbda, "train_minutes": args.minutes, "steps": steps}
            figures, face_errors = bitstreams(net, test_images)
            row.update(train_bpp=bpp, train_psnr=-10 * math.log10(max(mse, 1e-12)), **figures)
            rows.append(row)
            errors.append(face_errors)
            print(row, flush=True)
    write_for_compare(Path(args.out), test_images, [{**row, "mse_per_face": e} for row, e in zip(rows, errors)])
    report("bench_compressai", rows, {**vars(args), "train_faces": len(train_images), "test_faces": len(test_images)})


def write_for_compare(out: Path, test_images, rows: list[dict]) -> Path:
    """OUT/images_saved/compare/compressai.json: `rows` (each with its `mse_per_face`) and the fingerprint of
    the test faces (uint8 (N, H, W, C)) they were measured on, which `compare.compressai_rows` checks. Rows
    already there of the same test faces and another model or lambda are kept, so runs of one lambda each add up."""
    path = out / "images_saved" / "compare" / COMPRESSAI_FILE
    fingerprint = lfw_files.pixels_fingerprint(test_images)
    key = lambda row: (row.get("model", ""), row.get("lambda", 0.0))  # noqa: E731
    if path.is_file():
        try:
            before, new = json.loads(path.read_text()), set(map(key, rows))
            kept = [row for row in before["rows"] if key(row) not in new]
        except (ValueError, KeyError, TypeError) as error:
            print(f"replacing {path}, which cannot be read ({error})")
            before, kept = {}, []
        if kept and before.get("test_faces") == fingerprint:
            rows = sorted(kept + rows, key=key)
            print(f"kept {len(kept)} rows of other models or lambdas from {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically({"test_faces": fingerprint, "rows": rows}, path)
    print(f"--compare of these runs shows them: {path}")
    return path


if __name__ == "__main__":
    main()
