"""``qrobust score``: stream a corpus through a model, store top-5 predictions, write the summary.

Units are (variant, shard) pairs, read, verified and decoded by DataLoader
worker processes (:mod:`qrobust.score.stream`) while the main process runs the
model and writes the results store (:mod:`qrobust.score.results`). A rerun
skips finished units, so an interrupted run resumes; the summary is always
recomputed from all stored predictions. Under torchrun the units and attack
batches are dealt to the ranks, each writing its own part, merged by rank 0
(:mod:`qrobust.score.distributed`).
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import sys


from qrobust.score import distributed as dist
from qrobust.score import input_check, tidy
from qrobust.score import adversarial, summary as summaries
from qrobust.score import logits
from qrobust.score.results import PartStore, ResultsStore, check_place, writing
from qrobust.score.stream import Corpus, CorpusError, Failure, Unit, UnitStream, is_url
from qrobust.shared.files import write_atomic

log = logging.getLogger("qrobust.score")


def plan_units(manifest: dict, variants: list[str], limit: int | None) -> tuple[list[Unit], int]:
    """Every (variant, shard) unit, with each variant's first ``limit`` samples; returns (units, rows)."""
    total = manifest["samples"]["count"]
    rows = min(total, limit) if limit else total
    units = []
    for vid in variants:
        entry = manifest["variants"][vid]
        held = sum(s["count"] for s in entry["shards"])
        if entry["count"] != total or held != total:
            raise CorpusError(f"{vid}: manifest says {entry['count']} samples, its shards {held}, the corpus {total} "
                              f"(run `qrobust verify`; `--exclude {vid}` scores the rest)")
        start = 0
        for index, shard in enumerate(entry["shards"]):
            if start >= rows:
                break
            count = min(shard["count"], rows - start)
            units.append(Unit(vid, index, shard, start, count))
            start += shard["count"]
    return units, rows


def _layout(manifest: dict, variants: list[str], rows: int) -> dict[str, tuple[int, ...]]:
    out = {}
    for vid in variants:
        entry = manifest["variants"][vid]
        frames = entry["params"].get("frames") if entry["family"] == "sequence" else None
        out[vid] = (rows, frames, logits.TOPK) if frames else (rows, logits.TOPK)
    return out


def fp32_kernels(device: str) -> None:
    """On a GPU, score in true float32, as on a CPU: no TF32 convolutions or matrix products.

    cuDNN's convolutions default to TF32 on Ampere and later, which rounds their
    inputs to a 10-bit mantissa. A quantized model turns such differences into
    whole quantization steps: on an H200, a DoReFa tiny_resnet's logits moved by
    2e-3 from the CPU's. Robustness numbers must not depend on the card.
    """
    if str(device).startswith("cuda"):
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def score(corpus: str, model, out: str, *, weights: str | None = None, only: list[str] | None = None,
          exclude: list[str] | None = None, device: str = "cpu", batch_size: int = 64, workers: int | None = None,
          limit: int | None = None, verify: bool = True, progress: bool = True, attacks: list[str] | None = None,
          budgets: list[str] | None = None, attack_limit: int | None = None, attack_config: dict | None = None,
          budget_scale: str = "dims", cascade: bool = False, transfer_from: str | None = None,
          distributed: bool = False, normalize: str | None = None) -> dict | None:
    """Score ``model`` (see :func:`qrobust.shared.models.load_model`) on ``corpus`` into folder ``out``;
    returns the summary (also written to ``out/summary.json``).

    Started by torchrun (or with ``distributed``; see
    :mod:`qrobust.score.distributed`) the units and attack batches are shared
    by the ranks and the results equal one process's; rank 0 returns the
    summary, the other ranks None. ``batch_size`` is per process.

    ``only`` and ``exclude`` (globs over variant ids) select the variants. The
    corpus is checked before anything is scored: a manifest edited by hand, or
    a selected variant with shards missing, of the wrong size, extra or
    outside the corpus, is refused (``exclude`` a damaged variant to score the
    rest); each shard's sha256, structure and keys are checked as it is read.
    A model whose logits are NaN, infinite or not one per class stops the run
    (:class:`ModelOutputError`, naming the model and the first sample).

    ``attacks`` (names, or ``["all"]``) run live on the clean ``onecrop`` images
    at ``budgets`` (default all three), on ``attack_limit`` rows spread over the
    corpus (default all); see :mod:`qrobust.score.adversarial` for budgets,
    overrides (``attack_config``), ``cascade`` and ``transfer_from`` (an FP
    model spec whose PGD-Linf examples are replayed on this model).

    ``normalize`` is a ``module:callable`` model's input convention (see
    :func:`~qrobust.shared.models.load_model`): ``"none"`` (default: the model
    gets [0, 1] RGB) or ``"imagenet"``; it is part of the results folder's
    identity. A callable is also tried under the other convention on a few
    clean images, and the summary warns if that does much better
    (:mod:`qrobust.score.input_check`).

    Raises :class:`~qrobust.shared.errors.QrobustError` subclasses for a bad corpus, model or results folder.
    """
    ctx = dist.setup(distributed, device)
    try:
        return _score(corpus, model, out, ctx, weights=weights, only=only, exclude=exclude, device=device,
                      batch_size=batch_size, workers=workers, limit=limit, verify=verify, progress=progress,
                      attacks=attacks, budgets=budgets, attack_limit=attack_limit, attack_config=attack_config,
                      budget_scale=budget_scale, cascade=cascade, transfer_from=transfer_from,
                      normalize=normalize)
    finally:
        if ctx is not None:
            ctx.close()


def _score(corpus, model, out, ctx, *, weights, only, exclude, device, batch_size, workers, limit, verify,
           progress, attacks, budgets, attack_limit, attack_config, budget_scale, cascade, transfer_from,
           normalize):
    import torch

    from qrobust._version import __version__
    from qrobust.shared.models import from_module, load_model, state_digest

    run_device = ctx.device if ctx is not None else device  # the summary records the device as given
    if ctx is not None and ctx.rank:
        progress = False  # one progress bar (rank 0's share), not one per rank
    if batch_size < 1 or (workers is not None and workers < 0) or (limit is not None and limit < 1):
        raise CorpusError("--batch-size and --limit must be at least 1, --workers at least 0")
    source = Corpus(corpus)
    if not is_url(source.location):  # before anything is created or written: never into the corpus
        check_place(out, source.location)
    manifest = source.manifest
    variants = sorted(manifest["variants"])
    if attacks and only and "clean/onecrop" not in only:
        only = [*only, "clean/onecrop"]  # attacks start from it, and AAI needs its accuracy
    if only:
        for pattern in only:
            if not any(fnmatch.fnmatchcase(v, pattern) for v in variants):
                raise CorpusError(f"--only {pattern!r} matches no variant of this corpus")
        variants = [v for v in variants if any(fnmatch.fnmatchcase(v, p) for p in only)]
    if exclude:
        for pattern in exclude:
            if not any(fnmatch.fnmatchcase(v, pattern) for v in manifest["variants"]):
                raise CorpusError(f"--exclude {pattern!r} matches no variant of this corpus")
        variants = [v for v in variants if not any(fnmatch.fnmatchcase(v, p) for p in exclude)]
        if attacks and "clean/onecrop" not in variants:
            raise CorpusError("attacks start from clean/onecrop, which --exclude leaves out")
    if not variants:
        raise CorpusError("--only and --exclude leave no variant to score")
    problems = source.problems(variants)
    if problems:
        raise CorpusError(_refusal(problems, str(corpus)))
    n_classes = len(manifest.get("classes") or []) or None
    fp32_kernels(run_device)
    if isinstance(model, (str, os.PathLike)):
        net, spec, sha = load_model(model, weights=weights, num_classes=n_classes, device=run_device,
                                    normalize=normalize)
    else:  # an nn.Module built in this process (the Python API)
        if weights is not None:
            raise CorpusError("weights go with a model named by a string; load them into the module instead")
        (net, spec), sha = from_module(model, num_classes=n_classes, normalize=normalize, device=run_device), None
    state_sha = state_digest(net)  # what the model computes with, whatever file or code it came from
    if n_classes and spec.num_classes != n_classes:
        raise CorpusError(f"the model has {spec.num_classes} outputs but the corpus {n_classes} classes; labels would "
                          "not line up (for an ImageNet subset, generate with --classes LOC_synset_mapping.txt)")
    units, rows = plan_units(manifest, variants, limit)
    all_units = list(units)  # + the units of the other variants, whose earlier results join the summary
    for vid in sorted(set(manifest["variants"]) - set(variants)):
        try:
            all_units += plan_units(manifest, [vid], limit)[0]
        except CorpusError:  # a damaged variant left out of this run
            pass
    # what must not change within one results folder; the batch size too, since it can flip near-ties
    identity = {"model": {"arch": spec.arch, "num_classes": spec.num_classes, "quant": spec.quant,
                          "source": spec.source, "normalize": spec.normalize},
                "model_sha256": sha, "model_state_sha256": state_sha,
                "manifest_sha256": source.manifest_sha256, "rows": rows,
                "batch_size": batch_size}
    chunk = manifest.get("suite", {}).get("spec", {}).get("shards", {}).get("samples", 1000)
    layout = _layout(manifest, variants, rows)
    by_id = {ResultsStore.unit_id(u.variant, u.index): u for u in all_units}

    held = contextlib.ExitStack()
    if ctx is None or not ctx.rank:  # one writer per results folder: this run (rank 0 for a distributed one)
        held.enter_context(writing(out))
    with held:
        def open_store() -> ResultsStore:  # and keep what an interrupted distributed run left in its parts
            store = ResultsStore(out, identity, layout, chunk, units=by_id)
            store.describe(manifest.get("classes") or [])
            if store.absorb_parts(by_id):
                log.info("merged the parts of an interrupted distributed run")
            return store

        store = dist.step(ctx, open_store, root_only=True)
        if ctx is not None and ctx.rank:  # rank 0 made (or merged) it; the others only read it from here on
            store = ResultsStore(out, identity, layout, chunk, units=by_id, writer=False)
        writer = PartStore(store, ctx.rank, ctx.world, layout, chunk) if ctx is not None else store
        todo = [u for u in units if store.unit_id(u.variant, u.index) not in store.done]
        mine = ctx.split(todo) if ctx is not None else todo
        log.info("%s on %s: %d variants x %d samples, %d of %d units to score%s", spec.name, corpus, len(variants),
                 rows, len(todo), len(units), f", {len(mine)} by rank {ctx.rank} of {ctx.world}" if ctx else "")
        if workers is None:  # the cores are shared by the ranks of a node
            per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world if ctx else 1))
            workers = min(4, max(0, per_rank - 1))
        named = spec.name if spec.name == str(model) or not isinstance(model, (str, os.PathLike)) \
            else f"{spec.name} ({model})"

        def score_units() -> None:
            if mine:
                try:
                    _run_units(net, writer, source, mine, batch_size, workers, run_device, verify, progress,
                               spec.num_classes)
                except logits.ModelOutputError as e:
                    raise logits.ModelOutputError(f"model {named} {e}") from None

        dist.step(ctx, score_units)
        jobs_run = None
        if attacks:
            jobs_run = adversarial.attack(net, store, writer, ctx, source, manifest, all_units, rows, attacks=attacks,
                               budgets=budgets, limit=attack_limit, config=attack_config, rule=budget_scale,
                               cascade=cascade, transfer_from=transfer_from, n_classes=spec.num_classes,
                               batch_size=batch_size, device=run_device, verify=verify, progress=progress,
                               workers=workers, named=named)
        if ctx is not None:
            if ctx.rank:
                return None  # rank 0 merges and reports
            store.absorb_parts(by_id)
        predictions = summaries.finished_predictions(store, all_units, manifest)
        checks = {}
        if spec.is_callable:  # a user's model: its input convention is the user's choice, and can be wrong
            checks = input_check.probe(net, spec, source, all_units, predictions, store.labels[...], run_device, verify)
        summary = summaries.summarize(
            store, predictions, manifest,
            model={"name": spec.name, "arch": spec.arch, "quant": spec.quant, "sha256": sha,
                   "state_sha256": state_sha, "normalize": spec.normalize, "spec": _public_spec(spec)},
            corpus={"suite": manifest["suite"]["name"], "manifest_sha256": source.manifest_sha256, "samples": rows,
                    "location": _public_location(str(corpus))},
            env={"qrobust": __version__, "torch": torch.__version__, "device": device, "batch_size": batch_size,
                 "seed": manifest.get("seed"), "python": sys.version.split()[0]},
            checks=checks)
        if jobs_run is not None:
            summary["env"]["attacks"] = jobs_run
        write_atomic(store.path / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
        # for pandas; the `results` column stays empty here (the file's place names its folder, and a folder's
        # bytes do not depend on its name): `report` fills it for its models
        write_atomic(store.path / "results.csv", tidy.to_csv(tidy.rows(summary)))
        store.seal()  # the digests of the summary and of what it was computed from, last
        return summary


def _refusal(problems: list[tuple[str | None, str]], corpus: str) -> str:
    """One line: why a corpus is refused, and the way on (leave the damaged variants out, or regenerate)."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    if any(vid is None for vid, _ in problems):
        how = "the manifest as a whole is in question: regenerate the corpus or restore its manifest"
    else:
        how = f"`--exclude {','.join(sorted({vid for vid, _ in problems}))}` scores the rest"
    return f"corpus refused: {problems[0][1]}{more}; `qrobust verify {corpus}` lists every problem; {how}"


def _public_spec(spec) -> dict:
    """The spec for a shared summary: a weights file by its name only (its sha256 pins it), no local path."""
    d = spec.to_dict()
    if d.get("weights") and spec.source in ("checkpoint", "state_dict", "callable"):
        d["weights"] = os.path.basename(str(d["weights"]))
    return d


def _public_location(location: str) -> str:
    """A corpus location fit for a shared summary: no credentials or signed query strings."""
    from urllib.parse import urlsplit, urlunsplit

    if "://" not in location:
        return os.path.basename(os.path.normpath(location))  # the folder's name: no local path leaves the machine
    parts = urlsplit(location)
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def _run_units(net, store, source, todo, batch_size, workers, device, verify, progress,
               num_classes: int | None = None) -> None:
    import torch
    from torch.utils.data import DataLoader

    sequences = {u.variant for u in todo if len(store.arrays[u.variant].shape) == 3}
    # a piece holds about one batch of images: batch_size images, or batch_size // T videos
    pieces = {u.variant: max(1, batch_size // store.arrays[u.variant].shape[1]) if u.variant in sequences
              else batch_size for u in todo}
    loader = DataLoader(UnitStream(source, todo, verify, pieces), batch_size=None, num_workers=workers,
                        pin_memory=device.startswith("cuda"), prefetch_factor=2 if workers else None)
    remaining = {store.unit_id(u.variant, u.index): u.count for u in todo}
    bar = None
    if progress:
        from qrobust.shared.progress import bar as progress_bar

        bar = progress_bar(sum(u.count for u in todo), "score", "img")
    try:
        with torch.inference_mode():
            for part in loader:
                if isinstance(part, Failure):
                    raise CorpusError(part.message)
                pixels = part.pixels
                if part.unit.variant in sequences:  # (n, T, H, W, 3): every frame is an image
                    n, t = pixels.shape[:2]
                    top5 = logits.top5(net, pixels.reshape(n * t, *pixels.shape[2:]), batch_size, device, num_classes,
                                 lambda i, part=part, t=t: _where(part, i // t, f", frame {i % t}"))
                    top5 = top5.reshape(n, t, logits.TOPK)
                else:
                    top5 = logits.top5(net, pixels, batch_size, device, num_classes,
                                 lambda i, part=part: _where(part, i))
                store.write(part.unit.variant, part.start, top5, part.labels, part.keys)
                uid = store.unit_id(part.unit.variant, part.unit.index)
                remaining[uid] -= len(part.keys)
                if remaining[uid] == 0:
                    store.mark_done([uid])
                if bar is not None:
                    bar.update(len(part.keys))
    finally:
        if bar is not None:
            bar.close()


def _where(part, i: int, extra: str = "") -> str:
    """Sample ``i`` of a piece, for messages: variant, key, row and shard."""
    return (f"{part.unit.variant} sample {part.keys[i]!r}{extra} (row {part.start + i}, "
            f"shard {part.unit.shard['name']})")
