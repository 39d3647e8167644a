import dataclasses
import typing

import pytest

from imcap.config import Config, ConfigError, load_config


def test_yaml_and_dotted_overrides_resolve_to_typed_values(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  lr: 3e-4\n  epochs: 2\ndata:\n  batch_size: 16\n")
    cfg = load_config(path, ["train.epochs=5", "model.encoder.train_layer4=true", "train.layer4_lr=1e-5"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 5 and cfg.data.batch_size == 16
    assert cfg.model.encoder.train_layer4 is True and cfg.train.layer4_lr == pytest.approx(1e-5)


def test_only_true_and_false_are_booleans_so_no_stays_a_string(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  mixed_precision: no\n  cpu: TRUE\n")
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.train.cpu is True
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


@pytest.mark.parametrize("text", ["0123", "1_000", "12:30", "2024-05-01", "yes", "1e3"])
def test_a_string_key_keeps_its_text_in_a_file_and_an_override(tmp_path, text):
    path = tmp_path / "x.yaml"
    path.write_text(f"run_name: {text}\n")
    assert load_config(path).run_name == text
    assert load_config(None, [f"run_name={text}"]).run_name == text


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.learning_rate=1e-3"], "unknown config key train.learning_rate; allowed keys in train: epochs, lr"),
        (["dat.batch_size=3"], "unknown config key dat"),
        (["data.batch_size=big"], "data.batch_size must be an integer; got 'big'"),
        (["data.batch_size=2.5"], "data.batch_size must be an integer"),
        (["model.encoder.train_layer4=yes please"], "model.encoder.train_layer4 must be true or false"),
        (["train.cpu=yes"], "train.cpu must be true or false; got 'yes'"),
        (["train.mixed_precision=fp8"], "train.mixed_precision must be one of no, bf16, fp16; got 'fp8'"),
        (["data.batch_size"], "is not of the form key=value"),
        (["data=3"], "data must be a mapping"),
        (["data.feature_cache=true", "data.train_crop=random"], "data.feature_cache needs data.train_crop=center"),
        (["checkpoint.best_metric=spice"], "checkpoint.best_metric must be one of"),
        (["checkpoint.best_metric=meteor"], "checkpoint.best_metric=meteor needs eval.meteor=every"),
        (["train.clip_grad_norm=0"], "train.clip_grad_norm must be > 0"),
        (["train.clip_grad_norm=-1"], "train.clip_grad_norm must be > 0"),
        (["train.log_every=0"], "train.log_every must be >= 1"),
        (["train.preemption_signal=SIGKILL"], "train.preemption_signal must name a signal that can be caught"),
        (["train.preemption_signal=SIGSTOP"], "train.preemption_signal must name a signal that can be caught"),
        (
            ["train.preemption_signal=SIG_IGN"],
            "train.preemption_signal must name a signal that can be caught, e.g. SIGUSR1; got 'SIG_IGN'",
        ),
        (["eval.max_images=-1"], "eval.max_images must be >= 0"),
        (["eval.batch_size=0"], "eval.batch_size must be >= 1"),
        (["eval.every_steps=-1"], "eval.every_steps must be >= 0"),
        (["data.shuffle_buffer=-1"], "data.shuffle_buffer must be >= 0"),
        (["train.warmup_steps=-1"], "train.warmup_steps must be >= 0"),
        (["checkpoint.every_steps=-5"], "checkpoint.every_steps must be >= 0"),
        (["train.weight_decay=-0.1"], "train.weight_decay must be >= 0"),
        (["train.layer4_lr=0"], "train.layer4_lr must be > 0"),
        (["eval.no_repeat_ngram=-1"], "eval.no_repeat_ngram must be >= 0"),
        (["train.lr=fast"], "train.lr must be a number; got 'fast'"),
        (["train.lr=inf"], "train.lr must be a finite number; got 'inf'"),
        (["train.lr=nan"], "train.lr must be a finite number; got 'nan'"),
        (["eval.length_penalty=-inf"], "eval.length_penalty must be a finite number; got '-inf'"),
        (["model.decoder.dropout=1e999"], "model.decoder.dropout must be a finite number; got '1e999'"),
        (["run_name="], "run_name must name one directory inside runs_dir"),
        (["run_name=."], "run_name must name one directory inside runs_dir (not empty, . or .., no /); got '.'"),
        (["run_name=.."], "run_name must name one directory inside runs_dir"),
        (["run_name=a/b"], "run_name must name one directory inside runs_dir (not empty, . or .., no /); got 'a/b'"),
        (["run_name=/tmp/x"], "run_name must name one directory inside runs_dir"),
        (["train.objective=rl"], "train.objective must be one of xent, scst; got 'rl'"),
        (["train.objective=scst", "scst.samples_per_image=1"], "scst.baseline=mean needs scst.samples_per_image >= 2"),
        (
            ["train.objective=scst", "scst.samples_per_image=0", "scst.baseline=greedy"],
            "scst.samples_per_image must be >= 1",
        ),
        (["train.objective=scst", "scst.temperature=0"], "scst.temperature must be > 0"),
        (["train.objective=scst", "scst.max_length=0"], "scst.max_length must be >= 1"),
        (["train.seed=-1"], "train.seed must be in [0, 2**32), the seeds numpy accepts; got -1"),
        ([f"train.seed={2**32}"], f"train.seed must be in [0, 2**32), the seeds numpy accepts; got {2**32}"),
    ],
)
def test_bad_keys_and_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, override)
    assert message in str(error.value)


def test_yaml_anchors_and_merge_keys_work_in_a_config_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "model:\n  decoder:\n    embed_dim: &width 16\n    attention_dim: *width\n"
        "    <<: {hidden_dim: 32, dropout: 0.1}\n"
    )
    decoder = load_config(path).model.decoder
    assert (decoder.embed_dim, decoder.attention_dim, decoder.hidden_dim, decoder.dropout) == (16, 16, 32, 0.1)


def test_a_list_or_mapping_where_a_value_belongs_is_an_error(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  lr: [1, 2]\n")
    with pytest.raises(ConfigError, match="train.lr must be a single value"):
        load_config(path)


def test_unknown_key_in_a_yaml_file_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  decoder:\n    hidden: 12\n")
    with pytest.raises(ConfigError, match="unknown config key model.decoder.hidden"):
        load_config(path)


def test_missing_or_invalid_yaml_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  lr: 1e-3\nrun_name: x\ntrain:\n  epochs: 2\n", "train is written twice, at lines 1 and 4"),
        (
            "model:\n  decoder:\n    embed_dim: 8\n    embed_dim: 16\n",
            "model.decoder.embed_dim is written twice, at lines 3 and 4",
        ),
        ("run_name: a\n'run_name': b\n", "run_name is written twice, at lines 1 and 2"),
        ("data: {batch_size: 4, batch_size: 8}\n", "data.batch_size is written twice, at lines 1 and 1"),
    ],
    ids=["section", "nested key", "quoted key", "flow mapping"],
)
def test_a_key_written_twice_in_a_yaml_file_is_an_error_naming_the_file_the_key_and_both_lines(tmp_path, text, message):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"config file {path}: {message}")


def test_a_mapping_may_override_the_keys_it_merges_from_an_anchor(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  decoder:\n    <<: {hidden_dim: 32, dropout: 0.1}\n    hidden_dim: 64\n")
    decoder = load_config(path).model.decoder
    assert (decoder.hidden_dim, decoder.dropout) == (64, 0.1)


def test_invalid_yaml_is_one_line_naming_the_file_and_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-3\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    message = str(error.value)
    assert message.startswith(f"config file {bad} is not valid YAML: ") and "\n" not in message
    assert "at line 4, column 1" in message


def float_keys(cls=Config, prefix: str = "") -> list[str]:
    """The dotted key of every float field of the config tree."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += float_keys(hint, f"{prefix}{name}.")
        elif hint is float:
            keys.append(prefix + name)
    return keys


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "Infinity", "1e400"])
def test_every_float_key_refuses_a_value_that_is_not_finite(text):
    keys = float_keys()
    assert "train.lr" in keys and "eval.length_penalty" in keys
    for key in keys:
        with pytest.raises(ConfigError, match=f"^{key} must be a finite number; got '{text}'$"):
            load_config(None, [f"{key}={text}"])


@pytest.mark.parametrize("seed", ["0", "4294967295"])
def test_the_smallest_and_largest_seeds_are_accepted(seed):
    assert load_config(None, [f"train.seed={seed}"]).train.seed == int(seed)


def test_an_empty_run_name_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("run_name:\n")
    with pytest.raises(ConfigError, match="run_name must name one directory inside runs_dir"):
        load_config(path)


def test_a_config_builds_on_the_file_its_base_key_names_and_states_only_what_differs(tmp_path):
    (tmp_path / "first.yaml").write_text("run_name: first\ntrain:\n  lr: 1e-3\n  epochs: 7\ndata:\n  batch_size: 4\n")
    (tmp_path / "second.yaml").write_text("base: first.yaml\nrun_name: second\ntrain:\n  lr: 5e-5\n")
    cfg = load_config(tmp_path / "second.yaml", ["train.epochs=2"])
    assert (cfg.run_name, cfg.train.lr, cfg.train.epochs, cfg.data.batch_size) == ("second", 5e-5, 2, 4)


def test_a_base_that_is_missing_or_builds_on_the_file_itself_is_an_error_naming_it(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "c.yaml").write_text("base: none.yaml\n")
    with pytest.raises(ConfigError, match="base a.yaml is a file that itself builds on"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match=f"config file {tmp_path / 'none.yaml'} does not exist"):
        load_config(tmp_path / "c.yaml")
