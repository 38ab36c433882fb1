"""Two gloo processes under torchrun, batch 2 each, against one process with batch 4: the same run."""

import os
import subprocess
import sys

import torch

from fcnseg.checkpoint import read_checkpoint
from tests.engine.test_train import _blocks_tree
from tests.helpers import HANG_TIMEOUT

COMMON = [
    "--dataset", "folder", "--model", "fcn16s", "--width", "0.0625", "--fc-dim", "16", "--no-batch-norm",
    "--dropout", "0", "--iters", "3", "--val-every", "3", "--num-workers", "0", "--no-progress", "--lr", "0.05",
    "--flip", "--crop-size", "48", "--scale-min", "0.75", "--scale-max", "1.25", "--device", "cpu",
]  # fmt: skip


def _run(cmd, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_processes_match_one_with_the_doubled_batch(tmp_path):
    _blocks_tree(tmp_path / "data", n=8)
    root = ["--root", str(tmp_path / "data")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The one-process run trains beside the two-process one: three one-thread processes, independent of each other.
    with open(tmp_path / "one.stderr", "w") as err:  # a file, not a pipe: nothing waits on a full pipe
        one_process = subprocess.Popen(
            [sys.executable, "-m", "fcnseg", "train", *COMMON, *root, "--batch-size", "4", "--out",
             str(tmp_path / "one")],
            env=env, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        _run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fcnseg",
             "train", *COMMON, *root, "--batch-size", "2", "--out", str(tmp_path / "two")],
            env,
        )  # fmt: skip
        assert one_process.wait(timeout=HANG_TIMEOUT) == 0, (tmp_path / "one.stderr").read_text()[-3000:]
    finally:
        if one_process.poll() is None:
            one_process.kill()
            one_process.wait()
    one = read_checkpoint(tmp_path / "one" / "last.pt")
    two = read_checkpoint(tmp_path / "two" / "last.pt")
    # Same samples, same transforms, gradients averaged over the two halves of the batch: equal up to the order of
    # floating-point sums (stated tolerance: 1e-4 relative, 1e-6 absolute).
    for k, v in one["state_dict"].items():
        if v.is_floating_point():
            torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-4, atol=1e-6)
    assert (
        one["state_dict"]["score_heads.out.score_fr.weight"].abs().sum() > 0
    )  # trained: the score layers started at zero
    assert one["extra"]["train_state"]["iteration"] == two["extra"]["train_state"]["iteration"] == 3
    # Validation confusion matrices are summed over both ranks: the same mean IU as one process.
    assert abs(one["extra"]["train_state"]["best_miou"] - two["extra"]["train_state"]["best_miou"]) < 1e-6
