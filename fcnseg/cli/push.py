"""``fcnseg push``: a model to the Hugging Face Hub as ``model.safetensors``, ``config.json`` and a model card
(:func:`fcnseg.pretrained.push_to_hub`), or, with ``--out``, only into a folder to look at first."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import FcnsegError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "push",
        help="upload a model to the Hugging Face Hub (safetensors, config.json, model card)",
        usage="fcnseg push SOURCE (--repo USER/NAME | --out DIR) [options]",
    )
    p.add_argument(
        "source", metavar="SOURCE",
        help="an fcnseg checkpoint (RUN/best.pt), published weights name, hf:USER/NAME or save_pretrained folder",
    )  # fmt: skip
    p.add_argument("--repo", metavar="USER/NAME", help="the Hub repository, created if need be")
    p.add_argument(
        "--out", metavar="DIR",
        help="only write the folder that would be uploaded (model.safetensors, config.json, README.md) into DIR",
    )  # fmt: skip
    p.add_argument(
        "--eval-dir", metavar="DIR",
        help="an evaluation to show on the model card: the folder of 'fcnseg eval --out DIR' (its metrics.json)",
    )  # fmt: skip
    p.add_argument(
        "--dataset", action="append", default=[], metavar="NAME",
        help="a dataset the model was trained or evaluated on (a Hub dataset id), repeatable; --eval-dir's "
        "metrics were measured on the first",
    )  # fmt: skip
    p.add_argument("--eval-split", metavar="NAME", help="the split --eval-dir's metrics were measured on (e.g. val)")
    p.add_argument("--license", metavar="ID", help="a Hub license id for the card (e.g. mit, apache-2.0, other)")
    p.add_argument("--tag", action="append", default=[], metavar="TAG", help="a card tag besides fcnseg's, repeatable")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", metavar="BRANCH", help="push to this branch, created from main if need be")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..hub import load

    if not args.repo and not args.out:
        raise FcnsegError("push: expected --repo USER/NAME (upload) or --out DIR (write the folder only)")
    if args.out and Path(args.source).is_dir() and Path(args.out).resolve() == Path(args.source).resolve():
        raise FcnsegError(f"--out {args.out}: is SOURCE itself; expected another folder (inputs are not overwritten)")
    # Built and its tensors checked against the architecture before anything is written or uploaded.
    model = load(args.source)
    card = {"metrics": args.eval_dir, "license": args.license, "datasets": args.dataset, "tags": args.tag,
            "eval_split": args.eval_split}  # fmt: skip
    if args.out:
        folder = model.save_pretrained(args.out, repo_id=args.repo, **card)
        print(f"wrote model.safetensors, config.json and README.md to {folder}")
        return 0
    url = model.push_to_hub(args.repo, private=args.private, revision=args.revision, **card)
    print(f"pushed {args.source} to {url}")
    return 0
