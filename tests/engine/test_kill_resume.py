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
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def _logged_iteration(run) -> int:
    try:
        with open(run / "log.csv") as f:
            return max((int(r["iteration"]) for r in csv.DictReader(f)), default=0)
    except (FileNotFoundError, ValueError):
        return 0


def _wait_for(proc, condition, timeout=120.0) -> bool:
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
    _, err = proc.communicate(timeout=120)
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
