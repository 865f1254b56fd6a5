"""Write the ready-made models (`vqvae_faces/models/`) from trained runs: each run's `best.keras` without its
optimizer's state (the weights the codec and the sampler read, nothing else), and its `config.json`.

    python experiments/export_models.py --out OUT [--runs vqvae prior] [--names vqvae prior] [--to vqvae_faces/models]

`--names` exports the runs under other names (the ready-made models are read as the default config's `vqvae`
and `prior`): each `config.json` gets its new `run_name`, and a prior's `tokens_from` the new name of its VQ-VAE.

The target is laid out as an --out folder (`checkpoints/<run>/best.keras`), so the program reads it as it
reads a trained one. Its README (the training command, date, data and figures) is written by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from vqvae_faces.model_settings import load_model  # noqa: E402


def export_run(source: Path, target: Path, names: dict[str, str]) -> None:
    """`source`'s best.keras as an uncompiled model of the same class, config and weights, into `target`,
    with its config.json, run names renamed by `names`."""
    trained = load_model(source / "best.keras")
    model = type(trained).from_config(trained.get_config())
    if hasattr(trained, "grid_size"):  # a prior: built by a call on one grid
        model(np.zeros((1, *trained.grid_size), np.int32))
    else:
        model.build(tuple(trained.get_build_config()["input_shape"]))
    model.set_weights(trained.get_weights())
    target.mkdir(parents=True, exist_ok=True)
    model.save(target / "best.keras")
    config = json.loads((source / "config.json").read_text())
    config["run_name"] = names.get(config["run_name"], config["run_name"])
    if config["run"].get("tokens_from"):
        config["run"]["tokens_from"] = names.get(config["run"]["tokens_from"], config["run"]["tokens_from"])
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for before, after in zip(trained.get_weights(), load_model(target / "best.keras").get_weights()):
        assert np.array_equal(before, after), "the exported weights differ from the trained ones"
    print(f"{target / 'best.keras'}: {(target / 'best.keras').stat().st_size / 1e6:.2f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the --out folder of the trained runs")
    parser.add_argument("--runs", nargs="+", default=["vqvae", "prior"])
    parser.add_argument("--names", nargs="+", help="the names to export the runs under (default: their own)")
    parser.add_argument("--to", default=str(ROOT / "vqvae_faces" / "models"))
    args = parser.parse_args()
    names = dict(zip(args.runs, args.names or args.runs))
    if len(names) != len(args.runs) or len(set(names.values())) != len(names):
        parser.error(f"--names needs one distinct name per run: --runs {args.runs}, --names {args.names}")
    for run in args.runs:
        export_run(Path(args.out) / "checkpoints" / run, Path(args.to) / "checkpoints" / names[run], names)


if __name__ == "__main__":
    main()
