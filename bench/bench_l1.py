"""L1 robust accuracy: pgd-l1 (ART 1.17.1's dense L1 PGD), slide-l1, and ART 1.17.1 itself, on one trained model.

Trains (or reuses) the demo's float tiny_cnn on the demo data set (12
photographs, 48 crops per class, 64 px, the demo's recipe), then attacks the
first --n validation images (center crops at 64 px) at the three RobustART
L1 budgets rescaled to 3x64x64 with ``at_shape`` (eps 100/400/1600 and step
120 at 3x224x224, times 12288 / 150528):

* pgd-l1: qrobust's ART-faithful L1 PGD (per-sample random starts);
* ART: ``ProjectedGradientDescentPyTorch(norm=1, eps_step=120 (rescaled),
  max_iter=20, num_random_init=1, batch_size=16)`` on a ``PyTorchClassifier``
  with the model's normalization as ART preprocessing: RobustART's call;
* slide-l1: the sparse L1 PGD with the exact L1 x box projection (stronger).

Robust accuracy is over all n images (misclassified ones count as fooled).
With --draws K, pgd-l1 and ART run K times with different random starts and
the table shows the mean (and the range).

Run:  python bench/bench_l1.py [--work /tmp/qrobust-bench-l1] [--n 192] [--draws 4] [--threads 2]
"""
import argparse
import statistics
import sys
import time
import types
from pathlib import Path


def import_art():
    """ART's PGD and classifier. ART 1.17.1 imports ``pkg_resources`` (only for ``packaging``): a stand-in
    serves that import when setuptools does not provide it."""
    import packaging.version

    missing = "pkg_resources" not in sys.modules
    if missing:
        stub = types.ModuleType("pkg_resources")
        stub.packaging = packaging
        sys.modules["pkg_resources"] = stub
    try:
        import art
        from art.attacks.evasion import ProjectedGradientDescentPyTorch
        from art.estimators.classification import PyTorchClassifier
    finally:
        if missing:
            sys.modules.pop("pkg_resources", None)
    return art.__version__, ProjectedGradientDescentPyTorch, PyTorchClassifier


def trained_model(work: Path, val_per_class: int):
    """``(model, x_val, y_val)``: the demo's float tiny_cnn, trained once into ``work``, and its val images."""
    import torch

    from qrobust.shared.demo_data import build_demo_dataset
    from qrobust.shared.models import load_model
    from qrobust.train.data import open_data
    from qrobust.train.qat import train_fp
    from qrobust.train.recipes import Recipe

    data = build_demo_dataset(work / "data", train_per_class=48, val_per_class=val_per_class)
    recipe = Recipe(epochs=24, batch_size=64, lr=3e-3, warmup_epochs=1, optimizer="adam", weight_decay=5e-4,
                    label_smoothing=0.1, image_size=64, seed=0, workers=0)  # the demo's float recipe
    ckpt = train_fp("tiny_cnn", data / "train", work / "models" / "tiny_cnn.safetensors", val_root=data / "val",
                    recipe=recipe, progress=False)
    model, _, _ = load_model(str(ckpt))
    val = open_data(data / "val", mode="val", image_size=64)
    xs, ys = zip(*(val[i] for i in range(len(val))))
    return model.eval(), torch.stack(xs), torch.tensor(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/qrobust-bench-l1", help="data set and checkpoint (reused)")
    parser.add_argument("--n", type=int, default=192, help="validation images attacked (16 per class at 192)")
    parser.add_argument("--draws", type=int, default=1, help="random starts per attack (pgd-l1 and ART)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    import logging

    import numpy as np
    import torch
    from torch import nn

    from qrobust.score.attacks import BUDGET_NAMES, at_shape, frozen, run_attack
    from qrobust.shared.architectures import Normalized

    logging.getLogger("qrobust").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    art_version, ArtPGD, ArtClassifier = import_art()
    classes = 12
    model, x, y = trained_model(Path(args.work), max(6, -(-args.n // classes)))
    x, y = x[:args.n], y[:args.n]
    n, shape = len(x), tuple(x.shape[1:])

    def accuracy(t) -> float:
        with torch.no_grad():
            return (model(t).argmax(1) == y).float().mean().item()

    net, prep = (model.net, (model.mean.numpy().reshape(3, 1, 1), model.std.numpy().reshape(3, 1, 1))) \
        if isinstance(model, Normalized) else (model, None)
    classifier = ArtClassifier(model=net, loss=nn.CrossEntropyLoss(), input_shape=shape, nb_classes=classes,
                               clip_values=(0.0, 1.0), preprocessing=prep, device_type="cpu")

    def ours(name: str, budget: str, draw: int) -> float:
        eps, params = at_shape(name, budget, shape)
        seeds = torch.arange(n, dtype=torch.int64) + 1_000_003 * draw
        return accuracy(run_attack(name, model, x, y, eps, seeds=seeds, params=params))

    def art(budget: str, draw: int) -> float:
        eps, params = at_shape("pgd-l1", budget, shape)
        attack = ArtPGD(classifier, norm=1, eps=eps, eps_step=params["step_size"], max_iter=params["steps"],
                        num_random_init=1, batch_size=16, verbose=False)
        np.random.seed(draw)
        with frozen(model):
            return accuracy(torch.from_numpy(attack.generate(x.numpy(), y.numpy())))

    def cell(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.4f}"
        return f"{statistics.mean(values):.4f} ({min(values):.3f}-{max(values):.3f})"

    print(f"tiny_cnn (demo recipe), {n} demo val images at {shape}, clean accuracy {accuracy(x):.4f}; "
          f"ART {art_version}; {args.draws} draw(s) of the random starts; {torch.get_num_threads()} torch threads")
    width = 27 if args.draws > 1 else 8
    print(f"{'budget':<7} {'eps':>8} {'step':>6}  {'pgd-l1':>{width}}  {'ART':>{width}}  {'slide-l1':>8}  seconds")
    for budget in BUDGET_NAMES:
        eps, params = at_shape("pgd-l1", budget, shape)
        t0 = time.perf_counter()
        mine = [ours("pgd-l1", budget, d) for d in range(args.draws)]
        theirs = [art(budget, d) for d in range(args.draws)]
        slide = ours("slide-l1", budget, 0)
        print(f"{budget:<7} {eps:8.3f} {params['step_size']:6.3f}  {cell(mine):>{width}}  {cell(theirs):>{width}}  "
              f"{slide:8.4f}  {time.perf_counter() - t0:7.1f}")


if __name__ == "__main__":
    main()
