"""tf.distribute: the EMA codebook stays identical across replicas and matches one device."""

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from conftest import COMPILED, ROOT, TINY_RUN, token_log_probs

import vqvae_face_main
from vqvae_faces import lfw_files, training
from vqvae_faces.config import DataConfig

HELPER = ROOT / "tests" / "helpers" / "mirrored_codebook.py"
MANY_EPOCHS = 100_000  # more than any machine trains in these tests' time budgets


@pytest.fixture(scope="module")
def codebooks(tmp_path_factory):
    """{codebook_init: (single-device codebooks, mirrored codebooks)} after each training step."""
    command = [sys.executable, str(HELPER), str(tmp_path_factory.mktemp("mirrored"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(result.stdout.strip().splitlines()[-1])
    found = {"prior": records.pop("prior")}
    for init, record in records.items():
        assert record["replicas"] == 2
        assert record["reload_difference"] < 1e-5, "the mirrored checkpoint reloads on one device, same outputs"
        found[init] = [np.array(step) for step in record["single"]], [np.array(step) for step in record["mirrored"]]
    return found


@pytest.mark.parametrize("codebook_init", ["uniform", "data"])
def test_mirrored_codebook_is_identical_on_every_replica(codebooks, codebook_init):
    single, mirrored = codebooks[codebook_init]
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


def test_a_prior_trains_alike_on_one_device_and_on_two_replicas(codebooks):
    """Each replica differentiates its loss / replicas: the summed gradients are the global batch's."""
    prior = codebooks["prior"]
    assert prior["moved"] > 1e-3
    assert prior["difference"] < 1e-5


def test_distribution_and_scale_learning_rate_set_through_the_program(tmp_path):
    """ "mirrored" over two logical CPUs: two replicas and, with scale_learning_rate, twice the rate;
    "none": one replica, the rate as set (scaled by 1)."""
    command = [sys.executable, str(ROOT / "tests" / "helpers" / "distribution_settings.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["mirrored"] == {"code": 0, "replicas": [2], "learning_rate": pytest.approx(0.004)}
    assert found["none"] == {"code": 0, "replicas": [1], "learning_rate": pytest.approx(0.002)}


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


# What a worker prints when another process took its port between free_port() and its own bind.
PORT_TAKEN = re.compile(r"[Aa]ddress already in use|[Ff]ailed to bind|Could not start gRPC server")
PORT_ATTEMPTS = 3


def on_free_ports(attempt, count=2):
    """`attempt(cluster)` with `count` fresh loopback ports, again with new ones (up to PORT_ATTEMPTS
    times) when it returns None because a port was taken; returns what it returned."""
    for _ in range(PORT_ATTEMPTS):
        result = attempt({"worker": [f"127.0.0.1:{free_port()}" for _ in range(count)]})
        if result is not None:
            return result
    pytest.fail(f"a worker's port was taken {PORT_ATTEMPTS} times in a row")


def recomputed_psnr(out):
    """Mean test PSNR recomputed with NumPy from tokens.npz, best.keras and the bundled faces."""
    import keras

    import vqvae_class_keras  # noqa: F401  (registers the model classes)

    split = json.loads((out / "checkpoints" / "vqvae" / "split.json").read_text())
    faces = lfw_files.load_bundled_faces(DataConfig(image_size=16))
    originals = faces.images[[list(faces.names).index(name) for name in split["test"]]] / 255.0
    tokens = np.load(out / "checkpoints" / "vqvae" / "tokens.npz")["tokens"].astype(np.int32)
    model = keras.saving.load_model(out / "checkpoints" / "vqvae" / "best.keras", safe_mode=True)
    mse = ((model.decode_tokens(tokens).numpy() - originals) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(1 / mse)))


def recomputed_bits_per_token(out):
    """The prior's mean code length of the test faces' tokens, by a log-softmax in NumPy of its logits."""
    import keras

    import vqvae_class_keras  # noqa: F401  (registers the model classes)
    from vqvae_faces import token_prior  # noqa: F401  (registers the priors)

    split = json.loads((out / "checkpoints" / "vqvae" / "split.json").read_text())
    faces = lfw_files.load_bundled_faces(DataConfig(image_size=16))
    originals = faces.images[[list(faces.names).index(name) for name in split["test"]]] / np.float32(255.0)
    vqvae = keras.saving.load_model(out / "checkpoints" / "vqvae" / "best.keras", safe_mode=True)
    prior = keras.saving.load_model(out / "checkpoints" / "prior" / "best.keras", safe_mode=True)
    tokens = vqvae.encode_to_tokens(originals).numpy()
    return float(-token_log_probs(prior(tokens), tokens).mean() / np.log(2.0))


def test_two_workers_write_one_checkpoint_that_a_single_process_resumes(tmp_path, caplog):
    """Each worker gets its own --out: the chief's receives the runs (a VQ-VAE, then its token prior)
    and their evaluations, the other worker's stays empty; one process on one device then resumes
    the VQ-VAE run and evaluates it again."""
    outs = [tmp_path / "chief", tmp_path / "worker"]
    settings = [item for setting in TINY_RUN + COMPILED for item in ("--set", setting)]
    # A time budget that ends training long before the epochs on any machine: both workers must stop
    # at the same step.
    settings += ["--set", "max_train_minutes=0.05", "--set", f"epochs={MANY_EPOCHS}", "--data", "bundled"]
    command = [sys.executable, str(ROOT / "vqvae_face_main.py"), *settings, "--run", "vqvae", "--run", "prior"]

    def attempt(cluster):
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
        workers = start_workers(command, outs, cluster, stdout=subprocess.PIPE)
        try:
            outputs = [worker.communicate(timeout=300) for worker in workers]
        finally:
            stop(workers)
        return None if any(PORT_TAKEN.search(stderr) for _, stderr in outputs) else (workers, outputs)

    workers, outputs = on_free_ports(attempt)
    logs = "\n".join(f"--- worker {i}:\n{stderr[-3000:]}" for i, (_, stderr) in enumerate(outputs))
    assert [worker.returncode for worker in workers] == [0, 0], logs
    assert "distribution: multi_worker" in outputs[0][1] and "with 2 replica(s)" in outputs[0][1]
    assert list(outs[1].iterdir()) == [], "the non-chief worker writes nothing into its --out"
    digests = [re.findall(r"weights digest (\w+)", stderr) for _, stderr in outputs]
    assert len(digests[0]) == 2 and digests[0] == digests[1], "both workers end with identical weights and codebook"
    assert (outs[0] / "checkpoints" / "prior" / "best.keras").is_file()
    prior_metrics = json.loads((outs[0] / "images_saved" / "prior" / "metrics.json").read_text())
    assert prior_metrics["test_bits_per_token"] == pytest.approx(recomputed_bits_per_token(outs[0]), rel=1e-5)
    folder = outs[0] / "checkpoints" / "vqvae"
    assert (folder / "best.keras").is_file() and (folder / "latest.keras").is_file()
    state = json.loads((folder / "state.json").read_text())
    assert state["stopped_by"] == "time limit" and state["epochs_done"] >= 1
    metrics = json.loads((outs[0] / "images_saved" / "vqvae" / "metrics.json").read_text())
    assert metrics["num_test_images"] == 10
    assert metrics["psnr"] == pytest.approx(recomputed_psnr(outs[0]), rel=1e-5)
    # Resume the two-replica run on one device with 3 s more than it has used (a first epoch
    # on a busy machine can overrun a fixed budget).
    caplog.set_level("INFO")
    longer = ["--set", f"max_train_minutes={state['train_seconds'] / 60 + 0.05:.4f}"]
    assert vqvae_face_main.main(["--out", str(outs[0]), *settings, *longer, "--run", "vqvae"]) == 0
    assert "continuing from epoch" in caplog.text and "with 1 replica(s)" in caplog.text
    assert json.loads((folder / "state.json").read_text())["epochs_done"] > state["epochs_done"]
    metrics = json.loads((outs[0] / "images_saved" / "vqvae" / "metrics.json").read_text())
    assert metrics["psnr"] == pytest.approx(recomputed_psnr(outs[0]), rel=1e-5)


def start_workers(command, outs, cluster, stdout=subprocess.DEVNULL):
    """One process of `command` per worker of `cluster`, each with its --out folder from `outs`."""
    workers = []
    for index, out in enumerate(outs):
        task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        workers.append(
            subprocess.Popen(
                [*command, "--out", str(out)],
                env={**os.environ, "TF_CONFIG": json.dumps(task)},
                cwd=out,
                stdout=stdout,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return workers


def stop(processes):
    for process in processes:
        if process.poll() is None:
            process.kill()  # SIGKILL ends a stopped process too
        process.wait()


TIMEOUT_SECONDS = 20


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_lost_worker_ends_the_chief_in_time_with_a_message_naming_it(tmp_path, fault):
    """The workers run their train steps eagerly (TINY_RUN): losing a worker is the same either way. A
    worker that hangs (SIGSTOP: its process and sockets stay) must end the chief within
    collective_timeout_seconds, like one that dies."""
    command = [sys.executable, str(ROOT / "vqvae_face_main.py"), "--run", "vqvae", "--data", "bundled"]
    command += [item for setting in TINY_RUN for item in ("--set", setting)]
    command += ["--set", f"epochs={MANY_EPOCHS}", "--set", f"collective_timeout_seconds={TIMEOUT_SECONDS}"]
    latest = tmp_path / "checkpoints" / "vqvae" / "latest.keras"

    def attempt(cluster):
        shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
        chief, worker = start_workers(command, [tmp_path, tmp_path], cluster)
        try:
            deadline = time.monotonic() + 180
            while not latest.exists() and chief.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if not latest.exists():
                stderr = chief.communicate(timeout=60)[1] if chief.poll() is not None else "no checkpoint yet"
                assert PORT_TAKEN.search(stderr), stderr[-3000:]
                return None
            os.kill(worker.pid, signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
            lost = time.monotonic()
            _, stderr = chief.communicate(timeout=120)
            return chief.returncode, stderr, time.monotonic() - lost, cluster
        finally:
            stop([chief, worker])

    returncode, stderr, seconds, cluster = on_free_ports(attempt)
    assert returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert f"worker 1 ({cluster['worker'][1]}) did not answer" in last and "resume" in last
    assert "Traceback" not in stderr
    # within the timeout (7 s measured for either fault), plus 10 s for a busy machine to exit
    assert seconds < TIMEOUT_SECONDS + 10, seconds
    state = json.loads(zipfile.ZipFile(latest).read("training_state.json"))
    assert 1 <= state["epochs_done"] < MANY_EPOCHS, "the last completed epoch is kept"
    with open(tmp_path / "checkpoints" / "vqvae" / "train.lock") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the chief no longer holds the run


def test_lost_worker_message_names_the_task_in_the_error():
    text = "aborted: The following tasks are unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:2"
    config = {"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker", "index": 0}}
    assert training.lost_worker_message(text, config).startswith("multi-worker training stopped: worker 2 (c:3) did")
    unnamed = training.lost_worker_message("Deadline Exceeded", config)
    assert unnamed.startswith("multi-worker training stopped: worker 1 (b:2), worker 2 (c:3) did not answer")
