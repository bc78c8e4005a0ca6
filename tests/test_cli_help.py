"""The command line's help: `zoo --help` and every subcommand's run, every flag has help text,
and help names only commands that exist; a bad choice is refused before anything is written."""

from __future__ import annotations

import argparse
import re

import pytest

from zoo.cli import build_parser, main


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_zoo_help_and_every_subcommand_help_run(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "generate" in capsys.readouterr().out
    for name in subcommands():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0, name
        assert capsys.readouterr().out.startswith("usage:")


def test_every_flag_has_help_naming_only_existing_commands():
    names = set(subcommands())
    for name, parser in subcommands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"zoo {name} {action.option_strings or action.dest}: no help text"
            # a command named as one: `zoo X` in backticks, or `zoo X --flag`
            for quoted, flagged, flag in re.findall(r"`zoo (\w+)|\bzoo (\w+) (--[a-z][\w-]*)", action.help):
                mentioned = quoted or flagged
                assert mentioned in names, f"zoo {name}: help mentions `zoo {mentioned}`, which does not exist"
                if flag:
                    assert flag in subcommands()[mentioned]._option_string_actions, f"zoo {name}: help mentions zoo {mentioned} {flag}"


def test_an_unknown_executor_is_refused_before_the_root_is_created(tmp_path, capsys):
    root = tmp_path / "root"
    for command in (["generate", "smoke"], ["metrics", "smoke"]):
        assert main([*command, "--executor", "foo", "--root", str(root)]) == 2
        assert capsys.readouterr().err == "zoo: error: unknown executor 'foo'; known: local, debug, slurm\n"
        assert not root.exists()
