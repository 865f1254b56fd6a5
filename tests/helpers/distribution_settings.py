"""Train through the command line (`vqvae_face_main.main`) with `distribution: "mirrored"` over two
logical CPUs and `scale_learning_rate`, then with `distribution: "none"`; print each run's replica
count (from the log) and its optimizer's learning rate (constant; from latest.keras) as JSON.
Usage: distribution_settings.py FOLDER (where the runs go).

Run as a separate process: logical devices must be configured before TensorFlow starts.
"""

import io
import json
import logging
import os
import re
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as vqvae_face_main.py sets it
ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import h5py  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from conftest import TINY_RUN  # noqa: E402

import vqvae_face_main  # noqa: E402

FOLDER = Path(sys.argv[1])
SETTINGS = TINY_RUN + ['lr_schedule="constant"', "learning_rate=0.002", "scale_learning_rate=true"]
log = io.StringIO()
logging.getLogger().addHandler(logging.StreamHandler(log))
logging.getLogger().setLevel(logging.INFO)
found = {}
for distribution in ("mirrored", "none"):
    out = FOLDER / distribution
    arguments = ["--out", str(out), "--data", "bundled", "--run", "vqvae", "--set", f'distribution="{distribution}"']
    arguments += [item for setting in SETTINGS for item in ("--set", setting)]
    start = len(log.getvalue())
    code = vqvae_face_main.main(arguments)
    replicas = re.findall(r"distribution: \w+ \(\w+\) with (\d+) replica", log.getvalue()[start:])
    found[distribution] = {"code": code, "replicas": [int(r) for r in replicas], "learning_rate": None}
    if code == 0:
        latest = out / "checkpoints" / "vqvae" / "latest.keras"
        with zipfile.ZipFile(latest) as archive, archive.open("model.weights.h5") as handle, h5py.File(handle) as file:
            found[distribution]["learning_rate"] = float(file["optimizer/vars/1"][()])  # after the step counter
print(json.dumps(found))
