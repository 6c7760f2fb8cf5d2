"""Sequence decoding in the scorer: one swscale context per video against PyAV's per-frame ``to_ndarray``.

Encodes ``--videos`` 31-frame sequences of a scikit-image photo at ``--size``
px with the reference recipe (H.264 yuv444p, as ``qrobust generate`` writes
them), then decodes them all to RGB three ways, interleaved per repeat:

* ``decode only``: FFmpeg's H.264 decoding, no conversion (the floor);
* ``to_ndarray``: ``frame.to_ndarray(format="rgb24")`` per frame (the old path,
  the oracle in tests/test_sequences_systematic.py), which sets up a new
  swscale context for every frame;
* ``rgb_frames``: :func:`qrobust.shared.video.rgb_frames`, one context per video.

Prints medians and the ratio to ``to_ndarray``; checks the pixels are identical.

Run:  python bench/bench_decode.py [--videos 64] [--size 64] [--repeats 5]
"""
import argparse
import io
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import av
    import numpy as np
    from PIL import Image
    from skimage import data

    from qrobust.generate.sequences import render_sequence
    from qrobust.shared.video import encode_frames, recipe_for, rgb_frames

    photo = Image.fromarray(data.astronaut()).resize((args.size * 8 // 7,) * 2, Image.BILINEAR)
    names = ["rotate", "translate", "gaussian_noise", "brightness"]
    payloads = [encode_frames(render_sequence(photo, args.size, names[i % len(names)], 1, i),
                              recipe_for("reference", names[i % len(names)])) for i in range(args.videos)]

    def decode_only():
        for p in payloads:
            with av.open(io.BytesIO(p)) as c:
                list(c.decode(video=0))

    def per_frame():
        out = []
        for p in payloads:
            with av.open(io.BytesIO(p)) as c:
                out.append([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        return out

    def one_context():
        out = []
        for p in payloads:
            with av.open(io.BytesIO(p)) as c:
                out.append(rgb_frames(c))
        return out

    old, new = per_frame(), one_context()  # warm-up, and the pixels must agree
    assert all(np.array_equal(a, b) for x, y in zip(old, new) for a, b in zip(x, y))
    cases = {"decode only": decode_only, "to_ndarray": per_frame, "rgb_frames": one_context}
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    frames = sum(len(x) for x in old)
    base = statistics.median(times["to_ndarray"])
    print(f"{args.videos} videos, {frames} frames of {args.size} px, median of {args.repeats}")
    print(f"{'path':<14} {'median s':>9} {'frames/s':>10} {'vs to_ndarray':>14}")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:<14} {m:>9.3f} {frames / m:>10.0f} {base / m:>13.2f}x")


if __name__ == "__main__":
    main()
