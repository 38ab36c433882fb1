"""Real training processes killed with SIGKILL (during a step, during a checkpoint write) or stopped with Ctrl-C
resume with --resume and end bit for bit where an uninterrupted run ends; a damaged last.pt falls back to the
previous checkpoint with a warning."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fcnseg.checkpoint import read_checkpoint
from tests.helpers import HANG_TIMEOUT

# A tiny deterministic run; fc_dim 512 makes each checkpoint (weights + momentum) about 15 MB, so that writing
# one takes long enough to be caught in the act.
FLAGS = (  # noqa: SIM905 (one readable command line)
    "train --dataset synthetic --data-option size=48 --data-option num_images=8 --model fcn32s --width 0.0625 "
    "--fc-dim 512 --preset modern --optimizer sgd --batch-size 2 --crop-size 0 --scale-min 1 --scale-max 1 "
    "--iters 12 --val-every 3 --val-images 2 --log-every 1 --num-workers 0 --deterministic --no-progress "
    "--device cpu"
).split()
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def _start(run, *extra):
    cmd = [sys.executable, "-m", "fcnseg", *FLAGS, "--out", str(run), *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(run, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fcnseg", *FLAGS, "--out", str(run), *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=HANG_TIMEOUT)


def _logged_iteration(run) -> int:
    try:
        with open(run / "log.csv") as f:
            return max((int(r["iteration"]) for r in csv.DictReader(f)), default=0)
    except (FileNotFoundError, ValueError):
        return 0


def _wait_for(proc, condition, timeout=float(HANG_TIMEOUT)) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.001)
    return False


def _assert_same_end(a_run, b_run):
    a, b = read_checkpoint(a_run / "last.pt"), read_checkpoint(b_run / "last.pt")
    assert a["extra"]["train_state"]["iteration"] == b["extra"]["train_state"]["iteration"] == 12
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    opt_a, opt_b = a["extra"]["train_state"]["optimizer"]["state"], b["extra"]["train_state"]["optimizer"]["state"]
    for k in opt_a:
        assert torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("kill") / "straight"
    done = _finish(run)
    assert done.returncode == 0, done.stderr
    return run


def _resume_until_done(run):
    done = _finish(run, "--resume") if (run / "last.pt").exists() or (run / "last.prev.pt").exists() else _finish(run)
    assert done.returncode == 0, done.stderr
    return done


def test_sigkill_during_a_step(straight, tmp_path):
    run = tmp_path / "killed"
    proc = _start(run)
    assert _wait_for(proc, lambda: _logged_iteration(run) >= 5), proc.communicate()
    proc.send_signal(signal.SIGKILL)  # mid-way between the checkpoints of iterations 3 and 6
    proc.wait()
    assert read_checkpoint(run / "last.pt")["extra"]["train_state"]["iteration"] in (3, 6)
    _resume_until_done(run)
    _assert_same_end(straight, run)


def test_sigkill_during_a_checkpoint_write(straight, tmp_path):
    def writing(run):
        return any(p.name.startswith(".last.pt.") and p.name.endswith(".tmp") for p in run.glob(".*"))

    for attempt in range(4):  # the write lasts tens of milliseconds: catch it, else try again
        run = tmp_path / f"write{attempt}"
        proc = _start(run)
        caught = _wait_for(proc, lambda run=run: _logged_iteration(run) >= 3 and writing(run))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if caught:
            break
    assert caught, "never saw a checkpoint being written"
    assert not (run / "last.pt").exists() or read_checkpoint(run / "last.pt")  # never half written
    _resume_until_done(run)
    _assert_same_end(straight, run)


def test_ctrl_c_saves_and_exits_cleanly(straight, tmp_path):
    run = tmp_path / "interrupted"
    proc = _start(run)
    assert _wait_for(proc, lambda: _logged_iteration(run) >= 4)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    saved = read_checkpoint(run / "last.pt")["extra"]["train_state"]["iteration"]
    assert f"interrupted at iteration {saved}; saved" in err and 4 <= saved < 12
    _resume_until_done(run)
    _assert_same_end(straight, run)


def test_damaged_last_falls_back_to_the_previous_checkpoint(straight, tmp_path):
    run = tmp_path / "damaged"
    proc = _start(run)
    assert _wait_for(proc, lambda: _logged_iteration(run) >= 7)  # checkpoints at 3 and 6 exist
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run / "last.pt").write_bytes(b"\0" * 1000)  # a damaged newest checkpoint
    done = _resume_until_done(run)
    assert f"{run / 'last.pt'} is damaged; resuming from {run / 'last.prev.pt'}" in done.stderr
    _assert_same_end(straight, run)


# ---------------------------------------------------------------------------------------------------------------
# The whole run folder, killed inside chosen windows. FCNSEG_TEST_CRASH_AT=POINT[@N] makes the training process
# SIGKILL itself the Nth time it reaches POINT (fcnseg.io.crash_point): "write:NAME" is the instant NAME's
# temporary file is complete but not yet renamed into place; "rewrite:log.csv" is the instant a resumed run has
# written the kept log rows but not yet replaced the old log with them.

# A run that learns within 12 steps (AdamW on two colour-coded halves), so that best.pt is written several times.
LEARNING = (  # noqa: SIM905
    "train --dataset folder --model fcn8s --width 0.0625 --fc-dim 64 --preset modern --optimizer adamw --lr 0.003 "
    "--batch-size 2 --crop-size 0 --scale-min 1 --scale-max 1 --no-flip --iters 12 --val-every 3 --log-every 1 "
    "--num-workers 0 --deterministic --no-progress --device cpu"
).split()


def _halves_tree(root):
    """Four 48 x 48 images: a dark blue background on the left, a red 'thing' on the right (60-75% of it)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nthing\n")
    for i in range(4):
        mask = np.zeros((48, 48), np.uint8)
        mask[:, int(rng.integers(12, 24)) :] = 1
        img = np.where(mask[..., None] == 1, [200, 60, 60], [30, 30, 90]) + rng.integers(-15, 15, (48, 48, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"im{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"im{i}.png")
    names = "".join(f"im{i}\n" for i in range(4))
    (root / "train.txt").write_text(names)
    (root / "val.txt").write_text(names)


def _train(data, run, *extra, crash=None) -> subprocess.CompletedProcess:
    env = {**ENV, "FCNSEG_TEST_CRASH_AT": crash} if crash else ENV
    cmd = [sys.executable, "-m", "fcnseg", *LEARNING, "--root", str(data), "--out", str(run), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)


def _killed(data, run, crash, *extra):
    done = _train(data, run, *extra, crash=crash)
    assert done.returncode == -signal.SIGKILL, f"never reached {crash}: {done.returncode} {done.stderr[-2000:]}"


def _completed(data, run, *extra):
    done = _train(data, run, *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _log_rows(run) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in csv.DictReader(f)]  # timing varies


def _assert_same_folder(a, b):
    """Weights, optimiser state (AdamW's moments and step), best.pt and every log row of two finished runs."""
    ca, cb = read_checkpoint(a / "last.pt"), read_checkpoint(b / "last.pt")
    assert ca["extra"]["train_state"]["iteration"] == cb["extra"]["train_state"]["iteration"] == 12
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k
    oa, ob = ca["extra"]["train_state"]["optimizer"]["state"], cb["extra"]["train_state"]["optimizer"]["state"]
    assert oa.keys() == ob.keys() and oa
    for k in oa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[k][name], ob[k][name]), (k, name)
    ba, bb = read_checkpoint(a / "best.pt"), read_checkpoint(b / "best.pt")
    assert (ba["extra"]["iteration"], ba["extra"]["mean_iu"]) == (bb["extra"]["iteration"], bb["extra"]["mean_iu"])
    for k, v in ba["state_dict"].items():
        assert torch.equal(v, bb["state_dict"][k]), k
    assert _log_rows(a) == _log_rows(b)
    assert not list(b.glob(".*.tmp")), "temporary files of killed writes were left behind"


@pytest.fixture(scope="module")
def learning(tmp_path_factory):
    """(data folder, the uninterrupted run) shared by the tests below."""
    root = tmp_path_factory.mktemp("learning")
    _halves_tree(root / "data")
    _completed(root / "data", root / "straight")
    return root / "data", root / "straight"


def _best_writes(run) -> int:
    """How many times the uninterrupted run wrote best.pt: the validations that beat every earlier one."""
    best, count = -1.0, 0
    for r in _log_rows(run):
        if r["mean_iu"] and float(r["mean_iu"]) > best:
            best, count = float(r["mean_iu"]), count + 1
    return count


def test_the_straight_run_learns_so_that_best_moves(learning):
    _, straight = learning
    assert _best_writes(straight) >= 3  # else the best.pt window below would prove little
    assert read_checkpoint(straight / "best.pt")["extra"]["iteration"] == 12


def test_kill_while_the_log_is_rewritten_on_resume_loses_no_row(learning, tmp_path):
    data, straight = learning
    run = tmp_path / "run"
    _killed(data, run, "write:last.pt@3")  # checkpoints of iterations 3 and 6 landed; 9's was being written
    assert list(run.glob(".last.pt.*.tmp"))
    _killed(data, run, "rewrite:log.csv", "--resume")  # the resumed run dies while rewriting its log
    assert [r["iteration"] for r in _log_rows(run)][:3] == ["1", "2", "3"]  # the old log is intact
    _completed(data, run, "--resume")
    _assert_same_folder(straight, run)


def test_kill_while_best_is_written_still_ends_with_the_best(learning, tmp_path):
    data, straight = learning
    run = tmp_path / "run"
    _killed(data, run, f"write:best.pt@{_best_writes(straight)}")  # the last improvement, at iteration 12
    assert read_checkpoint(run / "last.pt")["extra"]["train_state"]["iteration"] == 9  # not recorded before best
    _completed(data, run, "--resume")
    _assert_same_folder(straight, run)


def test_a_kill_after_a_fallback_keeps_the_good_checkpoint(learning, tmp_path):
    data, straight = learning
    run = tmp_path / "run"
    _killed(data, run, "write:best.pt@3")  # at iteration 9, before its last.pt: last.pt = 6, last.prev.pt = 3
    assert read_checkpoint(run / "last.pt")["extra"]["train_state"]["iteration"] == 6
    (run / "last.pt").write_bytes(b"\0" * 1000)  # damaged
    _killed(data, run, "write:last.pt@1", "--resume")  # falls back to 3, then dies writing 6
    assert read_checkpoint(run / "last.prev.pt")["extra"]["train_state"]["iteration"] == 3
    done = _completed(data, run, "--resume")
    assert "is missing; resuming from" in done.stderr
    _assert_same_folder(straight, run)


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "fcn32s"], "--resume: --model fcn32s does not fit the run in {run}, trained with --model fcn8s"),
        (
            ["--optimizer", "sgd"],
            "--resume: --optimizer sgd does not fit the run in {run}, trained with --optimizer adamw",
        ),  # fmt: skip
        (["--width", "0.125"], "--resume: --width 0.125 does not fit the run in {run}, trained with --width 0.0625"),
    ],
)
def test_resume_with_an_incompatible_flag_is_one_line_and_touches_nothing(learning, tmp_path, capsys, flags, message):
    # In this process: the refusal comes before any training, and `python -m fcnseg` turns main's 2 into its exit
    # status without a traceback (tests/serve/test_serve_cli.py runs the real command for that).
    import shutil

    from fcnseg.cli import main

    data, straight = learning
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = _snapshot(run)
    assert main([*LEARNING, "--root", str(data), "--out", str(run), "--resume", *flags]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcnseg: error: " + message.format(run=run)), err
    assert _snapshot(run) == before
