"""Gradient accumulation under DDP: two gloo processes under torchrun, each with 2 micro-batches of 2 images, give
the gradient of one process's single batch of all 8 images; and DDP all-reduces the gradients once per optimiser
step (``no_sync`` for all but the last micro-batch), not once per micro-batch.

The test runs this file under torchrun (``python -m torch.distributed.run ... test_ddp_accum.py OUT``): each rank
steps with the real :func:`fcnseg.engine.train.train_step` and saves what it saw, and the test compares it with
one process stepping over the whole batch. The all-reduces are counted with a DDP communication hook.
"""

import contextlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

from fcnseg.engine import run as run_mod
from fcnseg.engine import train as train_mod
from fcnseg.engine.config import TrainConfig
from tests.helpers import HANG_TIMEOUT

STEPS, WORLD, ACCUM, BATCH, CLASSES = 2, 2, 2, 2, 3
ROOT = Path(__file__).resolve().parents[2]


def _setup():
    """The same model, data and configuration in every process: a tiny FCN-32s with random weights (the score
    layer too, so that every layer has a gradient), plain SGD, the loss averaged over a step's valid pixels."""
    from tests.engine.test_train import _scored_model

    model = _scored_model(num_classes=CLASSES)
    g = torch.Generator().manual_seed(1)
    n = WORLD * ACCUM * BATCH
    images = torch.randn(STEPS, n, 3, 32, 32, generator=g)
    masks = torch.randint(0, CLASSES, (STEPS, n, 32, 32), generator=g)
    masks[torch.rand(masks.shape, generator=g) < 0.3] = 255  # void pixels, unevenly spread over the ranks
    cfg = TrainConfig(preset="modern", optimizer="sgd", lr=0.1, momentum=0.0, amp=False).resolved()
    return model, images, masks, cfg


def _steps(model, steps, cfg, reduced=()):
    """Run ``train_step`` over each step's micro-batches: the gradients each step applied, its loss and, per step,
    the gradient buckets all-reduced (what the communication hook appended to ``reduced``)."""
    optimizer = run_mod.build_optimizer(model, cfg)
    params = [(k, p) for k, p in run_mod.unwrap(model).named_parameters() if p.requires_grad]
    out = {"grads": [], "losses": [], "reduced": []}
    optimizer.register_step_pre_hook(lambda *_: out["grads"].append({k: p.grad.clone() for k, p in params}))
    _, scaler = run_mod.amp_context(cfg, torch.device("cpu"))
    for micro in steps:
        before = len(reduced)
        loss = train_mod.train_step(model, micro, optimizer, scaler, cfg, torch.device("cpu"), contextlib.nullcontext)
        out["losses"].append(loss)
        out["reduced"].append(list(reduced[before:]))
    return out


def _worker(out: Path) -> None:
    """One torchrun process: its share of every step in ACCUM micro-batches, once with the real train_step and once
    with no_sync disabled (every backward all-reduces, as before), counting the all-reduces."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    dist.init_process_group("gloo")
    rank, result = dist.get_rank(), {}
    for variant in ("no_sync", "sync_every_micro_batch"):
        if variant == "sync_every_micro_batch":  # shows that the count measures what no_sync saves
            train_mod.gradient_sync = lambda model, sync: contextlib.nullcontext()
        model, images, masks, cfg = _setup()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        reduced = []  # per all-reduce, the index of the gradient bucket it carried

        def counting_hook(state, bucket, reduced=reduced):
            reduced.append(bucket.index())
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, counting_hook)
        mine = range(rank * ACCUM * BATCH, (rank + 1) * ACCUM * BATCH, BATCH)
        steps = [[(images[s, i : i + BATCH], masks[s, i : i + BATCH]) for i in mine] for s in range(STEPS)]
        result[variant] = _steps(ddp, steps, cfg, reduced)
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_accumulation_under_ddp_is_one_big_batch_with_one_all_reduce_per_step(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), __file__,
           str(tmp_path)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(WORLD)]

    # One process, one batch of all 8 images per step: the reference.
    model, images, masks, cfg = _setup()
    ref = _steps(model, [[(images[s], masks[s])] for s in range(STEPS)], cfg)

    for variant in ("no_sync", "sync_every_micro_batch"):
        for rank in ranks:
            got = rank[variant]
            assert len(got["grads"]) == STEPS
            for s in range(STEPS):
                for k, want in ref["grads"][s].items():
                    # Equal up to the order of float32 sums: 1e-5 of the tensor's largest gradient (measured: 2e-6).
                    atol = 1e-5 * want.abs().max().item()
                    torch.testing.assert_close(got["grads"][s][k], want, rtol=0, atol=atol, msg=f"{variant} {s} {k}")
            torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-6, atol=0)
    # Each gradient bucket is all-reduced once per step with no_sync; once per micro-batch without it.
    for rank in ranks:
        for step in rank["no_sync"]["reduced"]:
            assert step and set(Counter(step).values()) == {1}, step
        for step in rank["sync_every_micro_batch"]["reduced"]:
            assert step and set(Counter(step).values()) == {ACCUM}, step


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
