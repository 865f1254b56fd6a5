"""tf.distribute: the EMA codebook stays identical across replicas and matches one device."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

HELPER = ROOT / "tests" / "helpers" / "mirrored_codebook.py"


def codebooks(codebook_init, folder):
    command = [sys.executable, str(HELPER), codebook_init, str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["replicas"] == 2
    assert record["reload_difference"] < 1e-5, "the mirrored checkpoint reloads on one device, same outputs"
    return [np.array(step) for step in record["single"]], [np.array(step) for step in record["mirrored"]]


@pytest.mark.parametrize("codebook_init", ["uniform", "data"])
def test_mirrored_codebook_is_identical_on_every_replica(codebook_init, tmp_path):
    single, mirrored = codebooks(codebook_init, tmp_path)
    assert len(mirrored) == 3
    for step in mirrored:
        assert step.shape == (2, 16, 4)
        np.testing.assert_array_equal(step[0], step[1])
    if codebook_init == "uniform":
        # Same initial weights, same global batch: all-reduced EMA statistics and averaged
        # gradients give the single-device codebook after every step.
        for one, two in zip(single, mirrored):
            np.testing.assert_allclose(two[0], one[0], atol=1e-5)
        assert np.abs(single[-1][0] - single[0][0]).max() > 0, "the codebook moved"
