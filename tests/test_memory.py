"""The CPU memory settings of fcnseg's processes (fcnseg._memory), each observed from outside, in a fresh
interpreter, as the page faults that writing a large tensor costs."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fcnseg._memory import HUGE_PAGES_ENV
from tests.helpers import HANG_TIMEOUT


def run_python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != HUGE_PAGES_ENV}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_TIMEOUT,
                          env={**base, **env}, check=True)  # fmt: skip
    return done.stdout.strip()


# Page faults while a 64 MB tensor (16,384 pages of 4 KB, 32 huge pages of 2 MB) is allocated and written, after
# ``setup``; where ``twice``, after the same block was allocated, written and freed a few times, as a training step
# does (the steady state is what counts: a first reuse was seen to fault once in a few dozen runs under load).
FAULTS = """
import resource, torch
{setup}
for _ in range(3 if {twice} else 0):
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(64 << 20, dtype=torch.uint8).fill_(2)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 16384


def huge_page_mode() -> str:
    """The kernel's transparent huge page mode: always, madvise or never (the bracketed word)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text[text.index("[") + 1 : text.index("]")]


@pytest.mark.skipif(huge_page_mode() == "never", reason="this kernel gives no transparent huge pages")
def test_the_command_line_puts_large_tensors_on_huge_pages():
    cli = FAULTS.format(setup="", twice=False).replace("import resource", "import fcnseg.cli, resource")
    assert int(run_python(cli)) < PAGES // 8  # a fault per 2 MB, not per 4 KB
    if huge_page_mode() == "madvise":  # the kernel gives them only where asked: without the command line, or
        # where the user turned them off, the same tensor faults in page by page, so the check tells the two apart
        assert int(run_python(FAULTS.format(setup="", twice=False))) > PAGES // 2
        assert int(run_python(cli, **{HUGE_PAGES_ENV: "0"})) > PAGES // 2


PLACE_MODEL = """
from fcnseg.engine.config import TrainConfig
from fcnseg.engine.run import place_model
place_model(torch.nn.Conv2d(3, 4, 3), TrainConfig(conv_kernels="onednn"), torch.device("cpu"))
"""


PREDICTOR = """
import fcnseg
from fcnseg.inference import Predictor
Predictor(fcnseg.get_model("fcn32s", num_classes=2, width=0.0625, fc_dim=8), runtime="eager")
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's settings are glibc's")
@pytest.mark.parametrize("setup", [PLACE_MODEL, PREDICTOR], ids=["training", "inference"])
def test_cpu_training_and_inference_reuse_freed_memory_without_faulting_it_in_again(setup):
    plain = int(run_python(FAULTS.format(setup="", twice=True), **{HUGE_PAGES_ENV: "0"}))
    kept = int(run_python(FAULTS.format(setup=setup, twice=True), **{HUGE_PAGES_ENV: "0"}))
    assert plain > PAGES // 2  # glibc unmapped the first block and faults the second in page by page
    assert kept < PAGES // 20  # placing a model for CPU training, or a predictor, kept the first block


# ------------------------------------------------------------------------------------------- memory available


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"/proc/meminfo": "MemTotal: 8000 kB\nMemAvailable: 1000 kB\n"}, 1_024_000),
        ({"/proc/meminfo": "MemAvailable: 1000 kB\n", "/sys/fs/cgroup/memory.max": "900000\n",
          "/sys/fs/cgroup/memory.current": "400000\n"}, 500_000),  # the container's limit is closer
        ({"/proc/meminfo": "MemAvailable: 1000 kB\n", "/sys/fs/cgroup/memory.max": "max\n",
          "/sys/fs/cgroup/memory.current": "400000\n"}, 1_024_000),  # a cgroup without a limit
        ({"/sys/fs/cgroup/memory.max": "900000\n", "/sys/fs/cgroup/memory.current": "950000\n"}, 0),
        ({}, None),  # neither: not Linux
    ],
)  # fmt: skip
def test_available_memory_is_the_closest_limit(monkeypatch, files, expected):
    import io

    from fcnseg import _memory

    def fake_open(path, *args, **kwargs):
        if str(path) not in files:
            raise FileNotFoundError(path)
        return io.StringIO(files[str(path)])

    monkeypatch.setattr(_memory, "open", fake_open, raising=False)
    assert _memory.available_memory() == expected
