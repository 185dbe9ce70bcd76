"""What every racedit command shares: help for every flag, one meaning per common flag, one-line usage
errors with exit code 2, messages on stderr and results on stdout, and a progress bar that stays quiet
off a terminal."""

from __future__ import annotations

import argparse
import re

import pytest
import yaml

from racedit.cli import analyze, extract, fid, models, sample, train
from racedit.cli.args import DEVICE_HELP, non_negative_int

COMMANDS = {"racedit-train": train, "racedit-sample": sample, "racedit-extract": extract,
            "racedit-models": models, "racedit-fid": fid, "racedit-analyze": analyze}  # fmt: skip


def parsers(parser: argparse.ArgumentParser, name: str = ""):
    """The parser and, recursively, each of its sub-commands' parsers, with their names."""
    yield name or parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{parser.prog} {sub_name}")


def every_parser():
    for module in COMMANDS.values():
        yield from parsers(module.build_parser())


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_help_explains_every_flag(prog):
    for name, parser in parsers(COMMANDS[prog].build_parser()):
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"
            for flag in action.option_strings:
                assert flag in text, (name, flag)
            assert "--debug" in text, name


def test_common_flags_mean_the_same_in_every_command():
    seen: dict[str, list[str]] = {}
    for name, parser in every_parser():
        for action in parser._actions:
            for flag in action.option_strings:
                seen.setdefault(flag, []).append(name)
                if flag == "--out":  # always a folder (single files have their own flags: fid ref --npz)
                    assert action.metavar == "DIR" and action.help.startswith("output folder"), name
                if flag == "--device":
                    assert action.help == DEVICE_HELP and action.default is None, name
                if flag == "--seed":
                    assert action.type is non_negative_int and action.help.startswith("seed of"), name
                if flag in ("--json", "--no-progress", "--debug", "--overwrite"):
                    assert isinstance(action, argparse._StoreTrueAction), (name, flag)
                if flag == "--config":
                    assert action.metavar == "FILE" and action.help.startswith("run config YAML"), name
    assert "--out-dir" not in seen and "--cpu" not in seen  # the old spellings of --out and --device
    assert len(seen["--out"]) >= 6 and len(seen["--device"]) >= 4 and len(seen["--debug"]) >= 10


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_a_usage_error_is_one_line_and_exit_2(prog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        COMMANDS[prog].main(["--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error:") and "\n" not in err and f"see {prog} --help" in err


def test_a_user_error_found_later_is_one_line_and_exit_2(capsys):
    assert models.main(["--filter", "^no-such-model$"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err.strip().startswith("racedit-models: error: --filter") and captured.err.count("\n") == 1
    )


def tiny_config(tmp_path, **train_keys) -> str:
    cfg = {
        "model": {"name": "RaceDiT-S/2-2in8", "hidden_size": 32, "depth": 2, "num_heads": 2},
        "diffusion": {"objective": "flow"},
        "data": {"kind": "digits"},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 6,
            "global_batch_size": 16,
            "checkpoint_every": 6,
            **train_keys,
        },  # fmt: skip
        "sample": {"every": 0, "classes": [0, 1], "steps": 2, "final_grid": False},
        "log": {"every": 1, "trackers": [], "loss_curve": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_train_out_and_seed_are_the_config_keys(tmp_path, capsys):
    config = tiny_config(tmp_path)
    assert (
        train.main(["--config", config, "--out", str(tmp_path / "other"), "--seed", "7", "--print-config"])
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["output_dir"] == str(tmp_path / "other") and printed["train"]["seed"] == 7
    # the same key twice (flag and override) is refused, naming both
    assert train.main(["--config", config, "--out", "x", "train.output_dir=y", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out and train.output_dir= both set" in err
    assert train.main(["--config", config, "--world-size", "2", "--print-config"]) == 2
    assert "use it with --dry-run" in capsys.readouterr().err


def test_training_messages_on_stderr_result_on_stdout_and_a_quiet_bar(tmp_path, capsys):
    """Off a terminal (pytest's capture is not one) the bar draws when it starts and when it closes, not at
    each of the 6 logged steps: the loss in its postfix must not force a redraw."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train.main(["--config", tiny_config(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines() == [f"done at step 6; EMA model in {tmp_path / 'run' / 'final'}"]
    messages = [line for line in captured.err.splitlines() if line.startswith("racedit-train: ")]
    assert any("model: " in m for m in messages) and any("exported the EMA model" in m for m in messages)
    # Each draw of the bar starts with "train:"; a run of seconds never reaches the 30 s redraw interval,
    # so only the first and the closing draw (tqdm redraws once more when the total is reached) remain.
    draws = len(re.findall(r"(?:^|\r)train: ", captured.err, flags=re.M))
    assert 1 <= draws <= 3, captured.err
