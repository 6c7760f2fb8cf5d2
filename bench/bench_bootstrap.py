"""Bootstrap intervals at ImageNet scale: qrobust's count-matrix resampling against index resampling, one core.

Builds per-sample columns like a full robustmq results folder (``--samples``
rows; ``--variants`` right/wrong columns of correlated accuracies; 20 video
columns; 15 attack columns defined on a fifth of the rows, NaN elsewhere),
then times :func:`qrobust.score.uncertainty.resample_means` for
``--resamples`` resamples against the plain way: for each resample, draw row
indices and take ``nanmean(X[idx])``. The baseline runs ``--baseline``
resamples and is scaled up; both use the same draws for those, and the means
are compared. Prints medians over ``--repeats`` and the ratio.

Run:  python bench/bench_bootstrap.py [--samples 50000] [--variants 101] [--resamples 1000] [--repeats 3]
"""
import argparse
import os
import statistics
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy loads BLAS
    os.environ[_var] = "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--variants", type=int, default=101)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--baseline", type=int, default=20, help="resamples of the index baseline (scaled up)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import numpy as np

    from qrobust.score import uncertainty as u

    rng = np.random.default_rng(0)
    n = args.samples
    ability = rng.random(n)
    columns = [(ability < rng.uniform(0.2, 0.8)).astype(np.float32) for _ in range(args.variants)]
    columns += [rng.random(n).astype(np.float32) * 0.3 for _ in range(20)]  # per-video FP and T5D
    attacked = rng.random(n) < 0.2
    columns += [np.where(attacked, ability < 0.1, np.nan).astype(np.float32) for _ in range(15)]
    x = np.stack(columns, axis=1)
    print(f"{n} samples x {x.shape[1]} columns ({args.variants} variants), {args.resamples} resamples, one core")

    def ours():
        return u.resample_means(x, args.resamples, seed=1)

    def index_way():
        draw = np.random.default_rng(1)
        out = []
        for start in range(0, args.baseline, u.CHUNK):
            idx = draw.integers(0, n, size=(min(u.CHUNK, args.baseline - start), n))
            out += [np.nanmean(x[i].astype(np.float64), axis=0) for i in idx]
        return np.array(out)

    times = {"ours": [], "index": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        got = ours()
        times["ours"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = index_way()
        times["index"].append((time.perf_counter() - t) * args.resamples / args.baseline)
    # the same draws give the same means (count weights instead of repeated rows)
    worst = float(np.nanmax(np.abs(got[: args.baseline] - ref)))
    assert worst < 1e-5, worst
    ours_s, index_s = statistics.median(times["ours"]), statistics.median(times["index"])
    print(f"count matrix (qrobust): {ours_s:7.2f} s   (median of {args.repeats})")
    print(f"index resampling:       {index_s:7.2f} s   (from {args.baseline} resamples, scaled)")
    print(f"ratio: {index_s / ours_s:.1f}x; largest difference of the means on the same draws: {worst:.1e}")


if __name__ == "__main__":
    main()
