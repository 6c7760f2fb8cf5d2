"""Attack throughput: qrobust's attacks against torchattacks at the same settings, and the reference ones alone.

Times, in the same process, on the same model and batch of real photographs
(scikit-image's, resized to --size), labelled with the model's own
predictions so every image starts correctly classified (the attacks' full
cost; AutoAttack and Square stop attacking an image once it is fooled, so
their cost depends on the model -- a random-init model is fooled at once):

* fgsm-linf, pgd-linf, pgd-l2 against torchattacks FGSM, PGD, PGDL2 (same eps,
  20 steps, alpha = 0.075 eps, random start), both under ``frozen(model)``;
* pgd-l1 (ART 1.17.1's dense L1 PGD, as RobustART ran it), slide-l1 (sparse
  steps + exact L1 x box projection), apgd-l1 and autoattack-linf (reference
  pyautoattack, standard version) alone.

Budgets are RobustART's at --budget, rescaled to the input size. Prints
images/s (median over --repeats, interleaved runs), the ratio of our time to
torchattacks' time (below 1 = faster) and each attack's robust accuracy on
the batch. These machines are noisy; compare numbers from one run only.
With --device cuda the model, the batch and torchattacks all run on the GPU,
and CUDA is synchronized before each timer is read.

Run:  python bench/bench_attacks.py [--arch resnet18] [--size 224] [--batch 8] [--repeats 3] [--threads N]
      python bench/bench_attacks.py --device cuda --batch 64
      python bench/bench_attacks.py --arch tiny_cnn --size 64 --batch 32
"""
import argparse
import statistics
import time

PAIRS = {"fgsm-linf": "FGSM", "pgd-linf": "PGD", "pgd-l2": "PGDL2"}
ALONE = ("pgd-l1", "slide-l1", "apgd-l1", "autoattack-linf")


def photos(n: int, size: int):
    """``n`` real photographs (cycling through the demo set, mirrored on later rounds) as (n, 3, size, size)."""
    import numpy as np
    import torch
    from PIL import Image

    from qrobust.shared.demo_data import PHOTOS, photo

    names = sorted(PHOTOS)
    out = []
    for i in range(n):
        image = photo(names[i % len(names)]).convert("RGB").resize((size, size), Image.BILINEAR)
        a = np.asarray(image, dtype=np.float32) / 255
        out.append((a[:, ::-1] if (i // len(names)) % 2 else a).transpose(2, 0, 1).copy())
    return torch.from_numpy(np.stack(out))


def torchattacks_attack(name: str, model, eps: float):
    import torchattacks

    if name == "fgsm-linf":
        return torchattacks.FGSM(model, eps=eps)
    cls = getattr(torchattacks, PAIRS[name])
    return cls(model, eps=eps, alpha=0.075 * eps, steps=20, random_start=True)


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so a timer read next counts it (no-op on the CPU)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, min_seconds: float = 0.5, device: str = "cpu"):
    """Seconds per call of ``fn`` (called again until ``min_seconds`` have passed, for fast attacks) and its output."""
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while True:
        out = fn()
        calls += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--budget", default="middle", choices=("small", "middle", "large"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--attacks", nargs="*", default=list(PAIRS) + list(ALONE),
                        help="attacks to time (default: fgsm-linf pgd-linf pgd-l2 pgd-l1 slide-l1 apgd-l1 "
                             "autoattack-linf)")
    args = parser.parse_args()
    import logging

    import torch

    from qrobust.score.attacks import at_shape, frozen, run_attack
    from qrobust.shared.models import build_model

    logging.getLogger("qrobust").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.arch, args.num_classes).eval().to(args.device)
    x = photos(args.batch, args.size).to(args.device)
    with torch.no_grad():
        y = model(x).argmax(1)
    seeds = torch.arange(args.batch, dtype=torch.int64)
    shape = tuple(x.shape[1:])
    print(f"{args.arch} (random init, {args.num_classes} classes), batch {args.batch} x {shape}, "
          f"budget {args.budget}, {torch.get_num_threads()} torch threads, medians of {args.repeats}")
    if args.device != "cpu":
        name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
        print(f"device: {args.device} ({name}, torch {torch.__version__}, CUDA {torch.version.cuda})")

    def ours(name):
        eps, params = at_shape(name, args.budget, shape)
        return lambda: run_attack(name, model, x, y, eps, seeds=seeds, params=params)

    def robust(x_adv) -> float:
        with torch.no_grad():
            return (model(x_adv).argmax(1) == y).float().mean().item()

    with frozen(model), torch.enable_grad():  # warm-up: kernel selection and allocations happen on first use
        for _ in range(2):
            xg = x.clone().requires_grad_(True)
            torch.autograd.grad(torch.nn.functional.cross_entropy(model(xg), y), xg)

    print(f"{'attack':<16} {'ours img/s':>10} {'torchattacks':>12} {'time ratio':>10}   robust acc (ours / theirs)")
    for name in args.attacks:
        eps, _ = at_shape(name, args.budget, shape)
        mine, theirs, ar = [], [], None
        for _ in range(args.repeats):  # interleaved, so machine noise hits both
            t, x_adv = timed(ours(name), device=args.device)
            mine.append(t)
            ar = robust(x_adv)
            if name in PAIRS:
                attack = torchattacks_attack(name, model, eps)
                with frozen(model):
                    t, x_ref = timed(lambda: attack(x, y), device=args.device)
                theirs.append(t)
        m = statistics.median(mine)
        if theirs:
            r = statistics.median(theirs)
            print(f"{name:<16} {args.batch / m:10.2f} {args.batch / r:12.2f} {m / r:10.2f}   "
                  f"{ar:.3f} / {robust(x_ref):.3f}")
        else:
            print(f"{name:<16} {args.batch / m:10.2f} {'-':>12} {'-':>10}   {ar:.3f}")


if __name__ == "__main__":
    main()
