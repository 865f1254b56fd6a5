"""Validated configuration: experiment.json plus command-line overrides.

The whole program works from one `ExperimentConfig`, built once by
`load_config()`. Every key is checked against the dataclasses below: an
unknown key, a wrong type or an out-of-range value raises `ConfigError`
whose message names the key (for example `runs.vqvae.epochs`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from vqvae_faces.atomic_files import write_json_atomically
from vqvae_faces.errors import ConfigError

log = logging.getLogger("vqvae_faces.config")

FaceAlignment = Literal["lfw", "detect", "auto"]
ALIGNMENTS = typing.get_args(FaceAlignment)


@dataclass
class AugmentationConfig:
    """On-the-fly, attribute-preserving augmentation of the training split.

    Each operation is applied to an image independently with
    `probability`; an amount of 0 (or `flip: false`) disables it.
    """

    enabled: bool = False
    probability: float = 0.25
    flip: bool = True
    brightness: float = 0.2
    contrast: float = 0.3
    sharpness: float = 0.5
    saturation: float = 0.2
    rotation_degrees: float = 5.0
    noise_stddev: float = 0.02
    translation_pixels: float = 3.0
    blur_sigma: float = 1.0
    zoom: float = 0.1

    def validate(self, path: str) -> None:
        _check_range(path, "probability", self.probability, 0.0, 1.0)
        for name in ("brightness", "contrast", "saturation", "zoom"):
            _check_range(path, name, getattr(self, name), 0.0, 0.9)
        _check_range(path, "sharpness", self.sharpness, 0.0, 1.0)
        _check_range(path, "rotation_degrees", self.rotation_degrees, 0.0, 45.0)
        _check_range(path, "noise_stddev", self.noise_stddev, 0.0, 0.5)
        _check_range(path, "translation_pixels", self.translation_pixels, 0.0, 32.0)
        _check_range(path, "blur_sigma", self.blur_sigma, 0.0, 5.0)


@dataclass
class DataConfig:
    """Where the faces come from and how they are preprocessed and split."""

    path: Optional[str] = None
    image_size: int = 64
    crop_border: int = 60
    source_size: Optional[int] = 250
    val_fraction: float = 0.05
    test_fraction: float = 0.1
    max_image_pixels: int = 25_000_000
    max_file_bytes: int = 10_000_000
    # "lfw": every image is an LFW-style crop (source_size square); "detect": the face detector aligns every
    # image to that framing; "auto": the detector aligns the images that are not source_size squares.
    face_alignment: FaceAlignment = "auto"
    # Who is who, for the split by person: "folders" (LFW's <Person>/<image> layout), "files" (each image its
    # own identity), "auto" ("files" when all images sit in one folder, else "folders"), or a CSV's path
    # (columns file, identity).
    identities: str = "auto"
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    def validate(self, path: str) -> None:
        _check_range(path, "image_size", self.image_size, 16, 1024)
        _check_range(path, "crop_border", self.crop_border, 0, 10_000)
        if self.source_size is not None:
            _check_range(path, "source_size", self.source_size, 1, 100_000)
            if 2 * self.crop_border >= self.source_size:
                raise ConfigError(
                    f"{path}.crop_border={self.crop_border} removes the whole "
                    f"{self.source_size}px source image; use a smaller border."
                )
        _check_range(path, "val_fraction", self.val_fraction, 0.0, 0.5)
        _check_range(path, "test_fraction", self.test_fraction, 0.01, 0.5)
        _check_range(path, "max_image_pixels", self.max_image_pixels, 1, 10**9)
        _check_range(path, "max_file_bytes", self.max_file_bytes, 1, 10**10)
        if self.identities not in ("auto", "folders", "files") and not self.identities.endswith(".csv"):
            raise ConfigError(
                f'{path}.identities must be "auto", "folders", "files" or a .csv file, received {self.identities!r}.'
            )
        self.augmentation.validate(f"{path}.augmentation")


@dataclass
class AnnealingConfig:
    """`CommitmentAnnealing`: steer commitment_cost by the codebook evenness (EMA perplexity / K)."""

    enabled: bool = True
    target_low: float = 0.75
    target_high: float = 0.9
    factor: float = 1.1
    decay: float = 0.995
    min_cost: float = 0.05
    max_cost: float = 1.0

    def validate(self, path: str) -> None:
        _check_range(path, "target_low", self.target_low, 0.0, 1.0)
        _check_range(path, "target_high", self.target_high, self.target_low, 1.0)
        _check_range(path, "factor", self.factor, 1.0, 10.0)
        _check_range(path, "decay", self.decay, 0.0, 1.0)
        _check_range(path, "min_cost", self.min_cost, 0.0, 100.0)
        _check_range(path, "max_cost", self.max_cost, self.min_cost, 100.0)


@dataclass
class RevivalConfig:
    """`DeadCodeRevival`: replace codes whose EMA count fell below threshold x the mean count."""

    enabled: bool = True
    threshold: float = 0.1
    max_revivals_per_batch: int = 5
    every_n_batches: int = 1
    noise: float = 0.01
    source: Literal["encoder", "codes"] = "encoder"

    def validate(self, path: str) -> None:
        _check_range(path, "threshold", self.threshold, 0.0, 1.0)
        _check_range(path, "max_revivals_per_batch", self.max_revivals_per_batch, 1, 10**6)
        _check_range(path, "every_n_batches", self.every_n_batches, 1, 10**6)
        _check_range(path, "noise", self.noise, 0.0, 10.0)


@dataclass
class PriorAugmentationConfig(AugmentationConfig):
    """A prior's augmentation: photometric changes, small shifts, scales and turns that leave a face a
    plausible face (the mirror image is `flipped_faces`); off until turned on."""

    probability: float = 0.5
    flip: bool = False
    brightness: float = 0.1
    contrast: float = 0.15
    sharpness: float = 0.0
    saturation: float = 0.15
    rotation_degrees: float = 3.0
    noise_stddev: float = 0.0
    translation_pixels: float = 2.0
    blur_sigma: float = 0.0
    zoom: float = 0.05


@dataclass
class TransformerConfig:
    """A prior's `CausalTransformer` (`token_prior.py`): its constructor arguments."""

    width: int = 128
    num_heads: int = 4
    num_layers: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0

    def validate(self, path: str) -> None:
        _check_range(path, "dropout", self.dropout, 0.0, 0.9)
        _check_range(path, "width", self.width, 8, 4096)
        _check_range(path, "num_heads", self.num_heads, 1, 64)
        if self.width % self.num_heads:
            raise ConfigError(f"{path}.width={self.width} must be divisible by {path}.num_heads={self.num_heads}.")
        _check_range(path, "num_layers", self.num_layers, 1, 64)
        _check_range(path, "mlp_ratio", self.mlp_ratio, 1, 16)


@dataclass
class PixelCNNConfig:
    """A prior's `GatedPixelCNN` (`token_prior.py`): its constructor arguments."""

    channels: int = 128
    num_layers: int = 4
    kernel_size: int = 3

    def validate(self, path: str) -> None:
        _check_range(path, "channels", self.channels, 8, 4096)
        _check_range(path, "num_layers", self.num_layers, 1, 64)
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"{path}.kernel_size={self.kernel_size} must be odd.")
        _check_range(path, "kernel_size", self.kernel_size, 1, 15)


@dataclass
class SamplingConfig:
    """How a token prior draws new faces (`--sample N`, and the samples `--eval` measures).

    Each token is drawn from the prior's distribution divided by `temperature` and
    restricted to the `top_k` most likely tokens and to the smallest set whose
    probability reaches `top_p` (null: no restriction). `eval_samples` faces are
    drawn for the memorisation check and the speed; `fid_samples` (at most ten per test face,
    0: no FID) for the FID, computed with the Keras InceptionV3 weights file `inception_weights`
    when given, else with the StyleGAN3 Inception when the optional requirements-fid.txt is
    installed, else not (`fid.py`).
    """

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    batch_size: int = 64
    eval_samples: int = 256
    fid_samples: int = 2000
    inception_weights: Optional[str] = None

    def validate(self, path: str) -> None:
        _check_range(path, "temperature", self.temperature, 0.01, 100.0)
        if self.top_k is not None:
            _check_range(path, "top_k", self.top_k, 1, 1 << 15)
        if self.top_p is not None:
            _check_range(path, "top_p", self.top_p, 0.01, 1.0)
        _check_range(path, "batch_size", self.batch_size, 1, 65536)
        _check_range(path, "eval_samples", self.eval_samples, 2, 10**6)
        if self.fid_samples != 0:
            _check_range(path, "fid_samples", self.fid_samples, 2, 10**6)


@dataclass
class CodecConfig:
    """The `.vqf` codec of a prior run (`codec.py`).

    `rate_lambda` trades size for quality: each token minimises its latent distance (in units
    of the face's mean nearest-code distance) + rate_lambda x its code length in bits; 0 codes
    the nearest codes. `--compare` encodes the test faces at each of `compare_lambdas`.
    `search_steps` > 0 chooses the tokens by decoding instead (the VQ-VAE's token search, with
    its run's `token_search_step_size`): better faces, encoding about 7x slower (25x with a
    rate term, which the search then has in its cost: the face's squared error in units of
    its nearest codes' error / positions + rate_lambda x the grid's code length). Decoding is
    the same.
    """

    rate_lambda: float = 0.0
    compare_lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3, 1.0])
    search_steps: int = 0

    def validate(self, path: str) -> None:
        _check_range(path, "rate_lambda", self.rate_lambda, 0.0, 1000.0)
        _check_range(path, "search_steps", self.search_steps, 0, 100000)
        for value in self.compare_lambdas:
            _check_range(path, "compare_lambdas", value, 0.0, 1000.0)


@dataclass
class RunConfig:
    """One named training run: what every kind of model shares, its training policy.

    `model` selects the kind, and with it the settings class: "vqvae" `VQVAEConfig`,
    "vae" `VAEConfig`, "prior" `PriorRunConfig`. A model's settings are named as the
    arguments of its constructor; a key of another kind is refused, naming the kind.
    """

    model: Literal["vqvae", "vae", "prior"] = "vqvae"
    epochs: int = 40
    max_train_minutes: Optional[float] = 30.0
    batch_size: int = 8
    learning_rate: float = 3e-3
    lr_schedule: Literal["cosine", "linear", "constant"] = "linear"
    lr_final_fraction: float = 0.02
    gradient_clipnorm: Optional[float] = 0.1
    weight_decay: float = 0.0
    patience: int = 10
    min_epoch_to_start_saving: int = 0
    divergence_ratio: Optional[float] = 3.0
    divergence_retries: int = 1
    divergence_lr_factor: float = 0.5
    mixed_precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"] = "auto"
    jit_compile: bool = False
    run_eagerly: bool = False
    snapshot_every: int = 5

    def validate(self, path: str) -> None:
        _check_range(path, "epochs", self.epochs, 1, 10**6)
        if self.max_train_minutes is not None:
            _check_range(path, "max_train_minutes", self.max_train_minutes, 0.01, 10**6)
        _check_range(path, "batch_size", self.batch_size, 1, 65536)
        _check_range(path, "learning_rate", self.learning_rate, 1e-8, 1.0)
        _check_range(path, "lr_final_fraction", self.lr_final_fraction, 0.0, 1.0)
        if self.gradient_clipnorm is not None:
            _check_range(path, "gradient_clipnorm", self.gradient_clipnorm, 1e-8, 1e6)
        _check_range(path, "weight_decay", self.weight_decay, 0.0, 10.0)
        _check_range(path, "patience", self.patience, 1, 10**6)
        _check_range(path, "min_epoch_to_start_saving", self.min_epoch_to_start_saving, 0, 10**6)
        if self.min_epoch_to_start_saving > self.epochs:
            raise ConfigError(
                f"{path}.min_epoch_to_start_saving={self.min_epoch_to_start_saving} is after the last epoch "
                f"(epochs={self.epochs}): no model would ever be saved."
            )
        if self.divergence_ratio is not None:
            _check_range(path, "divergence_ratio", self.divergence_ratio, 1.1, 1e9)
        _check_range(path, "divergence_retries", self.divergence_retries, 0, 100)
        _check_range(path, "divergence_lr_factor", self.divergence_lr_factor, 1e-6, 1.0)
        _check_range(path, "snapshot_every", self.snapshot_every, 1, 10**6)
        if self.jit_compile and self.run_eagerly:
            raise ConfigError(
                f"{path}: jit_compile=true and run_eagerly=true exclude each other (XLA compiles the train step "
                "that run_eagerly runs op by op); set one of them to false."
            )


@dataclass
class AutoencoderConfig(RunConfig):
    """What both autoencoders share: the encoder/decoder trunk, named as the arguments of
    `ReconstructionModel`, and `normalize_by_variance` (its `data_variance` is the training
    faces' variance when true, else None)."""

    encoder_filters: list[int] = field(default_factory=lambda: [32, 128])
    decoder_filters: list[int] = field(default_factory=lambda: [128, 32])
    num_residual_blocks: int = 2
    decoder_residual_blocks: Optional[int] = None
    residual_hidden_channels: int = 32
    activation: Literal["relu", "silu", "gelu"] = "silu"
    output_activation: Literal["sigmoid", "clip"] = "sigmoid"
    reconstruction_loss: Literal["mse", "psnr"] = "psnr"
    ssim_weight: float = 0.01
    l1_weight: float = 0.0
    normalize_by_variance: bool = False

    def validate(self, path: str) -> None:
        super().validate(path)
        if not self.encoder_filters:
            raise ConfigError(f"{path}.encoder_filters must list at least one filter count.")
        if len(self.decoder_filters) != len(self.encoder_filters):
            raise ConfigError(
                f"{path}.decoder_filters has {len(self.decoder_filters)} entries but "
                f"encoder_filters has {len(self.encoder_filters)}; each entry is one "
                "2x down/upsampling, so they must match."
            )
        for key in ("encoder_filters", "decoder_filters"):
            for value in getattr(self, key):
                _check_range(path, key, value, 1, 4096)
        _check_range(path, "num_residual_blocks", self.num_residual_blocks, 0, 64)
        if self.decoder_residual_blocks is not None:
            _check_range(path, "decoder_residual_blocks", self.decoder_residual_blocks, 0, 64)
        _check_range(path, "residual_hidden_channels", self.residual_hidden_channels, 1, 4096)
        _check_range(path, "ssim_weight", self.ssim_weight, 0.0, 100.0)
        _check_range(path, "l1_weight", self.l1_weight, 0.0, 100.0)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** len(self.encoder_filters)


@dataclass
class VQVAEConfig(AutoencoderConfig):
    """A VQ-VAE run: the arguments of `VQVAE` and its quantizer, the token search of its
    evaluation (`token_search_steps`, `token_search_step_size`), and its training callbacks
    (`annealing`, `revival`)."""

    model: Literal["vqvae"] = "vqvae"
    embedding_dim: int = 16
    num_embeddings: int = 512
    commitment_cost: float = 0.25
    decay: float = 0.99
    epsilon: float = 1e-5
    codebook_init: Literal["data", "uniform"] = "data"
    l2_normalize: bool = False
    # > 0: entropy-constrained assignment in training (VectorQuantizerEMA); the annealing is then off, as
    # the rate term, not an evenness target, decides how often each code is used.
    rate_lambda: float = 0.0
    token_search_steps: int = 50
    token_search_step_size: float = 1.5e-3
    annealing: AnnealingConfig = field(default_factory=AnnealingConfig)
    revival: RevivalConfig = field(default_factory=RevivalConfig)

    def validate(self, path: str) -> None:
        super().validate(path)
        _check_range(path, "embedding_dim", self.embedding_dim, 1, 4096)
        _check_range(path, "num_embeddings", self.num_embeddings, 2, 1 << 15)
        _check_range(path, "commitment_cost", self.commitment_cost, 0.0, 100.0)
        _check_range(path, "decay", self.decay, 0.0, 0.99999)
        _check_range(path, "epsilon", self.epsilon, 1e-12, 1.0)
        _check_range(path, "rate_lambda", self.rate_lambda, 0.0, 100.0)
        _check_range(path, "token_search_steps", self.token_search_steps, 0, 100000)
        _check_range(path, "token_search_step_size", self.token_search_step_size, 1e-9, 1.0)
        self.annealing.validate(f"{path}.annealing")
        self.revival.validate(f"{path}.revival")

    def bits_per_image(self, image_size: int) -> float:
        """Size of one token grid: grid cells x log2(num_embeddings)."""
        grid = image_size // self.downsampling_factor
        return grid * grid * math.log2(self.num_embeddings)


@dataclass
class VAEConfig(AutoencoderConfig):
    """A Gaussian VAE run: the arguments of `VAE`."""

    model: Literal["vae"] = "vae"
    latent_dim: int = 16
    kl_beta: float = 0.01

    def validate(self, path: str) -> None:
        super().validate(path)
        _check_range(path, "latent_dim", self.latent_dim, 1, 4096)
        _check_range(path, "kl_beta", self.kl_beta, 0.0, 1000.0)


@dataclass
class PriorRunConfig(RunConfig):
    """A token prior run: it learns the token grids of the VQ-VAE run `tokens_from`.

    `architecture` picks the network, "transformer" (`CausalTransformer`, settings in
    `transformer`) or "pixelcnn" (`GatedPixelCNN`, settings in `pixelcnn`). `flipped_faces`
    adds the tokens of the mirrored training faces to the training data. With `augmentation`
    enabled the prior learns, every epoch, the tokens of fresh variants of those faces, which
    the VQ-VAE tokenizes in the input pipeline (its nearest codes). `searched_tokens`
    learns the tokens the VQ-VAE's token search chooses (its run's `token_search_steps` and
    `token_search_step_size`) instead of the encoder's nearest codes: the tokens a codec with
    `search_steps` sends; tokenizing then takes minutes. `sampling` and `codec` say how it
    draws faces and codes them.

    A prior is a classifier over K codes at every grid cell: larger batches, a gentler learning
    rate and looser clipping than the autoencoders' recipe, the usual settings of small
    transformers (experiments/PRIOR.md has what they gave).
    """

    model: Literal["prior"] = "prior"
    tokens_from: Optional[str] = None
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    lr_final_fraction: float = 0.05
    gradient_clipnorm: Optional[float] = 1.0
    patience: int = 5
    divergence_ratio: Optional[float] = 2.0
    architecture: Literal["transformer", "pixelcnn"] = "transformer"
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    pixelcnn: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    flipped_faces: bool = True
    searched_tokens: bool = False
    augmentation: PriorAugmentationConfig = field(default_factory=PriorAugmentationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.tokens_from is None:
            raise ConfigError(f'{path}.tokens_from is missing: a "prior" run names the VQ-VAE run it learns from.')
        self.augmentation.validate(f"{path}.augmentation")
        if self.augmentation.enabled and self.searched_tokens:
            raise ConfigError(
                f"{path}.augmentation.enabled with searched_tokens: the search is too slow to tokenize fresh "
                "variants every epoch; learn the nearest codes, or turn the augmentation off."
            )
        self.transformer.validate(f"{path}.transformer")
        self.pixelcnn.validate(f"{path}.pixelcnn")
        self.sampling.validate(f"{path}.sampling")
        self.codec.validate(f"{path}.codec")


# The settings class of each kind of run.
RUN_KINDS: dict[str, type] = {"vqvae": VQVAEConfig, "vae": VAEConfig, "prior": PriorRunConfig}
# Keys of earlier versions, and where their settings are now.
RENAMED_KEYS = {
    "ema_decay": "decay",
    "ema_epsilon": "epsilon",
    "l2_normalize_codes": "l2_normalize",
    "prior": "architecture, flipped_faces, searched_tokens, and transformer.* or pixelcnn.* (channels)",
}


@dataclass
class ExperimentConfig:
    """Everything one invocation of vqvae_face_main.py works from."""

    enable_training: bool = True
    seed: int = 1234
    distribution: Literal["auto", "none", "mirrored", "multi_worker"] = "auto"
    scale_learning_rate: bool = False
    deterministic: bool = False
    collective_timeout_seconds: float = 300.0
    data: DataConfig = field(default_factory=DataConfig)
    runs: dict[str, RunConfig] = field(default_factory=lambda: _build_runs(copy.deepcopy(DEFAULT_RUNS)))
    compare: list[str] = field(default_factory=list)

    def validate(self) -> None:
        _check_range("", "collective_timeout_seconds", self.collective_timeout_seconds, 1.0, 86400.0)
        self.data.validate("data")
        if not self.runs:
            raise ConfigError("runs is empty: define at least one named run.")
        for name, run in self.runs.items():
            if not name or any(c in name for c in "/\\.") or name.startswith("-"):
                raise ConfigError(f"runs: run name {name!r} must be a plain folder name.")
            run.validate(f"runs.{name}")
            if isinstance(run, PriorRunConfig):
                self._check_token_source(name, run)
                continue
            if self.data.image_size % run.downsampling_factor:
                raise ConfigError(
                    f"data.image_size={self.data.image_size} is not divisible by the "
                    f"downsampling factor {run.downsampling_factor} of runs.{name} "
                    f"({len(run.encoder_filters)} encoder_filters entries)."
                )
        for name in self.compare:
            if name not in self.runs:
                raise ConfigError(f"compare names {name!r}, which is not in runs ({sorted(self.runs)}).")

    def _check_token_source(self, name: str, run: PriorRunConfig) -> None:
        source = self.runs.get(run.tokens_from)
        if not isinstance(source, VQVAEConfig):
            vqvae_runs = sorted(n for n, r in self.runs.items() if isinstance(r, VQVAEConfig))
            raise ConfigError(
                f"runs.{name}.tokens_from={run.tokens_from!r} must name a VQ-VAE run of this config "
                f"(VQ-VAE runs: {vqvae_runs})."
            )
        if run.searched_tokens and source.token_search_steps == 0:
            raise ConfigError(
                f"runs.{name}.searched_tokens is true but runs.{run.tokens_from}.token_search_steps "
                "is 0: give the VQ-VAE run a token search, or learn its nearest codes."
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def token_alphabet(self, prior_run: str) -> tuple[int, tuple[int, int]]:
        """(K, (rows, columns)): the codes and grid of the tokens a prior run learns."""
        source = self.runs[self.runs[prior_run].tokens_from]
        side = self.data.image_size // source.downsampling_factor
        return source.num_embeddings, (side, side)

    def training_order(self, run_names: list[str]) -> list[str]:
        """`run_names` with each prior after the VQ-VAE run it learns from (when that is among them)."""
        ordered: list[str] = []
        for name in run_names:
            source = getattr(self.runs[name], "tokens_from", None)
            if source in run_names and source not in ordered:
                ordered.append(source)
            if name not in ordered:
                ordered.append(name)
        return ordered


# The runs of a config that names none: the VQ-VAE, the VAE it is compared with, and the VQ-VAE's token prior.
DEFAULT_RUNS = {"vqvae": {}, "vae": {"model": "vae"}, "prior": {"model": "prior", "tokens_from": "vqvae"}}


def _build_runs(runs: dict) -> dict[str, RunConfig]:
    """Each run's settings, of the class its `model` names (`RUN_KINDS`)."""
    built = {}
    for name, run in runs.items():
        where = f"runs.{name}"
        if not isinstance(run, dict):
            raise ConfigError(f"{where}={run!r} has the wrong type: expected an object.")
        kind = run.get("model", "vqvae")
        if not isinstance(kind, str) or kind not in RUN_KINDS:
            kinds = ", ".join(map(repr, RUN_KINDS))
            raise ConfigError(f"{where}.model={kind!r} has the wrong type: expected one of {kinds}.")
        _check_keys_of_kind(run, kind, where)
        built[name] = _build(RUN_KINDS[kind], run, where)
    return built


def _run_keys(kind: str) -> set[str]:
    """The keys a run of `kind` takes."""
    return {f.name for f in dataclasses.fields(RUN_KINDS[kind])}


def _kinds_with(key: str) -> list[str]:
    """The kinds of run that take `key`."""
    return [kind for kind in RUN_KINDS if key in _run_keys(kind)]


def _check_keys_of_kind(run: dict, kind: str, path: str) -> None:
    """Refuse a key of another kind of run, or one renamed since, saying where it belongs."""
    known = _run_keys(kind)
    for key in run:
        if key in known:
            continue
        if key in RENAMED_KEYS:
            raise ConfigError(f"{path}.{key} is now {RENAMED_KEYS[key]}: rename it.")
        kinds = _kinds_with(key)
        if kinds:
            raise ConfigError(
                f"{path}.{key} is a setting of {' and '.join(map(repr, kinds))} runs, not of a {kind!r} run: remove it."
            )


def _check_range(path: str, key: str, value, low, high) -> None:
    if not (low <= value <= high):
        name = f"{path}.{key}" if path else key
        raise ConfigError(f"{name}={value!r} is out of range: expected {low} <= value <= {high}.")


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return "an object"
    if dataclasses.is_dataclass(annotation):
        return "an object"
    return annotation.__name__


def _convert(annotation, value, path: str):
    """Check `value` against a type annotation and return it converted."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        for option in typing.get_args(annotation):
            try:
                return _convert(option, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}={value!r} has the wrong type: expected {_type_name(annotation)}.")
    if annotation is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in typing.get_args(annotation):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item_type,) = typing.get_args(annotation)
            return [_convert(item_type, v, f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, item_type = typing.get_args(annotation)
            return {k: _convert(item_type, v, f"{path}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(annotation):
        if isinstance(value, dict):
            return _build(annotation, value, path)
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{path}={value!r} has the wrong type: expected {_type_name(annotation)}.")


def _build(cls, mapping: dict, path: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in known:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown key {where!r}; allowed keys: {', '.join(sorted(known))}.")
    kwargs = {}
    for key, value in mapping.items():
        kwargs[key] = _convert(hints[key], value, f"{path}.{key}" if path else key)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set epochs=2.")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: malformed key {key!r}.")
    return parts, value


def _assign(mapping: dict, parts: list[str], value) -> None:
    for part in parts[:-1]:
        child = mapping.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set: {'.'.join(parts)} goes inside {part!r}, which is not an object.")
        mapping = child
    mapping[parts[-1]] = value


def _apply_override(raw: dict, selected: list[str], parts: list[str], value) -> None:
    """`data.KEY=V` and the top-level keys go where they say; any other key is set in each selected run
    of a kind that has it (a warning when none of them has it). A key no kind of run has is refused."""
    if parts[0] in {f.name for f in dataclasses.fields(ExperimentConfig)} - {"runs"}:
        _assign(raw, parts, value)
        return
    placed = False
    for name in selected:
        run = raw["runs"][name]
        kind = run.get("model", "vqvae") if isinstance(run, dict) else None
        if kind in RUN_KINDS and parts[0] in _run_keys(kind):
            _assign(run, parts, value)
            placed = True
    if not placed:
        key = ".".join(parts)
        if parts[0] in RENAMED_KEYS:
            raise ConfigError(f"--set {key}: {parts[0]} is now {RENAMED_KEYS[parts[0]]}.")
        kinds = _kinds_with(parts[0])
        if not kinds:
            raise ConfigError(f"--set {key}: unknown key {parts[0]!r} (not a setting of any kind of run).")
        log.warning("--set %s changes none of the selected runs %s (a setting of %s runs)", key, selected, kinds)


def load_config(
    path: Optional[str | Path] = None,
    overrides: list[str] = (),
    run_names: Optional[list[str]] = None,
) -> ExperimentConfig:
    """Read experiment.json (or the defaults), apply `--set` overrides, validate.

    Overrides: `data.KEY=V` and the top-level keys (`seed`, `enable_training`,
    `compare`) go where they say; any other `KEY=V` (or `annealing.KEY=V`)
    is set in each selected run. Values are parsed as JSON when they can be.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}.") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a JSON object at the top level.")
    raw.setdefault("runs", copy.deepcopy(DEFAULT_RUNS))
    if not isinstance(raw["runs"], dict):
        raise ConfigError(f"runs={raw['runs']!r} has the wrong type: expected an object.")
    selected = list(raw["runs"]) if run_names is None else run_names
    for name in selected:
        if name not in raw["runs"]:
            raise ConfigError(f"--run {name!r} is not a run in the config; runs are: {sorted(raw['runs'])}.")
    for text in overrides:
        _apply_override(raw, selected, *_parse_override(text))
    runs = _build_runs(raw.pop("runs"))
    config = _build(ExperimentConfig, raw, "")
    config.runs = runs
    config.validate()
    return config


def save_resolved_config(config: ExperimentConfig, run_name: str, path: Path, **extra) -> None:
    """Write the shared settings and one run's resolved settings as JSON (plus `extra` records)."""
    resolved = {
        "seed": config.seed,
        "data": dataclasses.asdict(config.data),
        "run_name": run_name,
        "run": dataclasses.asdict(config.runs[run_name]),
        **extra,
    }
    write_json_atomically(resolved, path)
