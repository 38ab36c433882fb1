"""The command line's layout: one module per command, shared flags declared once, domain logic in the library."""

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import fcnseg
import fcnseg.cli
from fcnseg.cli import build_parser
from fcnseg.cli._inputs import collect_inputs
from fcnseg.models.complexity import meta_gflop, trainable_parameters
from fcnseg.models.upsampling import BilinearUpsample
from fcnseg.predict import output_stems
from tests.helpers import HANG_TIMEOUT

CLI = Path(fcnseg.cli.__file__).parent


def _command_modules():
    return [m.name for m in pkgutil.iter_modules([str(CLI)]) if not m.name.startswith("_")]


def test_one_module_per_command():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert sorted(commands) == sorted(m.replace("_", "-") for m in _command_modules())
    for name in _command_modules():
        module = importlib.import_module(f"fcnseg.cli.{name}")
        assert callable(module.add_parser) and callable(module.run)
        assert commands[name.replace("_", "-")].get_default("func") is module.run


@pytest.mark.parametrize("flag", ["--data-option", "--device", "--runtime", "--weights", "--weights-file", "--quiet"])
def test_shared_flags_are_declared_once(flag):
    sources = {p.name: p.read_text() for p in CLI.glob("*.py")}
    declared = {name for name, text in sources.items() if re.search(rf"add_argument\(\s*\"{flag}\"", text)}
    assert declared == {"_common.py"}


def test_collect_inputs_and_output_stems(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a/x.jpg", "a/y.png", "a/notes.txt", "b/x.png"):
        (tmp_path / name).write_bytes(b"")
    files, problems = collect_inputs([str(tmp_path / "a"), str(tmp_path / "b" / "*.png"), str(tmp_path / "a/x.jpg")])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a/x.jpg", "a/y.png", "b/x.png"]
    assert problems == []
    assert output_stems(files) == ["x", "y", "x-2"]
    _, problems = collect_inputs([str(tmp_path / "none"), str(tmp_path / "*.gif")])
    assert [p.split(": ", 1)[1] for p in problems] == ["no such file or folder", "pattern matches no file"]


def test_meta_gflop_leaves_the_upsamplers_frozen():
    with torch.device("meta"):
        model = fcnseg.get_model("fcn32s", alignment="caffe")
    params = trainable_parameters(model)
    assert round(meta_gflop(model, 500), 1) == 361.9  # the figure `fcnseg models` prints
    assert trainable_parameters(model) == params
    assert not any(m.weight.requires_grad for m in model.modules() if isinstance(m, BilinearUpsample))


def test_the_demos_total_time_is_the_processs_wall_time():
    # What the demo reports as its time is the process's age, start-up (imports) included: at least the sleep it
    # was made to take, and no more than the parent measured from outside.
    import subprocess
    import sys
    import time

    code = "import time; time.sleep(1.5); from fcnseg.cli.demo import process_seconds; print(process_seconds())"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=HANG_TIMEOUT)
    outside = time.perf_counter() - t0
    inside = float(out.stdout)
    assert 1.5 <= inside <= outside + 0.05, (inside, outside)


def test_every_flag_of_every_command_says_what_it_does():
    # `--help` is where a newcomer looks: no flag without a help text, no metavar made of a long dest name
    # (argparse's default, e.g. CALIBRATION_IMAGES).
    import argparse

    from fcnseg.cli import build_parser

    silent, shouting = [], []
    for action in build_parser()._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for command, parser in action.choices.items():
            for a in parser._actions:
                if not a.option_strings or isinstance(a, argparse._HelpAction):
                    continue
                if not a.help:
                    silent.append(f"{command} {a.option_strings[0]}")
                takes_value = a.nargs != 0 and a.choices is None and a.const is None
                if takes_value and a.metavar is None and "_" in a.dest:
                    shouting.append(f"{command} {a.option_strings[0]}")
    assert silent == [] and shouting == [], (silent, shouting)
