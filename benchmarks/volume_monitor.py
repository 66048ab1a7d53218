"""Cost of one volume-monitor evaluation on 8×8 digits images.

``impflow train`` calls :class:`impflow.train.monitor.VolumeMonitor` at every evaluation, on the
first 256 validation points. This times one call, with and without the Lipschitz estimates, for
the default ``image_resflow`` (4-4-4) and ``image_impflow`` (2-2-2) on digits (logit alpha 0.05,
ActNorms initialised on a training batch of 64), median of ``--reps`` calls after one warm-up.

    python benchmarks/volume_monitor.py [--reps 3] [--threads 1] [--points 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from impflow.data.images import dequantize, load_digits
from impflow.models import image_impflow, image_resflow
from impflow.train.monitor import VolumeMonitor

from common import publish_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--points", type=int, default=256)
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits()
    x = dequantize(data.train_images[: 64 + args.points], data.levels, torch.Generator().manual_seed(0))
    rows = []
    for name, build in (("image-resflow", image_resflow), ("image-impflow", image_impflow)):
        torch.manual_seed(0)
        flow = build((1, 8, 8), logit_alpha=0.05)
        with torch.no_grad():
            flow.log_prob(x[:64])  # initialises the ActNorms
        for lipschitz in (False, True):
            monitor = VolumeMonitor(flow, x[64:], lipschitz=lipschitz)
            times = []
            for _ in range(args.reps + 1):  # the first call warms up
                t = time.perf_counter()
                result = monitor()
                times.append(time.perf_counter() - t)
            if "error" in result:
                raise SystemExit(f"{name}: {result['error']}")
            rows.append({"model": name, "lipschitz": lipschitz, "layers": len(result["blocks"]),
                         "seconds": statistics.median(times[1:])})
            print(rows[-1], flush=True)
    publish_rows(
        "volume_monitor", args, "One volume-monitor evaluation on digits images",
        f"seconds per call (median of {args.reps}), {args.points} points, {args.threads} thread(s). "
        "`lipschitz`: with the per-block Lipschitz estimates and bounds.",
        rows, ["model", "lipschitz", "layers", "seconds"])


if __name__ == "__main__":
    main()
