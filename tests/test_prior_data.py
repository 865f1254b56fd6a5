"""Token grids for the prior: the encoder's nearest codes of every split, cached per checkpoint."""

import logging

import keras
import numpy as np

from vqvae_class_keras import VQVAE
from vqvae_faces import lfw_files, prior_data
from vqvae_faces.config import DataConfig
from vqvae_faces.token_search import search_tokens

TINY = dict(encoder_filters=[8, 16], decoder_filters=[16, 8], num_residual_blocks=0, residual_hidden_channels=8)


def saved_model(path, seed):
    model = VQVAE(image_channels=1, embedding_dim=4, num_embeddings=16, seed=seed, ssim_weight=0.0, **TINY)
    model.compile(optimizer="adam")
    model.build((None, 16, 16, 1))
    model.save(path)
    return keras.saving.load_model(path, safe_mode=True)


def test_grids_are_the_nearest_codes_of_each_split_and_come_from_the_cache_next_time(tmp_path, caplog, monkeypatch):
    faces = lfw_files.load_bundled_faces(DataConfig(image_size=16))
    split = lfw_files.split_by_person(faces.persons, 0.1, 0.1, seed=0)
    model = saved_model(tmp_path / "a.keras", seed=0)
    caplog.set_level(logging.INFO)
    tokens = prior_data.tokenize_splits(model, tmp_path / "a.keras", faces, split, tmp_path / "cache", 7, flipped=True)
    for part in ("train", "val", "test"):
        images = faces.subset(split[part]).astype(np.float32) / 255.0
        np.testing.assert_array_equal(tokens[part], model.encode_to_tokens(images).numpy())
        mirrored = np.ascontiguousarray(images[:, :, ::-1])
        np.testing.assert_array_equal(tokens[f"{part}_flipped"], model.encode_to_tokens(mirrored).numpy())
        assert list(tokens.names[part]) == list(faces.names[split[part]])
        assert tokens[part].dtype == np.int16 and tokens[part].shape == (len(split[part]), 4, 4)
    calls = []
    monkeypatch.setattr(prior_data, "tokenize", lambda *args: calls.append(1))
    again = prior_data.tokenize_splits(model, tmp_path / "a.keras", faces, split, tmp_path / "cache", 7, flipped=True)
    assert calls == [] and "from cache" in caplog.text
    np.testing.assert_array_equal(again["train"], tokens["train"])


def test_another_checkpoint_or_other_faces_get_their_own_cache(tmp_path):
    faces = lfw_files.load_bundled_faces(DataConfig(image_size=16))
    split = lfw_files.split_by_person(faces.persons, 0.1, 0.1, seed=0)
    saved_model(tmp_path / "a.keras", seed=0)
    first = prior_data.tokens_cache_path(tmp_path, tmp_path / "a.keras", faces, split, False)
    saved_model(tmp_path / "a.keras", seed=1)  # retrained: other weights in the same file
    assert prior_data.tokens_cache_path(tmp_path, tmp_path / "a.keras", faces, split, False) != first
    other_split = lfw_files.split_by_person(faces.persons, 0.1, 0.1, seed=1)
    assert prior_data.tokens_cache_path(tmp_path, tmp_path / "a.keras", faces, other_split, False) != first
    assert prior_data.tokens_cache_path(tmp_path, tmp_path / "a.keras", faces, split, True) != first


def test_an_empty_split_has_no_grids_of_the_right_shape(tmp_path):
    faces = lfw_files.load_bundled_faces(DataConfig(image_size=16))
    split = lfw_files.split_by_person(faces.persons, 0.1, 0.1, seed=0)
    split["val"] = split["val"][:0]
    model = saved_model(tmp_path / "a.keras", seed=0)
    tokens = prior_data.tokenize_splits(model, tmp_path / "a.keras", faces, split, tmp_path / "cache", 8)
    assert tokens["val"].shape == (0, 4, 4) and tokens["train"].shape == (len(split["train"]), 4, 4)


def test_searched_tokens_are_the_token_search_s_and_get_their_own_cache(tmp_path):
    faces = lfw_files.load_bundled_faces(DataConfig(image_size=16))
    split = lfw_files.split_by_person(faces.persons, 0.1, 0.1, seed=0)
    model = saved_model(tmp_path / "a.keras", seed=0)
    search = (3, 0.5)
    tokens = prior_data.tokenize_splits(model, tmp_path / "a.keras", faces, split, tmp_path / "cache", 8, search=search)
    images = faces.subset(split["test"]).astype(np.float32) / 255.0
    searched = search_tokens(model, images, *search).numpy()
    np.testing.assert_array_equal(tokens["test"], searched)
    assert (searched != model.encode_to_tokens(images).numpy()).any()  # the search did change tokens
    nearest_path = prior_data.tokens_cache_path(tmp_path / "cache", tmp_path / "a.keras", faces, split, False)
    searched_path = prior_data.tokens_cache_path(tmp_path / "cache", tmp_path / "a.keras", faces, split, False, search)
    other_steps = prior_data.tokens_cache_path(tmp_path / "cache", tmp_path / "a.keras", faces, split, False, (4, 0.5))
    assert searched_path.is_file() and not nearest_path.is_file()
    assert len({nearest_path, searched_path, other_steps}) == 3
