"""Option files and values are plain YAML: aliases are refused (a few hundred bytes of nested aliases stand for
gigabytes), and an error message quotes a user's value cut short, never whole."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from fcnseg.cli import main
from fcnseg.data import get_dataset
from fcnseg.engine.config import TrainConfig
from fcnseg.errors import FcnsegError, shown


def alias_bomb(levels: int = 8, width: int = 9) -> str:
    """ "Billion laughs" as the value of a known option: each list holds ``width`` aliases of the previous one,
    ``width ** levels`` strings in all."""
    lines = ["model:", f"  - &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_config_is_one_short_line_quickly(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert len(path.read_bytes()) < 500  # 9 ** 8 = 43 million strings once expanded
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        code = main(["train", "--config", str(path)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"fcnseg: error: --config {path}: not valid YAML (alias *a0 found; aliases are not accepted, write the value "
        "out)\n"
    )
    assert peak < 20_000_000 and time.perf_counter() - t0 < 5


def test_a_data_option_with_aliases_is_refused(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["train", "--data-option", "size={a: &a [1, 2], b: [*a, *a]}"])
    assert caught.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.endswith("the value is not valid YAML (alias *a found; aliases are not accepted, write the value out)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # A value of the wrong type is quoted cut short: its start, then its length or its first items.
        (f"model: [{', '.join(['m'] * 5_000)}]\n", r"option 'model': expected str, got \[('m', ){6}\.\.\.\]$"),
        (f"optimizer: {'x' * 100_000}\n", r"option 'optimizer': a text of 100000 characters; expected at most 4096$"),
        (f"lr: {'9' * 400}\n", r"option 'lr': expected float or null, got 9{18}\.\.\.9{19}$"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", r"not valid YAML \(nested too deeply\)$"),
        ("1: 3\n", r"option names are text; got 1$"),
        # Values the safe constructors cannot build (a ValueError inside PyYAML) are YAML errors too.
        ("lr: 2001-13-45\n", r"not valid YAML \(a value that cannot be read \(month must be in 1\.\.12\)\)$"),
        (f"iters: {'7' * 5000}\n", r"not valid YAML \(a value that cannot be read \(Exceeds the limit .*\)\)$"),
    ],
    ids=["list", "long-text", "long-int", "deep", "int-key", "bad-date", "int-past-python"],
)  # fmt: skip
def test_values_are_quoted_short(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(FcnsegError, match=message) as caught:
        TrainConfig.from_yaml(path)
    assert len(str(caught.value)) < 250 + len(str(path))


def test_a_long_flag_value_is_quoted_short():
    with pytest.raises(FcnsegError) as caught:
        TrainConfig(optimizer="x" * 100_000).resolved()
    assert str(caught.value) == f"--optimizer {'x' * 80!r}... (100000 chars): expected sgd or adamw"


def test_a_huge_config_file_is_refused_unread(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iters: 5\n" + "#" * (1 << 20))
    with pytest.raises(FcnsegError, match=r"c.yaml: 1048585 bytes; expected a YAML file of options \(at most 1 MiB\)"):
        TrainConfig.from_yaml(path)


def test_dataset_options_are_quoted_short():
    with pytest.raises(FcnsegError) as caught:
        get_dataset("synthetic", split="train", size=list(range(100_000)))
    assert str(caught.value) == (
        "size must be an integer >= 8 or a (height, width) pair of them, got [0, 1, 2, 3, 4, 5, ...]"
    )


def test_shown():
    assert shown("abc") == "'abc'" and shown(3) == "3" and shown(None) == "None"
    assert shown("y" * 100) == f"{'y' * 80!r}... (100 chars)"
    nested = ["x"] * 9
    for _ in range(8):
        nested = [nested] * 9
    assert len(shown(nested)) <= 170 and shown(nested).startswith("[[[")
    assert shown(10**5000) == "an integer of 16610 bits"
