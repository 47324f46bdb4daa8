"""The docs do not rot: every command in README.md and docs/*.md that runs one of the project's scripts names a
script that exists, with arguments that script accepts. Arguments are parsed only: nothing is loaded or trained."""
import argparse
import re
import runpy
import shlex
import sys

import pytest
from conftest import ROOT

import train
from cli import BadInput

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_lines(text):
    """The shell lines of a markdown text: those of its fenced code blocks (continuations joined), and inline code
    spans that start a command."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def script_commands(line):
    """-> [(script, args)] for each command in a shell line that runs a project script with python, torchrun or bash."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # not shell (an unbalanced quote in prose)
        return []
    out, cmd = [], []
    for w in words + [";"]:
        if w in (";", "&&", "||", "|", "&"):
            out.append(cmd)
            cmd = []
        else:
            cmd.append(w)
    found = []
    for cmd in out:
        cmd = [w for i, w in enumerate(cmd) if not re.fullmatch(r"\d?>>?", w) and not (i and re.fullmatch(r"\d?>>?", cmd[i - 1]))]
        cmd = cmd[next((i for i, w in enumerate(cmd) if "=" not in w), len(cmd)):]  # VAR=value prefixes
        if not cmd or cmd[0] not in ("python", "python3", "torchrun", "bash", "/usr/bin/time"):
            continue
        script = next((i for i, w in enumerate(cmd) if w.endswith((".py", ".sh"))), None)
        if script is not None and not (cmd[0].startswith("python") and script != 1):  # python -m ..., python -c ...
            found.append((cmd[script], [w for w in cmd[script + 1:] if w != "--"]))  # torchrun's "--" is torchrun's
    return found


COMMANDS = sorted({(doc.name, script, tuple(args)) for doc in DOCS for line in shell_lines(doc.read_text())
                   for script, args in script_commands(line)})


class Parsed(BaseException):
    """Raised as soon as a script's argument parser has accepted its arguments."""


def test_the_docs_hold_commands_to_check():
    scripts = {script for _, script, _ in COMMANDS}
    assert {"sample.py", "train.py", "vq.py", "data/openmoji/prepare.py", "analyze.py"} <= scripts and len(COMMANDS) > 40


@pytest.mark.parametrize("doc,script,args", COMMANDS)
def test_a_documented_command_runs_a_script_that_accepts_it(doc, script, args, monkeypatch):
    assert (ROOT / script).is_file(), f"{doc}: no script {script}"
    if script.endswith(".sh"):
        return
    if script == "train.py":  # its own parser: settings and presets, checked before anything is loaded
        try:
            train.parse_args(list(args))
        except BadInput as e:
            pytest.fail(f"{doc}: python train.py {' '.join(args)}: {e}")
        return
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        original(self, *a, **kw)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(Parsed):
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:  # argparse's usage error
            pytest.fail(f"{doc}: python {script} {' '.join(args)}: exit {e.code}")
