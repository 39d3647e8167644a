"""The documentation stays true to the code: its commands parse, its config keys exist, its key reference
is the generated one, and the README keeps the set-up commands that .ci/run runs.

Commands are taken from the fenced shell blocks (```bash, sh, shell, console) of README.md and docs/*.md,
`\\` continuations joined. Each simple command of a line (split at &&, ||, ;, |) is checked when it runs
imcap, `accelerate launch`, `torchrun`, `python launch/...` or `sbatch slurm/...`, after any env-var
prefixes (`CI=true`), a `.venv/bin/` prefix and a `$ ` prompt. Nothing is skipped: write commands that
parse.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
SEPARATORS = {"&&", "||", ";", "|", "&", ";;"}
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
LAUNCH_SCRIPTS = {"launch/train.py": "train", "launch/evaluate.py": "eval"}
SLURM_DEFAULT_CONFIG = "configs/demo.yaml"  # IMCAP_CONFIG's default in slurm/common.sh
README_INSTALL = (
    "python3 -m venv .venv && .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e '.[dev]' "
    "&& .venv/bin/accelerate launch launch/train.py --config configs/demo.yaml"
)
README_TEST = ".venv/bin/python -m pytest"


class Command(NamedTuple):
    doc: str  # the file, relative to the project's root
    line: int  # where the command's line starts
    text: str  # the line as the doc shows it, continuations joined
    words: list[str]  # the simple command: env-var prefixes and the `.venv/bin/` of its program removed
    env: dict[str, str]  # its env-var prefixes
    unsplittable: str = ""  # why shlex could not split the line, which then has no words

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def fenced_blocks(markdown: str):
    """-> (info string, first line number, lines) of every fenced code block."""
    block, start, info, fence = None, 0, "", ""
    for number, line in enumerate(markdown.splitlines(), 1):
        stripped = line.strip()
        if block is None:
            if stripped.startswith(("```", "~~~")):
                fence, info, block, start = stripped[:3], stripped[3:].strip().lower(), [], number + 1
        elif stripped.startswith(fence):
            yield info, start, block
            block = None
        else:
            block.append(line)


def logical_lines(start: int, lines: list[str]):
    """-> (line number, text) with `\\` continuations joined and a `$ ` prompt removed."""
    text, first = "", None
    for number, line in enumerate(lines, start):
        line = line.rstrip() if first is None else line.strip()
        if first is None:
            first, line = number, re.sub(r"^\s*\$ ", "", line)
        if line.endswith("\\"):
            text += line[:-1].rstrip() + " "
            continue
        yield first, text + line
        text, first = "", None
    if first is not None:
        yield first, text


def simple_commands(text: str) -> list[list[str]]:
    """A shell line -> its simple commands as words (comments dropped); shlex raises on bad quoting."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in SEPARATORS:
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [c for c in [*commands, words] if c]


def program(word: str) -> str:
    return word.removeprefix(".venv/bin/")


def is_checked(words: list[str]) -> bool:
    if not words:
        return False
    name = program(words[0])
    if name in ("imcap", "torchrun", "sbatch"):
        return True
    if name == "accelerate":
        return words[1:2] == ["launch"]
    return name in ("python", "python3") and len(words) > 1 and words[1] in LAUNCH_SCRIPTS


def doc_commands(path: Path) -> list[Command]:
    """The checked commands of one Markdown file's shell blocks, and any line there that shlex cannot split."""
    doc = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    found = []
    for info, start, lines in fenced_blocks(path.read_text()):
        if not info or info.split()[0] not in SHELL_BLOCKS:
            continue
        for line, text in logical_lines(start, lines):
            try:
                commands = simple_commands(text)
            except ValueError as e:
                found.append(Command(doc, line, text.strip(), [], {}, f"the shell cannot split it: {e}"))
                continue
            for words in commands:
                env = {}
                while words and ENV_ASSIGNMENT.match(words[0]):
                    key, _, value = words.pop(0).partition("=")
                    env[key] = value
                if is_checked(words):
                    found.append(Command(doc, line, text.strip(), [program(words[0]), *words[1:]], env))
    return found


def commands_outside_shell_blocks(path: Path) -> list[str]:
    """Lines of other fenced blocks (untagged too) that start like a command: they would go unchecked."""
    lines = []
    for info, start, block in fenced_blocks(path.read_text()):
        if info and info.split()[0] in SHELL_BLOCKS:
            continue
        for number, line in enumerate(block, start):
            if re.match(r"\s*(\$ )?(\.venv/bin/)?(imcap|accelerate launch|torchrun|sbatch) ", line):
                lines.append(f"{path.name}:{number}: {line.strip()}")
    return lines


def _parse(parser, argv: list[str]):
    """argparse's namespace, or the error it printed (argparse exits on errors)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv), None
    except SystemExit as e:
        if e.code == 0:  # --help
            return None, None
        return None, (stderr.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]


def _load_config(config: str, overrides: list[str]) -> str | None:
    """None, or why configs/<x>.yaml with these overrides does not load."""
    from imcap.config import ConfigError, load_config

    if not config.startswith("configs/"):
        return None  # the reader's own file: nothing to load here
    if not (ROOT / config).is_file():
        return f"{config} does not exist"
    try:
        load_config(ROOT / config, overrides)
    except ConfigError as e:
        return f"config error: {e}"
    return None


def check_imcap(argv: list[str]) -> str | None:
    """None when `imcap ARGV` parses (and its configs/ file loads with its overrides), else why not."""
    from imcap.cli import build_parser

    args, error = _parse(build_parser(), argv)
    if error or args is None:
        return error
    if args.command in ("train", "features"):
        return _load_config(args.config, args.overrides)
    return None


def check_script(script: str, args: list[str]) -> str | None:
    if script not in LAUNCH_SCRIPTS:
        return f"{script} is not one of the entry points {', '.join(LAUNCH_SCRIPTS)}"
    if not (ROOT / script).is_file():
        return f"{script} does not exist"
    return check_imcap([LAUNCH_SCRIPTS[script], *args])


def problem(command: Command) -> str | None:
    """Why a documented command would fail to start with the current code, or None."""
    if command.unsplittable:
        return command.unsplittable
    name, args = command.words[0], command.words[1:]
    if name == "imcap":
        return check_imcap(args)
    if name == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        parsed, error = _parse(launch_command_parser(), args[1:])
        return error or (parsed and check_script(parsed.training_script, parsed.training_script_args))
    if name == "torchrun":
        from torch.distributed.run import get_args_parser

        parsed, error = _parse(get_args_parser(), args)
        return error or (parsed and check_script(parsed.training_script, parsed.training_script_args))
    if name in ("python", "python3"):
        return check_script(args[0], args[1:])
    if name == "sbatch":  # sbatch [options] slurm/X.sbatch overrides...: the overrides go to launch/train.py
        scripts = [i for i, w in enumerate(args) if w.startswith("slurm/") and w.endswith(".sbatch")]
        if not scripts:
            return None  # not one of ours
        script, overrides = args[scripts[0]], args[scripts[0] + 1 :]
        if not (ROOT / script).is_file():
            return f"{script} does not exist"
        return _load_config(command.env.get("IMCAP_CONFIG", SLURM_DEFAULT_CONFIG), overrides)
    return f"{name}: not a command this test checks"


COMMANDS = [c for doc in DOCS for c in doc_commands(doc)]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.doc}:{c.line}")
def test_every_documented_command_parses_with_the_current_code(command):
    why = problem(command)
    assert why is None, f"{command}\n  does not parse with the current code: {why}"


def test_the_docs_show_commands_and_every_one_in_a_checked_block():
    readme = [c for c in COMMANDS if c.doc == "README.md" and c.words]
    programs = {c.words[0] for c in readme}
    assert {"imcap", "accelerate", "sbatch"} <= programs, f"README.md's commands were not found: {programs}"
    unchecked = [line for doc in DOCS for line in commands_outside_shell_blocks(doc)]
    assert not unchecked, "commands in fenced blocks that are not ```bash go unchecked:\n" + "\n".join(unchecked)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("imcap eval runs/demo --split val --beam-width 3", "unrecognized arguments: --beam-width"),
        ("imcap shards build flicker shards/x --captions c.txt --images i --split train t.txt", "invalid choice"),
        ("imcap caption photo.jpg", "--model"),
        (".venv/bin/accelerate launch launch/train.py --config configs/demo.yaml train.lrate=1", "train.lrate"),
        ("accelerate launch --num_proceses 2 launch/train.py --config configs/demo.yaml", "--num_proceses"),
        ("accelerate launch launch/train.py --config configs/no-such.yaml", "does not exist"),
        ("accelerate launch launch/evaluate.py runs/demo --beam 3 --splits val", "--splits"),
        ("imcap train --config configs/demo.yaml data.batch_size=many", "data.batch_size"),
        ("CI=true imcap features build --config configs/flickr8k.yaml data.cache=true", "data.cache"),
        ("torchrun --nproc_per_node 2 launch/train.py --config configs/demo.yaml model.decoder.heads=8", "heads"),
        ("IMCAP_CONFIG=configs/coco.yaml sbatch -N 2 slurm/multinode.sbatch train.epoch=3", "train.epoch"),
        ("$ python launch/train.py --confg configs/demo.yaml", "--config"),
    ],
)
def test_a_wrong_command_in_a_doc_fails_naming_it(tmp_path, text, expected):
    doc = tmp_path / "wrong.md"
    doc.write_text(f"Some text.\n\n```bash\n{text}\n```\n")
    (command,) = doc_commands(doc)
    why = problem(command)
    assert why is not None and expected in why, f"{command}: {why}"


def test_continuations_env_prefixes_prompts_and_chains_are_read_as_the_shell_reads_them(tmp_path):
    doc = tmp_path / "ok.md"
    doc.write_text(
        "```console\n$ CI=true .venv/bin/imcap eval runs/demo \\\n    --split val  # a comment\n```\n"
        "```bash\nmkdir -p x && imcap export runs/demo --out x; echo done\n```\n"
        '```json\n{"imcap": 1}\n```\n'
    )
    first, second = doc_commands(doc)
    assert first.words == ["imcap", "eval", "runs/demo", "--split", "val"] and first.env == {"CI": "true"}
    assert first.line == 2 and second.words == ["imcap", "export", "runs/demo", "--out", "x"]
    assert problem(first) is None and problem(second) is None


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """Demo shards small enough to check in a moment: one train and one val shard."""
    from imcap.data.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("shards"), train_images=4, val_images=2, image_size=32)


def test_the_documented_shards_checks_run_on_real_shards(tiny_shards, capsys):
    """Each documented `imcap shards check` on shards the test writes (its path swapped for theirs, one
    worker): it succeeds, and --fix-sizes writes the counted samples back into sizes.json."""
    from imcap.cli import build_parser, main

    checks = [c for c in COMMANDS if c.words[:3] == ["imcap", "shards", "check"]]
    assert checks, "the docs show no `imcap shards check` command"
    sizes_file = tiny_shards / "sizes.json"
    sizes = json.loads(sizes_file.read_text())
    for command in checks:
        args = build_parser().parse_args(command.words[1:])
        argv = [str(tiny_shards) if word == args.path else word for word in command.words[1:]]
        if args.fix_sizes:
            sizes_file.unlink()
        assert main([*argv, "--workers", "1"]) == 0, f"{command}: {capsys.readouterr().out}"
        assert json.loads(sizes_file.read_text()) == sizes, command
        assert "0 bad samples" in capsys.readouterr().out


def test_the_key_reference_in_docs_configuration_md_is_the_generated_one():
    from imcap.config_reference import REGENERATE, with_reference

    path = ROOT / "docs" / "configuration.md"
    text = path.read_text()
    assert with_reference(text, str(path)) == text, (
        f"{path.relative_to(ROOT)}'s key reference differs from imcap/config.py's fields: regenerate it with "
        f"`{REGENERATE}`"
    )


def test_every_config_key_has_a_doc_comment():
    from imcap.config_reference import config_keys

    keys = config_keys()
    assert len(keys) > 40
    undocumented = [k.key for k in keys if not k.doc]
    assert not undocumented, f"give these fields of imcap/config.py a comment saying what they do: {undocumented}"


def test_a_key_doc_is_the_comment_lines_above_its_field_then_the_one_beside_it():
    from dataclasses import dataclass

    from imcap.config_reference import field_docs

    @dataclass
    class Example:
        plain: int = 1
        beside: int = 2  # said beside it
        # said above it,
        # on two lines
        above: str = "x"
        # not this one: a blank line ends a field's comment lines

        # this one's
        both: bool = False  # and beside

    assert field_docs(Example) == {
        "plain": "",
        "beside": "said beside it",
        "above": "said above it, on two lines",
        "both": "this one's and beside",
    }


def test_the_reference_has_a_row_per_dotted_key_with_its_type_and_default():
    from imcap.config_reference import reference

    text = reference()
    assert "| `data.batch_size` | int | `32` | images per process per micro-batch |" in text
    assert "| `train.mixed_precision` | `no` \\| `bf16` \\| `fp16` | `no` |" in text
    assert "| `model.encoder.train_layer4` | bool | `false` |" in text


def test_the_readme_is_a_guide_of_at_most_250_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail to docs/"


def test_the_readme_holds_the_set_up_commands_that_ci_runs():
    """.ci/run installs as the README's first command does and runs the README's test command."""
    readme = (ROOT / "README.md").read_text()
    shell_lines = {line for info, _, block in fenced_blocks(readme) if info in SHELL_BLOCKS for line in block}
    assert README_INSTALL in shell_lines and README_TEST in shell_lines
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert README_TEST in ci, ".ci/run no longer runs the README's test command"
    assert "python3 -m venv .venv" in ci
    (install,) = [line for line in ci if "pip install" in line]
    assert install.replace(" --quiet", "") in README_INSTALL, f".ci/run installs otherwise than the README: {install}"


def test_every_test_the_faults_table_names_exists():
    """docs/faults.md says which test shows each behaviour: a renamed or removed test fails here."""
    named = set(re.findall(r"`(test_\w+)`", (ROOT / "docs" / "faults.md").read_text()))
    defined = {
        m for path in (ROOT / "tests").glob("test_*.py") for m in re.findall(r"^def (test_\w+)", path.read_text(), re.M)
    }
    assert named and not named - defined, sorted(named - defined)
