"""Generation speed of the synthetic demo set: images/s for one split (median of several repeats, one core).

python benchmarks/synthetic_speed.py                      # train split (400 images), 128 x 128, 5 repeats
python benchmarks/synthetic_speed.py --size 96 --repeats 3 --split val
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from fcnseg.data.synthetic import SyntheticShapes


def images_per_second(make: Callable[[], SyntheticShapes]) -> tuple[float, float]:
    """(wall-clock, CPU-time) images/s for generating every item of a fresh dataset once."""
    # A fresh dataset per repeat: any in-memory cache of generated items would otherwise be timed instead.
    ds = make()
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(len(ds)):
        ds.load_pair(i)
    n = len(ds)
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--split", default="train", choices=["train", "val", "test"])
    ap.add_argument("--size", type=int, nargs="+", default=[128], help="S or H W")
    ap.add_argument("--num-images", type=int, default=None, help="default: the split's default size")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    size = args.size[0] if len(args.size) == 1 else tuple(args.size[:2])

    def make() -> SyntheticShapes:
        return SyntheticShapes(split=args.split, size=size, num_images=args.num_images)

    ds = make()
    make().load_pair(0)  # warm the per-size lookup tables, so that the repeats time generation alone
    runs = [images_per_second(make) for _ in range(args.repeats)]
    wall = statistics.median(r[0] for r in runs)
    cpu = statistics.median(r[1] for r in runs)
    print(f"{ds!r} at {ds.size[0]}x{ds.size[1]}: {wall:.0f} images/s wall clock, {cpu:.0f} images/s CPU time")
    print(f"  ({1e3 / wall:.2f} ms per image; median of {args.repeats} repeats over {len(ds)} images)")


if __name__ == "__main__":
    main()
