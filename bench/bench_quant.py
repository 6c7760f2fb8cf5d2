"""Fake-quantization overhead: FP32 against DoReFa, PACT and LSQ in the same process, on CPU.

On one architecture (default ResNet-18, 1000 classes, random init: time does
not depend on the weights), batch and image size, times

* eval forward (no_grad): FP32; each method at --bits (first/last layer 8 bit)
  with quantized weights cached (the default in eval), and with the cache
  emptied before every pass (weights re-quantized each time);
* attack step: forward + cross-entropy + gradient wrt the input, parameters
  with requires_grad=False (what FGSM/PGD/AutoAttack do per iteration).

Every variant is timed once per repeat, interleaved, so machine noise hits all
of them; the table shows medians and their ratio to FP32's median.

Run:  python bench/bench_quant.py [--arch resnet18] [--batch-size 8] [--size 224] [--bits 4] [--repeats 5]
"""
import argparse
import copy
import statistics
import time


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--methods", default="dorefa,pact,lsq")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    import torch
    from torch.nn import functional as F

    from qrobust.shared.models import build_model
    from qrobust.shared.quant import QuantConv2d, QuantLinear, calibrate, quantize_model

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.size, args.size, generator=gen)
    labels = torch.randint(0, 1000, (args.batch_size,), generator=gen)
    fp = build_model(args.arch, 1000).eval()
    models = {"fp32": fp}
    for method in args.methods.split(","):
        model = copy.deepcopy(fp)
        quantize_model(model, method, args.bits, args.bits)
        calibrate(model, [x])
        models[method] = model.eval()
    for model in models.values():
        model.requires_grad_(False)

    def forward(model, clear_cache: bool):
        if clear_cache:
            for m in model.modules():
                if isinstance(m, (QuantConv2d, QuantLinear)):
                    m._wq_cache = None
        with torch.no_grad():
            model(x)

    def attack_step(model):
        adv = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(adv), labels), adv)

    cases = {}  # (model, mode) -> callable
    for name, model in models.items():
        cases[name, "eval, cached w_q"] = lambda m=model: forward(m, False)
        if name != "fp32":
            cases[name, "eval, no cache"] = lambda m=model: forward(m, True)
        cases[name, "attack step"] = lambda m=model: attack_step(m)
    for fn in cases.values():  # warm-up: first-call allocations, oneDNN primitive creation, the caches
        fn()
    times = {key: [] for key in cases}
    for _ in range(args.repeats):
        for key, fn in cases.items():
            times[key].append(timed(fn))
    med = {key: statistics.median(v) for key, v in times.items()}

    print(f"{args.arch}, batch {args.batch_size} x 3x{args.size}x{args.size}, CPU, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}; {args.bits} bit weights and activations (first/last layer 8 bit); "
          f"median of {args.repeats}")
    modes = ["eval, cached w_q", "eval, no cache", "attack step"]
    print(f"{'model':8s}" + "".join(f"{m:>28s}" for m in modes))
    for name in models:
        cells = []
        for mode in modes:
            key = (name, mode) if (name, mode) in med else (name, "eval, cached w_q")
            base = med["fp32", "attack step" if mode == "attack step" else "eval, cached w_q"]
            cells.append(f"{med[key] * 1000:9.1f} ms  {med[key] / base:5.2f}x FP")
        print(f"{name:8s}" + "".join(f"{c:>28s}" for c in cells))


if __name__ == "__main__":
    main()
