"""Parse `params.yaml` once, at the edge, into frozen dataclasses.

Every key is checked: unknown keys (with the closest valid one suggested), wrong types and
impossible values raise `ConfigError` naming the full key, the value and what is allowed.
Stages call `load_params()` and hand plain values to the core functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from pipeline.core.results import PIXELS, PROBE, SUMMARY_SECTIONS
from pipeline.core.vgg16 import (
    BLOCKS,
    CONV_LAYERS,
    CUT_POINTS,
    FULL_BASE,
    MIN_IMAGE_SIZE,
    PARAMETER_KINDS,
    check_cut,
    head_features,
    kept_layers,
    max_lora_rank,
    resolve_trainable,
)
from pipeline.runtime.errors import ConfigError

NAMED_WEIGHTS = ("hed", "imagenet", "none")
POOLINGS = ("auto", "flatten", "gap")
HEAD_NORMS = ("standardize", "none")
DATA_SOURCES = ("fashion_mnist", "directory")


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, f"{value!r} is not allowed; {allowed}")


def _check_unique(key: str, values, what: str) -> None:
    """ConfigError naming the repeated entries of `values` (a list), if any: "{what} must be unique"."""
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    _check(not repeated, key, list(values), f"{what} must be unique (repeated: {repeated})")


def _check_seeds(key: str, seeds: tuple[int, ...]) -> None:
    _check(len(seeds) >= 1, key, list(seeds), "give at least one seed")
    _check_unique(key, list(seeds), "seeds")


def _check_weights(key: str, value: str) -> None:
    _check(
        value in NAMED_WEIGHTS or value.endswith(".h5"),
        key,
        value,
        f"use one of {', '.join(NAMED_WEIGHTS)} or a path to a VGG16-notop .weights.h5/.h5 file",
    )


@dataclass(frozen=True)
class DataParams:
    source: str
    image_size: int
    train_per_class: int
    val_per_class: int
    test_per_class: int
    skip_unreadable: bool = False
    fashion_mnist_dir: str | None = None
    directory: str | None = None

    def __post_init__(self):
        _check(self.source in DATA_SOURCES, "source", self.source, f"use one of {DATA_SOURCES}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ConfigError("image_size", f"{self.image_size} is below VGG16's minimum of {MIN_IMAGE_SIZE}")
        for name in ("train_per_class", "val_per_class", "test_per_class"):
            value = getattr(self, name)
            _check(value >= 1, name, value, "it must be at least 1")
        if self.source == "directory" and not self.directory:
            raise ConfigError(
                "directory", "is required when data.source is 'directory' (a folder with one sub-folder per class)"
            )


@dataclass(frozen=True)
class ModelParams:
    weights: str
    pooling: str
    head_units: int
    dropout: float
    head_norm: str = "standardize"  # pooled features standardised with training-set statistics; "none"

    def __post_init__(self):
        _check_weights("weights", self.weights)
        _check(self.pooling in POOLINGS, "pooling", self.pooling, f"use one of {POOLINGS}")
        _check(self.head_norm in HEAD_NORMS, "head_norm", self.head_norm, f"use one of {HEAD_NORMS}")
        _check(self.head_units >= 0, "head_units", self.head_units, "it must be >= 0 (0 = no hidden layer)")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "it must be in [0, 1)")


@dataclass(frozen=True)
class TrainParams:
    """The one training rule, for every strategy, seed and tune trial: up to `max_epochs`, stopped
    once validation loss has not improved by `min_delta` for `patience` epochs; the best epoch's
    weights are kept."""

    max_epochs: int
    patience: int
    min_delta: float
    batch_size: int
    learning_rate: float
    seeds: tuple[int, ...]  # every strategy, the end-to-end ones too: comparisons are paired on seeds
    cache_features: bool = True
    augmentation: bool = False
    jit_compile: bool = False  # XLA: changes numerics, no faster on this CPU (reports/benchmark.md)
    mixed_precision: bool = False  # bfloat16 compute: changes numerics, slower without AMX/bf16 CPUs

    def __post_init__(self):
        _check(self.max_epochs >= 1, "max_epochs", self.max_epochs, "it must be at least 1")
        _check(self.patience >= 1, "patience", self.patience, "it must be at least 1 (epochs without improvement)")
        _check(self.min_delta >= 0, "min_delta", self.min_delta, "it must be >= 0 (a validation-loss decrease)")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "it must be at least 1")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "it must be > 0")
        _check_seeds("seeds", self.seeds)


def _check_cut(key: str, value: str) -> None:
    _check(value in CUT_POINTS, key, value, f"use a block name: {', '.join(CUT_POINTS)} ({FULL_BASE} = no cut)")


@dataclass(frozen=True)
class VariantParams:
    """A strategy: where the base is cut, which of its layers train and which of their parameters
    (`parameters`: all, bias, lora with `lora_rank`, scale_shift; pipeline/core/vgg16.py
    TRAINED_VARIABLES), optionally its own weight source, a head-only warm-up (linear probe, then
    fine-tune) and per-block learning-rate multipliers."""

    trainable: str | tuple[str, ...]
    weights: str | None = None
    warmup_epochs: int = 0  # head-only epochs first, counted in the epoch budget
    lr_multipliers: dict[str, float] | None = None  # block -> factor on the learning rate (discriminative LRs)
    cut_after: str = FULL_BASE  # the base ends after this block's pooling; the blocks above are removed
    parameters: str = "all"  # which parameters of the `trainable` layers train
    lora_rank: int = 0  # parameters: lora only, the rank r of every adapted layer's update

    def __post_init__(self):
        _check_cut("cut_after", self.cut_after)
        layers = self.layers  # raises ConfigError("trainable", ...) on bad names and layers above the cut
        self._check_parameters(layers)
        if self.weights is not None:
            _check_weights("weights", self.weights)
        _check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "it must be >= 0 (0 = no warm-up)")
        if self.warmup_epochs:
            _check(
                bool(layers),
                "warmup_epochs",
                self.warmup_epochs,
                "a head-only warm-up needs a strategy that trains conv layers afterwards; use 0",
            )
        for block, factor in (self.lr_multipliers or {}).items():
            key = f"lr_multipliers.{block}"
            _check(block in BLOCKS, key, block, f"use a block name: {', '.join(BLOCKS)}")
            _check(factor > 0, key, factor, "it must be > 0")
            _check(
                BLOCKS[block][0] in kept_layers(self.cut_after),
                key,
                factor,
                f"{block} is above the cut (cut_after: {self.cut_after} removes it); remove the entry",
            )
            _check(
                bool(layers & set(BLOCKS[block])),
                key,
                factor,
                f"{block} does not train in this strategy (see its `trainable`); remove the entry",
            )

    def _check_parameters(self, layers: frozenset[str]) -> None:
        kinds = ", ".join(PARAMETER_KINDS)
        _check(self.parameters in PARAMETER_KINDS, "parameters", self.parameters, f"use one of {kinds}")
        _check(
            self.parameters == "all" or bool(layers),
            "parameters",
            self.parameters,
            "it says which parameters of the `trainable` conv layers train, and this strategy trains none "
            "(trainable: none); select layers, e.g. trainable: all",
        )
        if self.parameters != "lora":
            _check(self.lora_rank == 0, "lora_rank", self.lora_rank, "it applies to parameters: lora only; remove it")
            return
        _check(
            self.lora_rank >= 1, "lora_rank", self.lora_rank, "parameters: lora needs a rank >= 1, e.g. lora_rank: 4"
        )
        for name in sorted(layers, key=CONV_LAYERS.index):
            _check(
                self.lora_rank <= max_lora_rank(name),
                "lora_rank",
                self.lora_rank,
                f"{name}'s kernel has rank at most {max_lora_rank(name)} (min(9 x input channels, filters)); "
                "lower the rank or leave that layer out of `trainable`",
            )

    @property
    def layers(self) -> frozenset[str]:
        """The conv layers that train ("all" = every layer the cut keeps)."""
        layers = resolve_trainable(self.trainable, self.cut_after)
        check_cut(layers, self.cut_after)
        return layers

    @property
    def multipliers(self) -> tuple[tuple[str, float], ...]:
        """lr_multipliers as sorted (block, factor) pairs (hashable, for RunConfig)."""
        return tuple(sorted((self.lr_multipliers or {}).items()))


@dataclass(frozen=True)
class TuneParams:
    """The tuning budget and search space, equal for every strategy: `n_trials` trials from the
    same kind of design, each trained under the train stage's rule (`train.max_epochs`,
    `patience`, `min_delta`). Successive halving inside each strategy's own study makes the
    end-to-end strategies affordable: at epoch `halving_epoch` a trial continues only when its
    best validation accuracy so far is in the top 1/`halving_factor` of the study's trials at
    that epoch (0 = no halving; cached strategies never halve: `Params.halving_epoch`)."""

    n_trials: int
    head_units: tuple[int, ...]
    learning_rate: tuple[float, ...]  # [low, high], log-uniform, for strategies that train conv layers
    learning_rate_head_only: tuple[float, ...]  # [low, high] for strategies that train the head only
    halving_epoch: int  # the rung: the epoch at which trials are compared (0 = off)
    halving_factor: int  # keep the top 1/halving_factor of the trials at the rung (rounded up)
    design_seed: int  # the start-up design's offsets and TPE's draws (a second value repeats the tuning)
    storage: str  # "journal" (a file per variant under results/tune) or an RDB URL
    n_workers: int
    trials_per_process: int  # a long study restarts its process after this many trials (memory)
    startup_trials: int  # space-filling design points before TPE models the space
    heartbeat_seconds: int  # database storage: a worker silent for 4 heartbeats has its trial failed and rerun
    # learning_rate_head_only is the range of a head reading this many (standardised) values; a head
    # reading F values searches it times reference / F (0 = the same range for every head)
    head_only_reference_features: int = 512

    def __post_init__(self):
        for name in ("n_trials", "n_workers", "trials_per_process", "heartbeat_seconds"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "it must be at least 1")
        _check(self.startup_trials >= 1, "startup_trials", self.startup_trials, "it must be at least 1")
        _check(self.halving_epoch >= 0, "halving_epoch", self.halving_epoch, "it must be >= 0 (0 = no halving)")
        _check(self.halving_factor >= 2, "halving_factor", self.halving_factor, "it must be at least 2 (keep 1/2)")
        units = list(self.head_units)
        _check(len(units) >= 1, "head_units", units, "give at least one choice, e.g. [0, 64, 256]")
        _check(all(u >= 0 for u in units), "head_units", units, "choices must be >= 0 (0 = no hidden layer)")
        _check_unique("head_units", list(units), "choices")
        _check(
            self.head_only_reference_features >= 0,
            "head_only_reference_features",
            self.head_only_reference_features,
            "it must be >= 0 (0 = no scaling by the head's input size)",
        )
        for name in ("learning_rate", "learning_rate_head_only"):
            low_high = list(getattr(self, name))
            _check(len(low_high) == 2, name, low_high, "give a range [low, high], e.g. [1.0e-5, 3.0e-3]")
            _check(0 < low_high[0] < low_high[1], name, low_high, "need 0 < low < high")
        _check(
            self.storage == "journal" or "://" in self.storage,
            "storage",
            self.storage,
            "use 'journal' (a local file, several processes) or a database URL such as postgresql://user@host/db",
        )
        _check(
            urlsplit(self.storage).password is None,
            "storage",
            self.storage.replace(f":{urlsplit(self.storage).password}@", ":***@"),
            "the URL holds a password, which params.yaml would put in git and dvc.lock; remove it from the URL and "
            'give it in the environment (PGPASSWORD, or a ~/.pgpass file): README "Running on several machines"',
        )


@dataclass(frozen=True)
class MlflowParams:
    tracking_uri: str
    experiment: str
    registered_model: str
    system_metrics: bool  # CPU, memory, disk of train and tune runs (MLflow's sampler, every second)

    def __post_init__(self):
        _check(
            "://" in self.tracking_uri,
            "tracking_uri",
            self.tracking_uri,
            "use a URI such as sqlite:///mlflow.db, http://127.0.0.1:5000 or postgresql://...",
        )
        _check(bool(self.experiment.strip()), "experiment", self.experiment, "give a non-empty name")
        _check(bool(self.registered_model.strip()), "registered_model", self.registered_model, "give a non-empty name")


# summary.json's sections beside the strategies, and the reference baselines (candidates of the
# answer beside the strategies): a strategy may not take one of these names
RESERVED_NAMES = (*SUMMARY_SECTIONS, PIXELS, PROBE)


@dataclass(frozen=True)
class ReportParams:
    target_accuracy: float
    baseline: str  # the strategy every other one is compared against, seed by seed
    margin: float  # non-inferiority margin (accuracy) of the answer rule (pipeline/analysis/recommendation.py)

    def __post_init__(self):
        _check(0.0 < self.target_accuracy <= 1.0, "target_accuracy", self.target_accuracy, "it must be in (0, 1]")
        _check(0.0 <= self.margin < 0.5, "margin", self.margin, "it must be in [0, 0.5): an accuracy difference")


@dataclass(frozen=True)
class SampleEfficiencyParams:
    """Test accuracy of every strategy as the training set grows (off while the list is empty)."""

    train_per_class: tuple[int, ...] = ()  # e.g. [10, 25, 50, 100, 250]; [] = study off
    seeds: tuple[int, ...] = (1, 2, 3)

    def __post_init__(self):
        sizes = list(self.train_per_class)
        _check(all(n >= 1 for n in sizes), "train_per_class", sizes, "sizes must be >= 1")
        _check_unique("train_per_class", list(sizes), "sizes")
        _check_seeds("seeds", self.seeds)


@dataclass(frozen=True)
class DepthParams:
    """The freezing-depth sweep: train the top k conv layers (off while the list is empty), of the
    base cut after each block in `cut_after` (a second axis: cut point x depth)."""

    k: tuple[int, ...] = ()  # e.g. [0, 1, ..., 13]; 0 = frozen, 13 = full; [] = study off
    seeds: tuple[int, ...] = (1, 2)
    weights: str | None = None  # null = model.weights
    cut_after: tuple[str, ...] = (FULL_BASE,)  # e.g. [block3, block4, block5]; block5 = the whole base

    def __post_init__(self):
        ks = list(self.k)
        _check(all(0 <= k <= len(CONV_LAYERS) for k in ks), "k", ks, f"every k must be in 0..{len(CONV_LAYERS)}")
        _check_unique("k", list(ks), "values")
        _check_seeds("seeds", self.seeds)
        if self.weights is not None:
            _check_weights("weights", self.weights)
        cuts = list(self.cut_after)
        _check(len(cuts) >= 1, "cut_after", cuts, f"give at least one block, e.g. [{FULL_BASE}] (the whole base)")
        _check_unique("cut_after", list(cuts), "values")
        for cut in cuts:
            _check_cut("cut_after", cut)
            kept = len(kept_layers(cut))
            _check(
                all(k <= kept for k in ks),
                "k",
                ks,
                f"a base cut after {cut} keeps {kept} conv layers, so every k must be <= {kept} (every k is "
                "trained at every cut in `cut_after`); drop the larger k or that cut",
            )

    def variant_name(self, cut: str, k: int) -> str:
        """The depth sweep's strategy name: `top<k>` on the whole base, `<cut>_top<k>` on a cut one."""
        return f"top{k}" if cut == FULL_BASE else f"{cut}_top{k}"


CORRUPTIONS = ("gaussian_noise", "blur", "contrast")


@dataclass(frozen=True)
class RobustnessParams:
    """Evaluate every trained model on corrupted copies of the test set as well."""

    enabled: bool = False
    corruptions: tuple[str, ...] = CORRUPTIONS
    severity: int = 3  # 1 (mild) .. 5 (severe), ImageNet-C style levels
    seed: int = 0  # the noise draw

    def __post_init__(self):
        bad = [c for c in self.corruptions if c not in CORRUPTIONS]
        _check(not bad, "corruptions", list(self.corruptions), f"use some of {', '.join(CORRUPTIONS)}")
        _check(len(self.corruptions) >= 1, "corruptions", [], f"use some of {', '.join(CORRUPTIONS)}")
        _check(1 <= self.severity <= 5, "severity", self.severity, "it must be in 1..5")


@dataclass(frozen=True)
class ParameterEfficientParams:
    """Beyond layer freezing: the strategies of `strategies` named in `run` (off while it is
    empty), each tuned and trained like the main comparison's (the same rule, budget and seeds)
    and read with them (README "Beyond layer freezing")."""

    run: tuple[str, ...] = ()  # names from `strategies`; [] = study off
    strategies: dict[str, VariantParams] = dataclasses.field(default_factory=dict)  # the `variants` schema
    robustness: bool = True  # the study's models are also evaluated on the corrupted test set (studies.robustness)

    def __post_init__(self):
        names = list(self.run)
        _check_unique("run", list(names), "names")
        unknown = [name for name in names if name not in self.strategies]
        defined = ", ".join(self.strategies) or "none"
        _check(not unknown, "run", names, f"{unknown} are not in `strategies` (defined: {defined}); define them there")


@dataclass(frozen=True)
class StudiesParams:
    sample_efficiency: SampleEfficiencyParams = SampleEfficiencyParams()
    depth: DepthParams = DepthParams()
    robustness: RobustnessParams = RobustnessParams()
    parameter_efficient: ParameterEfficientParams = ParameterEfficientParams()


@dataclass(frozen=True)
class Params:
    seed: int
    data: DataParams
    model: ModelParams
    train: TrainParams
    variants: dict[str, VariantParams]
    tune: TuneParams
    mlflow: MlflowParams
    report: ReportParams
    studies: StudiesParams = StudiesParams()

    def __post_init__(self):
        if not self.variants:
            raise ConfigError("variants", "is empty; define at least one strategy, e.g. frozen: {trainable: none}")
        reserved = sorted(set(self.variants) & set(RESERVED_NAMES))
        if reserved:
            problem = "is a reserved name (a section of reports/summary.json or a baseline); rename the strategy"
            raise ConfigError(f"variants.{reserved[0]}", problem)
        study = self.studies.parameter_efficient.strategies
        taken = [name for name in self.studies.parameter_efficient.run if name in (*self.variants, *RESERVED_NAMES)]
        if taken:
            raise ConfigError(
                "studies.parameter_efficient.run",
                f"{taken[0]!r} is also a main strategy (`variants`) or a reserved name; the study's strategies are "
                "read beside the main ones, so rename it in `strategies` and `run` (or drop it from `run`)",
            )
        limit = self.train.max_epochs
        named = [*(("variants", k, v) for k, v in self.variants.items()),
                 *(("studies.parameter_efficient.strategies", k, v) for k, v in study.items())]  # fmt: skip
        for section, name, variant in named:
            if variant.warmup_epochs >= limit:
                raise ConfigError(
                    f"{section}.{name}.warmup_epochs",
                    f"{variant.warmup_epochs} leaves no fine-tuning epoch within train.max_epochs={limit}; "
                    f"lower it below {limit} (the warm-up counts in the budget)",
                )
        if self.tune.halving_epoch >= limit:
            raise ConfigError(
                "tune.halving_epoch",
                f"{self.tune.halving_epoch} is not below train.max_epochs={limit}: no trial could be cut before "
                "its rule ends it; lower it, or use 0 (no halving)",
            )
        if self.report.baseline not in self.variants:
            raise ConfigError(
                "report.baseline", f"{self.report.baseline!r} is not a strategy; defined: {', '.join(self.variants)}"
            )

    def trains_end_to_end(self, variant: str) -> bool:
        """True when `variant` cannot train on cached prefix features: random init, block1_conv1
        trains, or the cache is off (augmentation on, `train.cache_features: false`)."""
        layers = self.variant(variant).layers
        return (
            CONV_LAYERS[0] in layers
            or self.variant_weights(variant) == "none"
            or not self.train.cache_features
            or self.train.augmentation
        )

    def learning_rate_key(self, variant: str) -> str:
        """The params key of `variant`'s searched learning-rate range: `tune.learning_rate_head_only`
        when no conv layer ever trains (the head alone is stable at rates that wreck a pretrained
        base), else `tune.learning_rate`."""
        trains_conv = bool(self.variant(variant).layers)
        return "tune.learning_rate" if trains_conv else "tune.learning_rate_head_only"

    def learning_rate_range(self, variant: str) -> tuple[float, float]:
        """The searched learning-rate range of `variant` (see `learning_rate_key`); a head-only
        strategy's range is scaled by `head_only_lr_scale`."""
        key = self.learning_rate_key(variant)
        low, high = getattr(self.tune, key.split(".")[1])
        if key == "tune.learning_rate":
            return low, high
        scale = self.head_only_lr_scale(variant)
        return low * scale, high * scale

    def head_only_lr_scale(self, variant: str) -> float:
        """`tune.head_only_reference_features` / the number of values `variant`'s head reads (1 when
        the reference is 0). Adam moves every weight by about the learning rate per step, so the
        logits over F standardised inputs move about F times as far: the same rate is 16x as fast
        on a base cut after block2 (8,192 values at 32x32) as on the whole base (512), and its
        trials peak within a few epochs below the convex probe (README "Tuning"). Scaling by 1/F is
        μP's rule for Adam on a matrix of fan-in F (Yang et al. 2022, "Tensor Programs V")."""
        reference = self.tune.head_only_reference_features
        if not reference:
            return 1.0
        features = head_features(self.data.image_size, self.variant(variant).cut_after, self.model.pooling)
        return reference / features

    def halving_epoch(self, variant: str) -> int:
        """The halving rung of `variant`'s study: `tune.halving_epoch` for strategies that train end
        to end, 0 (no halving) for cached ones, whose epochs cost little and whose trials' ranks at
        epoch 4 did not hold to the full horizon (README "Tuning")."""
        return self.tune.halving_epoch if self.trains_end_to_end(variant) else 0

    def variant_weights(self, variant: str) -> str:
        """The weight source of `variant`: its own override, else `model.weights`."""
        return self.variants[variant].weights or self.model.weights

    def with_depth(self, k: int, cut: str = FULL_BASE) -> tuple[Params, str]:
        """These params with the depth sweep's strategy (train the top k conv layers of the base cut
        after `cut`) as the only variant, and its name (`DepthParams.variant_name`)."""
        _check_cut("--cut", cut)
        kept = kept_layers(cut)
        _check(
            0 <= k <= len(kept), "--depth", k, f"a base cut after {cut} keeps {len(kept)} conv layers: 0..{len(kept)}"
        )
        name = self.studies.depth.variant_name(cut, k)
        spec = kept[len(kept) - k :]
        variant = VariantParams(trainable=spec, weights=self.studies.depth.weights, cut_after=cut)
        report = dataclasses.replace(self.report, baseline=name)
        return dataclasses.replace(self, variants={name: variant}, report=report), name

    def select(
        self, variant: str | None = None, depth: int | None = None, cut: str | None = None, study: str | None = None
    ) -> tuple[Params, str]:
        """(params, name) of the one strategy a tune or train stage runs: `variant` (a key of
        `variants`, these params), the depth sweep's top<depth> on the base cut after `cut`
        (`with_depth`) or the parameter-efficient study's `study` (`with_study_strategy`).
        ConfigError for an unknown name."""
        if depth is not None:
            return self.with_depth(depth, cut or FULL_BASE)
        if cut is not None:
            raise ConfigError("--cut", f"{cut!r} applies to --depth only (the depth sweep's base); remove it")
        if study is not None:
            return self.with_study_strategy(study)
        self.variant(variant)
        return self, variant

    def with_study_strategy(self, name: str) -> tuple[Params, str]:
        """These params with the parameter-efficient study's strategy `name` as the only variant
        (the study's `run` emptied: it is the one strategy now), and its name."""
        study = self.studies.parameter_efficient
        if name not in study.strategies:
            defined = ", ".join(study.strategies) or "none"
            raise ConfigError("studies.parameter_efficient.strategies", f"has no strategy {name!r}; defined: {defined}")
        studies = dataclasses.replace(self.studies, parameter_efficient=dataclasses.replace(study, run=()))
        report = dataclasses.replace(self.report, baseline=name)
        strategy = {name: study.strategies[name]}
        return dataclasses.replace(self, variants=strategy, report=report, studies=studies), name

    def variant(self, name: str) -> VariantParams:
        if name not in self.variants:
            raise ConfigError("variants", f"has no strategy {name!r}; defined: {', '.join(self.variants)}")
        return self.variants[name]


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file. Raises ConfigError (a ValueError) on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "params file not found; run from the repository root or pass --params")
    return parse_params(read_yaml(path))


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects duplicate keys (YAML's own loader silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class rejects an unhashable key with its own error
            if key in seen:
                raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _safe_load_unique(text: str):
    """yaml.safe_load that also rejects duplicate keys (the loader is a SafeLoader subclass: plain
    data only, no Python objects)."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class _DuplicateKey(Exception):
    def __init__(self, key, first_line: int, line: int):
        self.key, self.first_line, self.line = key, first_line, line


def read_yaml(path: Path) -> dict:
    """The mapping in a YAML params file. Every way the file itself can be wrong (not UTF-8, empty,
    a syntax error, a tab in the indentation, a duplicate key, not a mapping) is a ConfigError
    naming the file, the line and the fix."""
    name = str(path)
    restore = f"restore the committed file (`git checkout -- {path.name}`)"
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            name,
            f"line {line}: byte 0x{data[error.start]:02x} is not UTF-8 text; save the file "
            "as UTF-8 (the encoding YAML requires)",
        ) from None
    for number, line in enumerate(text.splitlines(), 1):
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        if "\t" in indent and line.strip() and not line.lstrip().startswith("#"):
            raise ConfigError(
                name,
                f"line {number}: a tab in the indentation; YAML indents with spaces only, replace the tab with spaces",
            )
    try:
        raw = _safe_load_unique(text)
    except _DuplicateKey as error:
        duplicate = f"line {error.line}: duplicate key {error.key!r} (first at line {error.first_line})"
        fix = "YAML would silently keep only the last one, so delete one of them"
        raise ConfigError(name, f"{duplicate}; {fix}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        context = getattr(error, "context", None)
        opened = getattr(error, "context_mark", None)
        if context and opened and (not mark or opened.line != mark.line):
            context += f" opened at line {opened.line + 1}"
        found = f"{where}YAML syntax error ({problem}" + (f", {context}" if context else "") + ")"
        fix = f"fix the YAML there or on the line it names (indentation, colons, quotes, brackets) or {restore}"
        raise ConfigError(name, f"{found}; {fix}") from None
    if raw is None:
        raise ConfigError(name, f"the file is empty (or only comments); {restore}")
    if not isinstance(raw, dict):
        raise ConfigError(
            name,
            f"the file holds a YAML {type(raw).__name__}, not a mapping of sections (seed:, "
            f"data:, model:, ...); {restore}",
        )
    return raw


def parse_params(raw: object) -> Params:
    """Validate an already-loaded mapping (what `yaml.safe_load` gives) into `Params`."""
    return _build(Params, raw, "")


# --- generic dataclass builder -------------------------------------------------------------


def _build(cls, raw: object, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "params", f"expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {prefix + close[0]!r}? " if close else ""
            raise ConfigError(f"{prefix}{key}", f"unknown key; {hint}valid keys: {', '.join(fields)}")
    values = {}
    for name, field in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            if not has_default:
                raise ConfigError(key, "is missing")
            continue
        values[name] = _convert(hints[name], raw[name], key)
    try:
        return cls(**values)
    except ConfigError as error:  # __post_init__ names keys relative to its own section
        raise ConfigError(f"{prefix}{error.key}", error.problem) from None


def _convert(hint, value, key: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, key)
            except ConfigError as error:
                errors.append(error.problem)
        raise ConfigError(key, " or ".join(dict.fromkeys(errors)))
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return tuple(_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        if dataclasses.is_dataclass(args[1]):
            return {str(k): _build(args[1], v, f"{key}.{k}.") for k, v in value.items()}
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    return _scalar(hint, value, key)


def _scalar(hint, value, key: str):
    is_bool = isinstance(value, bool)  # bool is an int in Python: reject `epochs: true`
    if hint is bool and is_bool:
        return value
    if hint is int and isinstance(value, int) and not is_bool:
        return value
    if hint is float and isinstance(value, (int, float)) and not is_bool:
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string; accept what float() reads.
        with contextlib.suppress(ValueError):
            return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise ConfigError(key, f"expected {hint.__name__}, got {value!r} ({type(value).__name__})")
