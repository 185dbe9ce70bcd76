"""The command line: every flag documented, errors readable, the leaderboard command works."""

from __future__ import annotations

import subprocess
import sys

import pytest

from racedit.cli.fid import build_parser, main


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


@pytest.mark.parametrize("command", ["eval", "ref", "leaderboard", "weights"])
def test_help_explains_every_flag(command):
    sub = _subparsers()[command]
    text = sub.format_help()
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"


def test_missing_weights_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("RACEDIT_INCEPTION_WEIGHTS", raising=False)
    assert main(["weights"]) == 2
    err = capsys.readouterr().err
    assert "weights-inception-2015-12-05-6726825d.pth" in err and "releases/download" in err


def test_leaderboard_command_and_module_entry(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "fid", "leaderboard", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "leaderboard.md").read_text()
    assert md.count("| published |") == 9 and "RaceDiT-XL/2-4in32" in md
    assert (tmp_path / "leaderboard.png").stat().st_size > 1000
