import json
import logging

import pytest
from conftest import ROOT

from vqvae_faces.config import ConfigError, ExperimentConfig, load_config


def write(tmp_path, data):
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_shipped_experiment_json_is_valid():
    config = load_config(ROOT / "experiment.json")
    assert set(config.compare) <= set(config.runs)
    assert config.runs["vqvae"].bits_per_image(config.data.image_size) <= 2304


def test_defaults_without_a_file():
    config = load_config(None)
    assert list(config.runs) == ["vqvae", "vae", "prior"] and config.runs["vae"].model == "vae"
    assert config.runs["prior"].tokens_from == "vqvae" and config.runs["prior"].batch_size == 32
    assert ExperimentConfig().runs == config.runs  # the dataclass and load_config share one set of defaults
    assert config.data.image_size == 64


@pytest.mark.parametrize(
    "data, key",
    [
        ({"runs": {"a": {"epochz": 3}}}, "runs.a.epochz"),
        ({"data": {"image_sise": 32}}, "data.image_sise"),
        ({"runs": {"a": {"epochs": "ten"}}}, "runs.a.epochs"),
        ({"runs": {"a": {"epochs": 2.5}}}, "runs.a.epochs"),
        ({"runs": {"a": {"learning_rate": True}}}, "runs.a.learning_rate"),
        ({"runs": {"a": {"batch_size": -4}}}, "runs.a.batch_size"),
        ({"runs": {"a": {"num_embeddings": 1}}}, "runs.a.num_embeddings"),
        ({"runs": {"a": {"token_search_steps": -1}}}, "runs.a.token_search_steps"),
        ({"runs": {"a": {"model": "gan"}}}, "runs.a.model"),
        ({"runs": {"a": {"encoder_filters": [8, "x"]}}}, "runs.a.encoder_filters[1]"),
        ({"data": {"image_size": 30}, "runs": {"a": {}}}, "data.image_size=30"),
        ({"runs": {"a": {"decoder_filters": [8]}}}, "runs.a.decoder_filters"),
        ({"data": {"augmentation": {"probability": 2}}}, "data.augmentation.probability"),
        ({"runs": {"a": {"activation": "tanh"}}}, "runs.a.activation"),
        ({"runs": {"a": {"decoder_residual_blocks": -1}}}, "runs.a.decoder_residual_blocks"),
        ({"runs": {"a": {"reconstruction_loss": "l1"}}}, "runs.a.reconstruction_loss"),
        ({"runs": {"a": {"divergence_ratio": 1.0}}}, "runs.a.divergence_ratio=1.0"),
        ({"runs": {"a": {"ssim_weight": -0.1}}}, "runs.a.ssim_weight=-0.1"),
        ({"runs": {"a": {"l1_weight": -1}}}, "runs.a.l1_weight=-1"),
        ({"runs": {"a": {"gradient_clipnorm": 0}}}, "runs.a.gradient_clipnorm=0"),
        ({"runs": {"a": {"lr_final_fraction": 1.5}}}, "runs.a.lr_final_fraction=1.5"),
        ({"runs": {"a": {"lr_schedule": "step"}}}, "runs.a.lr_schedule"),
        ({"runs": {"a": {"nan_retries": 1}}}, "runs.a.nan_retries"),
        ({"runs": {"a": {"jit_compile": True, "run_eagerly": True}}}, "runs.a: jit_compile=true and run_eagerly"),
        ({"compare": ["nope"]}, "nope"),
        (
            {
                "runs": {
                    "v": {"token_search_steps": 0},
                    "p": {"model": "prior", "tokens_from": "v", "searched_tokens": True},
                }
            },
            "runs.p.searched_tokens is true but runs.v.token_search_steps is 0",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path, data, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize(
    "run, message",
    [
        (
            {"model": "prior", "tokens_from": "v", "embedding_dim": 8},
            "runs.a.embedding_dim is a setting of 'vqvae' runs, not of a 'prior' run",
        ),
        (
            {"model": "vae", "token_search_steps": 3},
            "runs.a.token_search_steps is a setting of 'vqvae' runs, not of a 'vae' run",
        ),
        ({"latent_dim": 8}, "runs.a.latent_dim is a setting of 'vae' runs, not of a 'vqvae' run"),
        (
            {"encoder_filters": [8], "model": "prior", "tokens_from": "v"},
            "of 'vqvae' and 'vae' runs, not of a 'prior' run",
        ),
        ({"ema_decay": 0.9}, "runs.a.ema_decay is now decay"),
        (
            {"model": "prior", "tokens_from": "v", "prior": {"width": 8}},
            "runs.a.prior is now architecture, flipped_faces",
        ),
        ({"model": "prior"}, "runs.a.tokens_from is missing"),
    ],
)
def test_a_key_of_another_kind_of_run_is_refused_naming_the_kind(tmp_path, run, message):
    path = write(tmp_path, {"runs": {"v": {}, "a": run}})
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_run_setting_on_the_command_line_goes_to_the_selected_runs_that_have_it(tmp_path, caplog):
    path = write(tmp_path, {"runs": {"v": {}, "e": {"model": "vae"}, "p": {"model": "prior", "tokens_from": "v"}}})
    config = load_config(path, ["embedding_dim=8", "latent_dim=4", "transformer.width=32", "epochs=3"])
    assert (config.runs["v"].embedding_dim, config.runs["e"].latent_dim, config.runs["p"].transformer.width) == (
        8,
        4,
        32,
    )
    assert [run.epochs for run in config.runs.values()] == [3, 3, 3]
    assert not hasattr(config.runs["e"], "embedding_dim") and not hasattr(config.runs["p"], "latent_dim")
    with pytest.raises(ConfigError, match="--set ema_decay: ema_decay is now decay"):
        load_config(path, ["ema_decay=0.9"])
    with caplog.at_level(logging.WARNING, logger="vqvae_faces.config"):
        config = load_config(path, ["latent_dim=4"], ["v", "p"])
    assert "--set latent_dim changes none of the selected runs ['v', 'p'] (a setting of ['vae'] runs)" in caplog.text


def test_not_json_and_not_an_object(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(write(tmp_path, "{ this is not json"))
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(write(tmp_path, "[1, 2]"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")


def test_overrides_are_typed_and_routed(tmp_path):
    path = write(tmp_path, {"runs": {"a": {}, "b": {"model": "vae"}}, "compare": []})
    config = load_config(path, ["epochs=2", "data.image_size=32", "seed=7", "annealing.min_cost=0.1"], ["a"])
    assert config.runs["a"].epochs == 2
    assert config.runs["b"].epochs != 2
    assert config.runs["a"].annealing.min_cost == 0.1
    assert config.data.image_size == 32
    assert config.seed == 7
    with pytest.raises(ConfigError, match="runs.a.epochs"):
        load_config(path, ["epochs=two"], ["a"])
    with pytest.raises(ConfigError, match="--set bogus: unknown key 'bogus'"):
        load_config(path, ["bogus=1"], ["a"])
    with pytest.raises(ConfigError, match="--run 'c'"):
        load_config(path, [], ["c"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(path, ["epochs"], ["a"])


def test_one_set_of_defaults_the_model_constructors_default_to_the_run_settings():
    """RunConfig's defaults are the shipped recipe; every model and layer constructor defaults to the same."""
    import inspect

    from vqvae_class_keras import Decoder, Encoder, ReconstructionModel, VectorQuantizerEMA
    from vqvae_faces.config import RUN_KINDS, PriorRunConfig, VQVAEConfig
    from vqvae_faces.model_settings import MODEL_CLASSES, PRIOR_CLASSES, model_arguments

    def defaults(*classes):
        return {
            name: list(p.default) if isinstance(p.default, tuple) else p.default
            for cls in classes
            for name, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }

    for name, model_class in MODEL_CLASSES.items():
        run = RUN_KINDS[name]()
        arguments = model_arguments(run, channels=3, data_variance=None, seed=None)
        expected = defaults(ReconstructionModel, model_class)
        assert {key: expected[key] for key in arguments} == arguments, name
    for architecture, prior_class in PRIOR_CLASSES.items():
        run = PriorRunConfig(tokens_from="vqvae", architecture=architecture)
        arguments = model_arguments(run, channels=3, data_variance=None, seed=None)
        expected = defaults(prior_class)
        assert {key: arguments[key] for key in expected} == expected, architecture
    run = VQVAEConfig()
    encoder, decoder = defaults(Encoder), defaults(Decoder)
    assert (encoder["filters"], encoder["activation"]) == (run.encoder_filters, run.activation)
    assert (decoder["filters"], decoder["output_activation"]) == (run.decoder_filters, run.output_activation)
    assert encoder["residual_hidden_channels"] == decoder["residual_hidden_channels"] == run.residual_hidden_channels
    quantizer = defaults(VectorQuantizerEMA)
    assert (quantizer["commitment_cost"], quantizer["decay"], quantizer["epsilon"]) == (
        run.commitment_cost,
        run.decay,
        run.epsilon,
    )
