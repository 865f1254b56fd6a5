import io
import logging
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import IMAGES_PER_PERSON, PEOPLE, face_image, write_lfw_tree
from PIL import Image

from vqvae_faces import lfw_files, pipeline
from vqvae_faces.config import AugmentationConfig, DataConfig


def settings(path=None, **kwargs):
    return DataConfig(path=str(path) if path else None, **kwargs)


def test_folder_and_archive_give_identical_arrays(lfw_tree, lfw_archive, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    from_folder = lfw_files.load_faces(settings(lfw_tree, image_size=32), tmp_path / "c1", [])
    from_archive = lfw_files.load_faces(settings(lfw_archive, image_size=32), tmp_path / "c2", [])
    assert len(from_folder) == len(PEOPLE) * IMAGES_PER_PERSON
    np.testing.assert_array_equal(from_folder.images, from_archive.images)
    np.testing.assert_array_equal(from_folder.names, from_archive.names)
    assert from_folder.images.shape[1:] == (32, 32, 3) and from_folder.images.dtype == np.uint8
    assert from_folder.names[0] == "Ada_Lovelace/Ada_Lovelace_0001.jpg"
    assert from_folder.skipped == {"corrupt or truncated image": 1, "not a readable image": 1}
    assert "skipped 2 files" in caplog.text


def test_parent_folder_of_the_tree_is_accepted(lfw_tree, tmp_path):
    faces = lfw_files.load_faces(settings(lfw_tree.parent, image_size=16), tmp_path, [])
    assert len(faces) == len(PEOPLE) * IMAGES_PER_PERSON


def test_crop_resize_scale_on_a_known_image(tmp_path):
    """The 60 px border is removed; the 130 px centre, left half A and right half B, fills the output."""
    image = np.zeros((250, 250, 3), np.uint8)
    image[60:190, 60:125] = (200, 100, 40)
    image[60:190, 125:190] = (20, 220, 120)
    data = io.BytesIO()
    Image.fromarray(image).save(data, format="PNG")
    face = lfw_files.decode_face(data.getvalue(), settings(image_size=26))
    assert face.shape == (26, 26, 3) and face.dtype == np.uint8
    np.testing.assert_array_equal(face[:, :12], np.broadcast_to([200, 100, 40], (26, 12, 3)))
    np.testing.assert_array_equal(face[:, 14:], np.broadcast_to([20, 220, 120], (26, 12, 3)))
    dataset = pipeline.make_dataset(face[None], batch_size=1)
    scaled = next(iter(dataset)).numpy()
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled[0, 0, 0], np.array([200, 100, 40]) / 255.0, rtol=1e-6)


def test_grayscale_stays_one_channel_and_cmyk_becomes_rgb_and_transparency_lies_on_white():
    gray, cmyk = io.BytesIO(), io.BytesIO()
    Image.new("L", (250, 250), 90).save(gray, format="JPEG")
    Image.new("CMYK", (250, 250), (0, 0, 0, 0)).save(cmyk, format="JPEG")
    grey_face = lfw_files.decode_face(gray.getvalue(), settings(image_size=16))
    assert grey_face.shape == (16, 16, 1) and np.abs(grey_face.astype(int) - 90).max() <= 1  # JPEG rounding
    cmyk_face = lfw_files.decode_face(cmyk.getvalue(), settings(image_size=16))
    assert cmyk_face.shape == (16, 16, 3) and cmyk_face.min() >= 254, "no ink is white"
    see_through = np.zeros((250, 250, 2), np.uint8)
    see_through[..., 0], see_through[:, :125, 1] = 100, 255  # grey 100, the right half transparent
    with_alpha = io.BytesIO()
    Image.fromarray(see_through, mode="LA").save(with_alpha, format="PNG")
    alpha_face = lfw_files.decode_face(with_alpha.getvalue(), settings(image_size=16))
    assert alpha_face.shape == (16, 16, 1) and alpha_face[8, 2, 0] == 100 and alpha_face[8, 13, 0] == 255  # on white


ONLY = {name: 0 for name in ("brightness", "contrast", "sharpness", "saturation", "rotation_degrees")}
ONLY.update(noise_stddev=0, translation_pixels=0, blur_sigma=0, zoom=0, flip=False)


def test_a_flip_mirrors_the_face_and_brightness_shifts_every_pixel_alike():
    """One operation at probability 1: each image is its mirror image or itself, nothing else;
    brightness adds one offset per image, within the configured amount."""
    images = np.stack([face_image(seed, size=32) for seed in range(16)])  # not mirror-symmetric
    batch = tf.constant(images / np.float32(255.0))
    flip = pipeline.FaceAugmenter(AugmentationConfig(**{**ONLY, "flip": True}, probability=1.0), 32, 3)
    flipped = flip(batch, tf.constant([3, 0])).numpy()
    mirrored = np.all(flipped == batch.numpy()[:, :, ::-1], axis=(1, 2, 3))
    untouched = np.all(flipped == batch.numpy(), axis=(1, 2, 3))
    assert not (mirrored & untouched).any(), "the test faces are not symmetric"
    assert (mirrored | untouched).all() and mirrored.sum() >= 4
    brighter = pipeline.FaceAugmenter(AugmentationConfig(**{**ONLY, "brightness": 0.2}, probability=1.0), 32, 3)
    shifted = brighter(batch, tf.constant([3, 0])).numpy()
    inside = (batch.numpy() > 0.25) & (batch.numpy() < 0.75)  # no clipping at 0 or 1 for offsets up to 0.2
    for image, original, keep in zip(shifted, batch.numpy(), inside):
        offsets = (image - original)[keep]
        assert np.ptp(offsets) < 1e-5 and np.abs(offsets).max() <= 0.2 + 1e-6


def test_bad_images_are_skipped_with_a_reason():
    small, huge = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (100, 100)).save(small, format="JPEG")
    Image.new("L", (3000, 3000)).save(huge, format="PNG")
    s = settings(image_size=16)
    assert (
        lfw_files.decode_face(small.getvalue(), settings(image_size=16, face_alignment="lfw")) == "not 250x250 pixels"
    )
    assert lfw_files.decode_face(small.getvalue(), s).startswith("no face found")  # "auto": the detector looks
    assert lfw_files.decode_face(b"", s) == "not a readable image"
    assert (
        lfw_files.decode_face(huge.getvalue(), settings(image_size=16, source_size=None, max_image_pixels=10**6))
        == "larger than max_image_pixels=1000000"
    )


def test_split_is_identity_disjoint_and_reproducible():
    persons = np.repeat([f"p{i}" for i in range(40)], 3)
    split = lfw_files.split_by_person(persons, 0.1, 0.2, seed=5)
    groups = {part: set(persons[idx]) for part, idx in split.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert sum(len(idx) for idx in split.values()) == len(persons)
    assert len(groups["test"]) == 8 and len(groups["val"]) == 4
    again = lfw_files.split_by_person(persons, 0.1, 0.2, seed=5)
    other = lfw_files.split_by_person(persons, 0.1, 0.2, seed=6)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["test"], other["test"])


def test_split_round_trip_and_mismatch(lfw_tree, tmp_path):
    faces = lfw_files.load_faces(settings(lfw_tree, image_size=16), tmp_path, [])
    split = lfw_files.split_by_person(faces.persons, 0.15, 0.3, seed=1)
    lfw_files.save_split(tmp_path / "split.json", faces, split)
    loaded = lfw_files.load_split(tmp_path / "split.json", faces)
    assert all(np.array_equal(split[k], loaded[k]) for k in split)
    bundled = lfw_files.load_bundled_faces(settings(image_size=16))
    with pytest.raises(lfw_files.DataError, match="not in"):
        lfw_files.load_split(tmp_path / "split.json", bundled)


def test_cache_hit_and_rebuild_on_changed_settings(lfw_tree, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    first = lfw_files.load_faces(settings(lfw_tree, image_size=16), tmp_path, [])
    assert len(list(tmp_path.glob("faces-*.npz"))) == 1
    calls = []
    monkeypatch.setattr(lfw_files, "_decode_all", lambda *a: calls.append(1) or ([], []))
    again = lfw_files.load_faces(settings(lfw_tree, image_size=16), tmp_path, [])
    assert calls == [] and "from cache" in caplog.text
    np.testing.assert_array_equal(first.images, again.images)
    assert again.skipped == first.skipped
    with pytest.raises(lfw_files.DataError):
        lfw_files.load_faces(settings(lfw_tree, image_size=16, crop_border=50), tmp_path, [])
    assert calls == [1], "a changed crop_border must rebuild the cache"


def test_cache_contains_no_pickled_objects(lfw_tree, tmp_path):
    lfw_files.load_faces(settings(lfw_tree, image_size=16), tmp_path, [])
    (cache,) = tmp_path.glob("faces-*.npz")
    with np.load(cache, allow_pickle=False) as data:
        assert all(data[key].dtype != object for key in data.files)


def gradient_faces(count=16, channels=3, size=32):
    ramp = np.tile(np.arange(size, dtype=np.uint8)[:, None, None] * 8, (1, size, channels))
    return np.stack([np.roll(ramp, i, 0) for i in range(count)])


def augmented_batches(channels=3, probability=0.5):
    """The same faces augmented with two different batch seeds."""
    images = gradient_faces(channels=channels)
    augmenter = pipeline.FaceAugmenter(AugmentationConfig(probability=probability), 32, channels)
    batch = tf.constant(images / np.float32(255.0))
    return images, [augmenter(batch, tf.constant([3, seed])).numpy() for seed in (0, 1)]


def test_augmentation_keeps_shape_range_and_changes_images_with_the_seed():
    images, (first, second) = augmented_batches()
    assert first.shape == images.shape and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    original = images.astype(np.float32) / 255.0
    changed = np.abs(first - original).reshape(16, -1).max(axis=1) > 1e-3
    assert changed.sum() >= 12, "with 10 ops at p=0.5 nearly every image changes"
    assert np.abs(first - second).max() > 1e-3, "another batch seed draws other augmentations"
    _, (again, _) = augmented_batches()
    np.testing.assert_array_equal(first, again)


def training_batches(images, first_epoch, epochs, augmenter=None, seed=5):
    dataset = pipeline.make_training_dataset(images, 6, seed, first_epoch, epochs, augmenter)
    return [batch.numpy() for batch in dataset]


def test_training_epochs_are_fresh_permutations_and_a_resumed_run_sees_the_same_batches():
    images = gradient_faces()
    assert pipeline.steps_per_epoch(16, 6, drop_remainder=False) == 3
    assert pipeline.steps_per_epoch(16, 6, drop_remainder=True) == 2
    batches = training_batches(images, 0, 2)
    assert [len(b) for b in batches] == [6, 6, 4] * 2
    original = images / np.float32(255.0)
    epochs = [np.concatenate(batches[:3]), np.concatenate(batches[3:])]
    for epoch in epochs:
        order = [int(np.flatnonzero((original == face).all(axis=(1, 2, 3)))[0]) for face in epoch]
        assert sorted(order) == list(range(16)), "each epoch visits every face once"
    assert not np.array_equal(epochs[0], epochs[1]), "each epoch is shuffled anew"
    other_seed = np.concatenate(training_batches(images, 0, 1, seed=6))
    assert not np.array_equal(epochs[0], other_seed), "the order follows the seed"

    augmenter = pipeline.FaceAugmenter(AugmentationConfig(probability=0.5), 32, 3)
    uninterrupted = training_batches(images, 0, 3, augmenter)
    resumed = training_batches(images, 2, 3, augmenter)
    assert len(resumed) == 3
    for expected, batch in zip(uninterrupted[6:], resumed):
        np.testing.assert_array_equal(expected, batch)


def test_a_prior_s_batches_are_the_tokens_of_the_augmented_batches_the_same_seed_gives():
    """With `tokenize`, each batch is that function of the batch of faces the same seed and epoch give,
    augmented alike: fresh variants every epoch, the same ones on resuming."""
    images = gradient_faces()
    augmenter = pipeline.FaceAugmenter(AugmentationConfig(probability=0.5), 32, 3)

    def tokenize(batch):  # a stand-in tokenizer: the brightest channel of each 8x8 cell, 0..255
        cells = tf.nn.max_pool2d(batch, 8, 8, "VALID")
        return tf.reduce_max(tf.cast(tf.round(cells * 255.0), tf.int64), axis=-1)

    faces = training_batches(images, 0, 2, augmenter)
    tokens = [b.numpy() for b in pipeline.make_training_dataset(images, 6, 5, 0, 2, augmenter, tokenize=tokenize)]
    assert [t.dtype for t in tokens] == [np.int32] * 6 and tokens[0].shape == (6, 4, 4)
    for batch, grid in zip(faces, tokens):
        np.testing.assert_array_equal(grid, tokenize(tf.constant(batch)).numpy())
    first, second = np.concatenate(tokens[:3]), np.concatenate(tokens[3:])
    assert not np.array_equal(np.sort(first.reshape(16, -1), axis=0), np.sort(second.reshape(16, -1), axis=0))


def test_augmentation_probability_zero_leaves_images_alone():
    images, (first, _) = augmented_batches(probability=0.0)
    np.testing.assert_allclose(first, images / 255.0, atol=1e-6)


def test_grayscale_augmentation_skips_saturation():
    augmenter = pipeline.FaceAugmenter(AugmentationConfig(), 32, channels=1)
    assert len(augmenter.names) == 9
    assert not any("saturation" in name for name in augmenter.names)
    images, (first, _) = augmented_batches(channels=1)
    assert first.shape[-1] == 1


def test_validation_pipeline_is_untouched():
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    batches = [b.numpy() for b in pipeline.make_dataset(images, 4)]
    np.testing.assert_array_equal(np.concatenate(batches), images / np.float32(255.0))


def test_bundled_default(caplog):
    caplog.set_level(logging.INFO)
    faces = lfw_files.load_faces(settings(image_size=32), Path("unused"), [])
    assert faces.images.shape == (100, 32, 32, 1)
    assert len(set(faces.persons)) == 100
    assert "scikit-image lfw_subset" in caplog.text and "--data" in caplog.text


def test_missing_path_and_empty_folders(tmp_path):
    with pytest.raises(lfw_files.DataError, match="does not exist"):
        lfw_files.load_faces(settings(tmp_path / "nowhere"), tmp_path, [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(lfw_files.DataError, match="no usable images"):
        lfw_files.load_faces(settings(tmp_path / "empty"), tmp_path / "c", [])
    junk = tmp_path / "junk" / "Someone"
    junk.mkdir(parents=True)
    (junk / "Someone_0001.jpg").write_bytes(b"\x00" * 100)
    with pytest.raises(lfw_files.DataError, match="no usable images"):
        lfw_files.load_faces(settings(tmp_path / "junk"), tmp_path / "c", [])
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(lfw_files.DataError, match="not a .tgz"):
        lfw_files.load_faces(settings(tmp_path / "file.txt"), tmp_path / "c", [])


@pytest.mark.parametrize("change", ["changed", "added"])
def test_cache_is_rebuilt_when_a_source_file_changes_or_is_added(tmp_path, change):
    tree = write_lfw_tree(tmp_path / "src", people=PEOPLE[:3], per_person=2)
    first = lfw_files.load_faces(settings(tree, image_size=16), tmp_path / "cache", [])
    target = tree / PEOPLE[2] / f"{PEOPLE[2]}_{1 if change == 'changed' else 7:04d}.jpg"
    Image.fromarray(255 - face_image(4242)).save(target)
    again = lfw_files.load_faces(settings(tree, image_size=16), tmp_path / "cache", [])
    assert len(list((tmp_path / "cache").glob("faces-*.npz"))) == 2, "a second cache for the new contents"
    name = f"{PEOPLE[2]}/{target.name}"
    index = list(again.names).index(name)
    assert len(again) == len(first) + (change == "added")
    if change == "changed":
        assert not np.array_equal(again.images[index], first.images[list(first.names).index(name)])
    reloaded = lfw_files.load_faces(settings(tree, image_size=16), tmp_path / "cache", [])
    np.testing.assert_array_equal(reloaded.images, again.images)


def test_malicious_archive_members_are_skipped(tmp_path, monkeypatch):
    tree = write_lfw_tree(tmp_path / "src", people=PEOPLE[:3], per_person=2)
    payload = (tree / PEOPLE[0] / f"{PEOPLE[0]}_0001.jpg").read_bytes()
    with tarfile.open(tmp_path / "evil.tar", "w") as handle:
        for name in ("../escape/Evil_0001.jpg", "/abs/Evil/Evil_0001.jpg", "lfw-deepfunneled/Evil/Evil_0001.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            handle.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("lfw-deepfunneled/Evil/Evil_0002.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        handle.addfile(link)
    # Work from a folder inside tmp_path, so anything written relative to the working folder,
    # '../escape' included, would land in tmp_path, which is watched whole.
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = set(tmp_path.rglob("*"))
    faces = lfw_files.load_faces(settings(tmp_path / "evil.tar", image_size=16), tmp_path / "cache", [])
    assert list(faces.names) == ["Evil/Evil_0001.jpg"]
    assert faces.skipped[lfw_files.UNSAFE_MEMBER] == 3
    created = set(tmp_path.rglob("*")) - before
    assert created and all(p.is_relative_to(tmp_path / "cache") for p in created), created
    assert not Path("/abs/Evil").exists()


def test_links_out_of_the_data_folder_or_nowhere_are_skipped(tmp_path, monkeypatch):
    """File and folder links leading outside the data or nowhere, and unreadable files, are counted, not read."""
    tree = write_lfw_tree(tmp_path / "src", people=PEOPLE[:3], per_person=2)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((tree / PEOPLE[0] / f"{PEOPLE[0]}_0001.jpg").read_bytes())
    (tree / PEOPLE[0] / f"{PEOPLE[0]}_0077.jpg").symlink_to(outside)
    (tree / PEOPLE[0] / f"{PEOPLE[0]}_0078.jpg").symlink_to(tmp_path / "gone.jpg")
    stranger = write_lfw_tree(tmp_path / "elsewhere", ["Out_Sider", "Sam_Else", "Tom_Else"], 2) / "Out_Sider"
    (tree / "Out_Sider").symlink_to(stranger, target_is_directory=True)
    (tree / "Lost_Person").symlink_to(tmp_path / "no-such-folder", target_is_directory=True)
    unreadable = tree / PEOPLE[1] / f"{PEOPLE[1]}_0002.jpg"
    real_read_bytes = Path.read_bytes

    def read_bytes(path):
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    faces = lfw_files.load_faces(settings(tree, image_size=16), tmp_path / "cache", [])
    assert faces.skipped[lfw_files.OUTSIDE_LINK] == 4
    assert faces.skipped["unreadable file"] == 1
    assert not any(name.startswith("Out_Sider/") for name in faces.names)
    assert f"{PEOPLE[0]}/{PEOPLE[0]}_0077.jpg" not in faces.names
    assert len(faces) == 3 * 2 - 1


def test_attributes_join_when_present(tmp_path):
    tree = write_lfw_tree(tmp_path / "src", people=PEOPLE[:3], per_person=2)
    (tree / "lfw_attributes.txt").write_text(
        "# LFW attributes file\n#\tperson\timagenum\tMale\tSmiling\n"
        "Ada Lovelace\t1\t-1.5\t0.7\nAlan Turing\t2\t1.2\t-0.3\n"
    )
    faces = lfw_files.load_faces(settings(tree, image_size=16), tmp_path / "cache", [])
    assert len(faces) == 6, "images without attributes are kept"
    assert list(faces.attributes.columns) == ["Male", "Smiling"]
    assert faces.attributes.loc["Alan_Turing/Alan_Turing_0002.jpg", "Male"] == pytest.approx(1.2)
    assert faces.attributes.loc["Ada_Lovelace/Ada_Lovelace_0002.jpg"].isna().all()


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_other_formats_named_jpg_decode_by_content(fmt):
    data = io.BytesIO()
    Image.fromarray(np.full((250, 250, 3), 128, np.uint8)).save(data, format=fmt)
    face = lfw_files.decode_face(data.getvalue(), settings(image_size=16))
    assert isinstance(face, np.ndarray) and face.shape == (16, 16, 3)


def test_hard_link_archive_members_are_skipped(tmp_path):
    tree = write_lfw_tree(tmp_path / "src", people=PEOPLE[:3], per_person=1)
    payload = (tree / PEOPLE[0] / f"{PEOPLE[0]}_0001.jpg").read_bytes()
    with tarfile.open(tmp_path / "links.tar", "w") as handle:
        info = tarfile.TarInfo("lfw-deepfunneled/Real/Real_0001.jpg")
        info.size = len(payload)
        handle.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("lfw-deepfunneled/Real/Real_0002.jpg")
        link.type, link.linkname = tarfile.LNKTYPE, "/etc/hostname"
        handle.addfile(link)
    faces = lfw_files.load_faces(settings(tmp_path / "links.tar", image_size=16), tmp_path / "cache", [])
    assert list(faces.names) == ["Real/Real_0001.jpg"]
    assert faces.skipped == {lfw_files.UNSAFE_MEMBER: 1}


def test_a_flat_folder_a_zip_and_a_csv_of_identities_give_the_same_faces(lfw_tree, tmp_path, caplog):
    """The three layouts: identities from folders (LFW), none (a flat folder: one per file, with a warning),
    or a CSV; a flat .zip reads as the flat folder does."""
    caplog.set_level(logging.WARNING)
    lfw = lfw_files.load_faces(settings(lfw_tree, image_size=16), tmp_path / "c0", [])
    flat = tmp_path / "img_align" / "photos"
    flat.mkdir(parents=True)
    for name in lfw.names:
        (flat / name.split("/")[1]).write_bytes((lfw_tree / name).read_bytes())
    flat_faces = lfw_files.load_faces(settings(flat.parent, image_size=16), tmp_path / "c1", [])
    order = np.argsort([name.split("/")[1] for name in lfw.names])
    np.testing.assert_array_equal(flat_faces.images, lfw.images[order])
    assert list(flat_faces.names) == [f"photos/{name.split('/')[1]}" for name in lfw.names[order]]
    assert list(flat_faces.persons) == list(flat_faces.names)  # each file its own identity
    assert "identities unknown" in caplog.text
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        for file in sorted(flat.iterdir()):
            archive.write(file, f"photos/{file.name}")
    zipped = lfw_files.load_faces(settings(tmp_path / "photos.zip", image_size=16), tmp_path / "c2", [])
    np.testing.assert_array_equal(zipped.images, flat_faces.images)
    assert list(zipped.names) == list(flat_faces.names)
    table = tmp_path / "who.csv"
    rows = [(name.split("/")[1], name.split("/")[0]) for name in lfw.names[:-1]]  # the last file left unnamed
    table.write_text("file,identity\n" + "".join(f"{file},{person}\n" for file, person in rows))
    named = lfw_files.load_faces(settings(flat, image_size=16, identities=str(table)), tmp_path / "c3", [])
    assert sorted(named.persons) == sorted(person for _, person in rows)
    assert named.skipped == {f"not named in {table}": 1}
    split = lfw_files.split_by_person(named.persons, 0.2, 0.2, seed=0)
    people = {part: set(named.persons[indices]) for part, indices in split.items()}
    assert not people["train"] & people["test"] and not people["val"] & people["test"]


def test_an_identities_csv_without_its_columns_is_refused_in_one_line(lfw_tree, tmp_path):
    (tmp_path / "who.csv").write_text("name,person\na.jpg,A\n")
    with pytest.raises(lfw_files.DataError, match=r"needs columns 'file' and 'identity', has \['name', 'person'\]"):
        lfw_files.load_faces(settings(lfw_tree, identities=str(tmp_path / "who.csv")), tmp_path / "c", [])
