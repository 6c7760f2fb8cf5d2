"""``qrobust train`` and ``qrobust quantize``: float training and quantization-aware fine-tuning."""
from __future__ import annotations


from qrobust.cli.common import resolve, globs, subparser


def _recipe_arguments(p) -> None:
    r = p.add_argument_group("training recipe (defaults: docs/quantization.md; every field can be set)")
    r.add_argument("--epochs", type=int)
    r.add_argument("--batch-size", type=int, help="global batch (split over torchrun processes)")
    r.add_argument("--lr", type=float, help="peak learning rate")
    r.add_argument("--image-size", type=int)
    r.add_argument("--workers", type=int, help="data-loading processes")
    r.add_argument("--seed", type=int)
    r.add_argument("--set", action="append", metavar="FIELD=VALUE", dest="recipe_set",
                   help="any other recipe field, e.g. --set optimizer=adam --set warmup_epochs=0.5")
    p.add_argument("--val", help="validation ImageFolder or shards (default: train/../val, else a held-out tenth)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...; under torchrun each process takes its GPU")


def _recipe_overrides(args) -> dict:
    out = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "image_size", "workers", "seed")
           if getattr(args, k) is not None}
    for item in args.recipe_set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise resolve("qrobust.shared.errors:QrobustError")(f"--set {item!r}: expected FIELD=VALUE")
        import json

        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _recipe(base, overrides: dict):
    if not overrides:
        return None if base is None else base
    recipe = resolve("qrobust.train.recipes:Recipe")
    return recipe.from_dict({**base.to_dict(), **overrides})


def add_train(sub) -> None:
    p = subparser(sub, "train", "Train a float model from scratch on an ImageFolder (or WebDataset shards); "
                  "writes a self-describing checkpoint. An interrupted run resumes.",
                  "qrobust train --arch tiny_resnet --train demo-out/data/train --out models/tiny_resnet.safetensors")
    p.add_argument("--arch", required=True, help="architecture (`qrobust ls models`)")
    p.add_argument("--train", required=True, help="training ImageFolder, or a folder/glob of WebDataset shards")
    p.add_argument("--out", required=True, help="checkpoint file (.safetensors) or folder")
    _recipe_arguments(p)
    p.set_defaults(run=_cmd_train)


def _cmd_train(args) -> int:
    base = resolve("qrobust.train.recipes:fp_recipe")(args.arch)
    path = resolve("qrobust.train.qat:train_fp")(args.arch, args.train, args.out, val_root=args.val,
                                                   recipe=_recipe(base, _recipe_overrides(args)), device=args.device,
                                                   progress=not args.quiet)
    print(f"checkpoint: {path}")
    return 0


def add_quantize(sub) -> None:
    p = subparser(sub, "quantize", "Quantization-aware fine-tuning of a float model with DoReFa, PACT or LSQ "
                  "(first/last layer 8 bit); --grid makes the method x bits grid. Multi-GPU: torchrun "
                  "--nproc_per_node N -m qrobust quantize ...",
                  "qrobust quantize --from models/tiny_resnet.safetensors --method lsq --bits 4 "
                  "--train demo-out/data/train --out models/")
    p.add_argument("--from", dest="fp_model", required=True,
                   help="FP model: a qrobust checkpoint, FILE with --arch (torchvision/timm/pycls state dict), "
                        "or ARCH:TORCHVISION_WEIGHTS")
    p.add_argument("--arch", help="architecture of a plain state dict given to --from")
    p.add_argument("--method", help="dorefa, pact or lsq (`qrobust ls quantizers`; --grid: comma-separated, "
                                    "default all)")
    p.add_argument("--bits", help="2, 4, 6 or 8 (weights and activations; --grid: comma-separated, default all)")
    p.add_argument("--grid", action="store_true", help="every method x bits; --out is a folder")
    p.add_argument("--train", required=True, help="training ImageFolder, or a folder/glob of WebDataset shards")
    p.add_argument("--out", required=True, help="checkpoint file, or folder (named like resnet18-lsq-w4a4)")
    p.add_argument("--first-last-bits", default="8", help="bits of the first and last layer, or 'same'")
    _recipe_arguments(p)
    p.set_defaults(run=_cmd_quantize)


def _cmd_quantize(args) -> int:
    from qrobust.shared.errors import QrobustError

    qat = resolve("qrobust.train.qat:quantize_grid") if args.grid else resolve("qrobust.train.qat:quantize")
    registered = resolve("qrobust.shared.quant:METHODS")  # every method, and the bits each supports
    methods = globs([args.method]) if args.method else (registered.in_order() if args.grid else [])
    try:
        bits = [int(b) for b in globs([args.bits])] if args.bits else \
            (sorted({b for m in methods for b in registered.get(m).bits}) if args.grid else [])
        first_last = None if args.first_last_bits == "same" else int(args.first_last_bits)
    except ValueError:
        raise QrobustError("--bits and --first-last-bits take integers (or 'same')") from None
    if not args.grid and (len(methods) != 1 or len(bits) != 1):
        raise QrobustError("quantize needs one --method and one --bits (or --grid)")
    fp_model, weights = (args.arch, args.fp_model) if args.arch else (args.fp_model, None)
    arch = args.arch or resolve("qrobust.train.qat:fp_arch")(args.fp_model)
    overrides = _recipe_overrides(args)
    recipe = _recipe(resolve("qrobust.train.recipes:qat_recipe")(arch, bits[0]), overrides) if overrides else None
    kw = dict(weights=weights, val_root=args.val, recipe=recipe, first_last_bits=first_last, device=args.device,
              progress=not args.quiet)
    if args.grid:
        paths = qat(fp_model, methods, bits, args.train, args.out, **kw)
    else:
        paths = [qat(fp_model, methods[0], bits[0], args.train, args.out, **kw)]
    for path in paths:
        print(f"checkpoint: {path}")
    return 0
