"""The typed configuration tree: YAML file + dotted `key=value` overrides, validated at load.

    cfg = load_config("configs/demo.yaml", ["train.lr=3e-4", "data.batch_size=32"])

Every key is a dataclass field with a type and a default. An unknown key, a value of the wrong
type or a value outside its allowed set is a `ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from imcap.config_validation import config_problems
from imcap.errors import ImcapError, reason


class ConfigError(ImcapError, ValueError):
    label = "config error"


@dataclass
class DataConfig:
    # a directory of {split}-NNNNNN.tar + sizes.json (local, or at an http(s)://, s3://, gs:// URL), or a
    # brace pattern of paths, URLs or pipe: commands
    shards: str = "shards/demo"
    demo: bool = False  # generate the synthetic demo shards into `shards` when they are missing (a local path)
    train_split: str = "train"  # the split trained on: its shards are {train_split}-NNNNNN.tar
    val_split: str = "val"  # the split evaluated during training
    image_size: int = 224  # side of the square crop in pixels; the grid of regions is image_size / 32 a side
    train_crop: Literal["random", "center"] = "random"  # crop of training images; evaluation always crops the centre
    batch_size: int = 32  # images per process per micro-batch
    captions_per_image: int = 1  # k: each image is encoded once and trained with k of its captions
    num_workers: int = 2  # data-loading processes per training process, each reading shards of its own
    shuffle_buffer: int = 1000  # samples each data worker shuffles among; 0: shard order only
    # reads of a shard at a URL before what is left of it is skipped and counted (a 404, a dropped transfer);
    # a local shard is read once
    read_attempts: int = 3
    feature_cache: bool = False  # train from cached outputs of the frozen part of the encoder
    # where training JPEGs are decoded: by the data workers, or by the training process on its device
    # (nvJPEG on a GPU, torchvision >= 0.19), the workers then only reading bytes; evaluation always
    # decodes in the workers
    jpeg_decode: Literal["workers", "device"] = "workers"


@dataclass
class TextConfig:
    min_word_count: int = 5  # train words seen fewer times become `<unk>`
    max_length: int = 20  # words per training caption; longer ones are truncated


@dataclass
class EncoderConfig:
    weights: str = "imagenet"  # imagenet | none | path to a ResNet-50 state dict
    train_layer4: bool = False  # train the encoder's last stage (at train.layer4_lr); the rest stays frozen
    # re-estimate every BatchNorm's statistics on this many train images before training (for weights: none,
    # whose statistics are the initial 0 and 1); 0 keeps the weights' own
    batchnorm_stats_images: int = 0
    feature_stats_images: int = 0  # standardise the features per channel with statistics of this many train images
    channels_last: bool = True  # run the encoder in the channels_last memory format (faster convolutions)


@dataclass
class DecoderConfig:
    embed_dim: int = 512  # size of the word embeddings
    hidden_dim: int = 512  # size of the LSTM state
    attention_dim: int = 512  # size of the attention's hidden layer
    dropout: float = 0.5  # dropout on the LSTM output before the word logits
    alpha_c: float = 1.0  # weight of the doubly stochastic attention penalty


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the train split
    lr: float = 4e-4  # peak learning rate of the decoder (AdamW)
    layer4_lr: float = 1e-4  # peak learning rate of layer4, with model.encoder.train_layer4
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # optimizer steps of linear warm-up, then cosine decay to zero at the end
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    clip_grad_norm: float = 5.0  # gradients are clipped to this total norm
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast of the encoder and decoder; the loss stays fp32
    cpu: bool = False  # force CPU (and gloo) even when a GPU is visible
    cpu_threads: int = 0  # torch threads per process on CPU; 0: its share of the node's cores, less its data workers
    seed: int = 0  # seeds the initial weights and the data order of every epoch
    log_every: int = 10  # log the training values every this many optimizer steps
    compile: bool = False  # torch.compile the decoder step (slower than eager on an H200: bench/RESULTS.md)
    # every caption at every step of the padded length, masked, instead of a batch that shrinks as captions
    # end: the same loss and gradients, with no wait for the device and one shape per batch shape
    static_shapes: bool = False
    preemption_signal: str = "SIGUSR1"  # this signal, like SIGTERM, makes training save a checkpoint and exit 75
    # what training minimises: cross-entropy (with the attention penalty), or self-critical training on CIDEr-D
    objective: Literal["xent", "scst"] = "xent"
    # start from the weights of this run (its best checkpoint, else its latest) or checkpoint directory, with a
    # fresh optimizer: the second stage of a two-stage recipe; a run resumed from its own checkpoint ignores it
    init_from: str = ""


@dataclass
class ScstConfig:
    """Self-critical sequence training (Rennie et al. 2017), with train.objective=scst."""

    samples_per_image: int = 5  # captions sampled for each image, each rewarded by its CIDEr-D
    # what a sample's reward is compared with: the mean reward of the image's other samples, or the CIDEr-D
    # of its greedy caption (Rennie et al.)
    baseline: Literal["mean", "greedy"] = "mean"
    temperature: float = 1.0  # of the sampling distribution
    max_length: int = 20  # words a sampled caption has at most


@dataclass
class EvalConfig:
    every_steps: int = 0  # evaluate every this many optimizer steps and at the end; 0: after every epoch
    beam_size: int = 1  # beams of the evaluations during training; 1: greedy decoding
    length_penalty: float = 0.0  # a beam scores `log-probability / length ** length_penalty`; 0: no normalisation
    no_repeat_ngram: int = 0  # >0: no n-gram of this size twice in a caption
    max_length: int = 20  # most words a generated caption has
    max_images: int = 0  # val images evaluated; 0: the whole split
    batch_size: int = 64  # images per process per evaluation batch
    print_samples: int = 3  # generated captions printed after each evaluation
    tensorboard_samples: int = 4  # val images captioned into TensorBoard (text, attention figure) at every evaluation
    # which evaluations during training run METEOR, a Java process of about 10 s: the other scores need no Java run
    meteor: Literal["last", "every", "never"] = "last"


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also save every this many optimizer steps; 0: only after every epoch
    keep_last: int = 3  # newest checkpoints kept, besides the best
    best_metric: str = "cider"  # `best` by this metric (higher is better) or by val_loss (lower is better)


@dataclass
class Config:
    run_name: str = "demo"  # the run directory is runs_dir/run_name
    runs_dir: str = "runs"  # where run directories go
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)
    resume: str = "auto"  # where training starts: auto | latest | none | a run or checkpoint directory

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    tree = {} if path is None else _read_with_base(Path(path), [])
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
        _set_dotted(tree, key.strip(), text.strip())
    cfg = _build(Config, tree, prefix="")
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def validate(cfg: Config) -> None:
    """Raise a ConfigError with the first problem of config_problems, if any."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems[0])


def _read_with_base(path: Path, chain: list[Path]) -> dict[str, Any]:
    """A config file's tree over that of the file its `base:` key names (relative to it), if any: a second
    stage's config states only what differs from the first's."""
    tree = _read_yaml(path)
    if "base" not in tree:
        return tree
    base = tree.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: base must name one config file, not {base!r}")
    base_path = path.parent / base
    if base_path.resolve() in [p.resolve() for p in (*chain, path)]:
        raise ConfigError(f"config file {path}: base {base} is a file that itself builds on {path}")
    return _merged(_read_with_base(base_path, [*chain, path]), tree)


def _merged(base: dict, tree: dict) -> dict:
    out = dict(base)
    for key, value in tree.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class _TextLoader(yaml.SafeLoader):
    """SafeLoader that reads every plain scalar as text; the config's declared types then read it.

    YAML 1.1's own guesses mangle config values: `mixed_precision: no` becomes False,
    `run_name: 0123` becomes 83 and `3e-4` stays a string. Overrides are text too, so a file and
    the command line read a value the same way.
    """


_MERGE_TAG = "tag:yaml.org,2002:merge"
_TextLoader.yaml_implicit_resolvers = {}  # a new dict: SafeLoader keeps its resolvers
_TextLoader.add_implicit_resolver(_MERGE_TAG, re.compile(r"^<<$"), ["<"])  # `<<: *anchor` still merges


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {reason(e)}") from None
    loader = _TextLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        _refuse_duplicate_keys(node, path, "", set())
        tree = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from None
    finally:
        loader.dispose()
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(tree).__name__}")
    return tree


def _refuse_duplicate_keys(node: yaml.Node, path: Path, prefix: str, walked: set[int]) -> None:
    """A ConfigError for a key written twice in one mapping, at any depth: YAML would keep only the second,
    so a section written twice would silently lose the first one's values."""
    if id(node) in walked:  # an alias of a node already walked (a recursive one would never end)
        return
    walked.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path, prefix, walked)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:  # merged keys are defaults the mapping's own keys may override
            _refuse_duplicate_keys(value_node, path, prefix, walked)
            continue
        if isinstance(key_node, yaml.ScalarNode):
            key, line = key_node.value, key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(
                    f"config file {path}: {prefix}{key} is written twice, at lines {lines[key]} and {line}; "
                    "write each key once (the second would replace the first)"
                )
            lines[key] = line
        _refuse_duplicate_keys(value_node, path, f"{prefix}{key_node.value}.", walked)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is a value, not a section")
        node = child
    node[leaf] = value


def _build(cls, tree: Any, prefix: str):
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(tree) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}; allowed keys in "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}"
        )
    values = {name: _coerce(hints[name], tree[name], prefix + name) for name in names if name in tree}
    return cls(**values)


def _coerce(hint, value: Any, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a single value, not {value!r}")
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if hint is bool:
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"{key} must be true or false; got {value!r}")
        return value.lower() == "true"
    if hint in (int, float):
        try:
            number = hint(value)
        except ValueError:
            raise ConfigError(f"{key} must be {'an integer' if hint is int else 'a number'}; got {value!r}") from None
        if not math.isfinite(number):  # float() reads inf and nan, which no setting means
            raise ConfigError(f"{key} must be a finite number; got {value!r}")
        return number
    if hint is str:
        return value
    raise TypeError(f"config field {key} has an unsupported type {hint}")
