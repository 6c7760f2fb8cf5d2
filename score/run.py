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
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path


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
    if ctx is not None and ctx.rank:
        progress = False  # one progress bar (rank 0's share), not one per rank
    source, variants = _select(corpus, [out], ctx, only=only, exclude=exclude, attacks=attacks,
                               batch_size=batch_size, workers=workers, limit=limit)
    with contextlib.ExitStack() as held:
        job = _open(source, variants, model, out, ctx, held, weights=weights, normalize=normalize, limit=limit,
                    batch_size=batch_size, device=device)
        workers = _workers(workers, ctx)

        def score_units() -> None:
            failed = _run_units([job], source, batch_size, workers, job.device, verify, progress)
            if failed:
                raise failed[0][1]

        dist.step(ctx, score_units)
        return _finish(job, ctx, source, corpus, device=device, batch_size=batch_size, verify=verify,
                       progress=progress, workers=workers, attacks=attacks, budgets=budgets,
                       attack_limit=attack_limit, attack_config=attack_config, budget_scale=budget_scale,
                       cascade=cascade, transfer_from=transfer_from)


def score_many(corpus: str, models: list, out: str, *, names: list[str] | None = None, device: str = "cpu",
               batch_size: int = 64, workers: int | None = None, only: list[str] | None = None,
               exclude: list[str] | None = None, limit: int | None = None, verify: bool = True,
               progress: bool = True, attacks: list[str] | None = None, budgets: list[str] | None = None,
               attack_limit: int | None = None, attack_config: dict | None = None, budget_scale: str = "dims",
               cascade: bool = False, transfer_from: str | None = None,
               normalize: str | None = None) -> dict[str, dict]:
    """Score several models on ``corpus`` in one pass: each shard is read, verified and decoded once and its
    batches go through every model that still needs them; returns ``{folder name: summary}``.

    Each model gets its own results folder ``out/NAME`` (``names``, or :func:`folder_names` of the models),
    byte-identical to scoring that model alone with :func:`score`, and resumable the same way. Attacks run
    per model after the corpus pass. A model whose logits go bad is dropped from the pass (its finished
    units are kept) while the others go on; the run then ends with that model's one-line error.
    Memory: every model stays loaded; the decoded batches in flight (each loader worker's prefetch) are
    shared by the models, not multiplied by them. One process: torchrun splits one model's units instead.
    """
    if not models:
        raise CorpusError("no model to score")
    names = list(names) if names is not None else folder_names(models)
    if len(set(names)) != len(names) or len(names) != len(models):
        raise CorpusError("every model needs its own results folder name; two are the same")
    outs = [Path(out) / n for n in names]
    source, variants = _select(corpus, outs, None, only=only, exclude=exclude, attacks=attacks,
                               batch_size=batch_size, workers=workers, limit=limit)
    summaries_ = {}
    clock = time.perf_counter()
    with contextlib.ExitStack() as held:
        jobs = [_open(source, variants, m, o, None, held, weights=None, normalize=normalize, limit=limit,
                      batch_size=batch_size, device=device) for m, o in zip(models, outs)]
        workers = _workers(workers, None)
        opened = time.perf_counter()
        failed = _run_units(jobs, source, batch_size, workers, jobs[0].device, verify, progress)
        passed = time.perf_counter()
        bad = {id(job) for job, _ in failed}
        for name, job in zip(names, jobs):
            if id(job) not in bad:
                summaries_[name] = _finish(job, None, source, corpus, device=device, batch_size=batch_size,
                                           verify=verify, progress=progress, workers=workers, attacks=attacks,
                                           budgets=budgets, attack_limit=attack_limit, attack_config=attack_config,
                                           budget_scale=budget_scale, cascade=cascade,
                                           transfer_from=transfer_from)
    log.info("%d models: loading and opening %.1f s, the corpus pass %.1f s, attacks and summaries %.1f s",
             len(jobs), opened - clock, passed - opened, time.perf_counter() - passed)
    if failed:
        raise failed[0][1]
    return summaries_


def folder_names(models: list) -> list[str]:
    """A results folder name per model: a checkpoint's file name without its suffix, an architecture's name,
    ``module-callable``; where two would be the same, each gets the start of its spec's sha256 too."""
    import hashlib

    def base(m) -> str:
        text = os.fspath(m) if isinstance(m, (str, os.PathLike)) else type(m).__name__
        stem = Path(text).name if os.sep in text or text.endswith(_CHECKPOINT_SUFFIXES) else text
        stem = stem.removesuffix(next((x for x in _CHECKPOINT_SUFFIXES if stem.endswith(x)), ""))
        return re.sub(r"[^A-Za-z0-9._-]+", "-", stem.replace(":", "-")).strip(".-")[:64] or "model"

    specs = [os.fspath(m) if isinstance(m, (str, os.PathLike)) else f"module#{i}" for i, m in enumerate(models)]
    if len(set(specs)) != len(specs):
        raise CorpusError("a model is listed twice")
    names = [base(m) for m in models]
    return [n if names.count(n) == 1 else f"{n}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"
            for n, spec in zip(names, specs)]


_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
MAX_MODELS = 1000


def expand_models(specs: list[str]) -> tuple[list[str], bool]:
    """The models named by ``--model`` values: a folder stands for its checkpoint files (sorted), ``@FILE`` for
    the specs in FILE (one per line; blank and ``#`` lines skipped), anything else for itself. Returns the
    models and whether the run is a many-model one (several, or a folder or list, even of one)."""
    out, many = [], len(specs) > 1
    for spec in specs:
        if spec.startswith("@"):
            many = True
            path = Path(spec[1:])
            try:
                if path.stat().st_size > 1 << 20:
                    raise CorpusError(f"{path}: more than 1 MiB; a model list holds one model per line")
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise CorpusError(f"--model {spec}: cannot read the list ({getattr(e, 'strerror', None) or e})") \
                    from None
            out += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        elif os.path.isdir(spec):
            many = True
            found = sorted(str(p) for p in Path(spec).iterdir() if p.suffix in _CHECKPOINT_SUFFIXES and p.is_file())
            if not found:
                raise CorpusError(f"--model {spec}: a folder without checkpoints ({', '.join(_CHECKPOINT_SUFFIXES)})")
            out += found
        else:
            out.append(spec)
    if not out:
        raise CorpusError("--model names no model")
    if len(out) > MAX_MODELS:
        raise CorpusError(f"{len(out)} models in one run; at most {MAX_MODELS}")
    return out, many


@dataclass
class _Job:
    """One model of a run: the model, its results store, and the units it still needs."""

    model: object
    out: Path
    net: object
    spec: object
    sha: str | None
    state_sha: str
    store: ResultsStore
    writer: ResultsStore
    device: str
    units: list      # the planned units of the selected variants
    all_units: list  # and those of the other variants, whose earlier results join the summary
    rows: int
    mine: list       # the units this process scores
    named: str


def _select(corpus, outs, ctx, *, only, exclude, attacks, batch_size, workers, limit):
    """The corpus, checked, and the variants to score (sorted)."""
    if batch_size < 1 or (workers is not None and workers < 0) or (limit is not None and limit < 1):
        raise CorpusError("--batch-size and --limit must be at least 1, --workers at least 0")
    source = Corpus(corpus)
    if not is_url(source.location):  # before anything is created or written: never into the corpus
        for out in outs:
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
    return source, variants


def _open(source, variants, model, out, ctx, held: contextlib.ExitStack, *, weights, normalize, limit,
          batch_size, device) -> _Job:
    """Load ``model``, take its results folder (the lock is held until ``held`` closes) and open its store."""
    from qrobust.shared.models import from_module, load_model, state_digest

    manifest = source.manifest
    run_device = ctx.device if ctx is not None else device  # the summary records the device as given
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
    if ctx is None or not ctx.rank:  # one writer per results folder: this run (rank 0 for a distributed one)
        held.enter_context(writing(out))

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
    log.info("%s on %s: %d variants x %d samples, %d of %d units to score%s", spec.name, source.location,
             len(variants), rows, len(todo), len(units),
             f", {len(mine)} by rank {ctx.rank} of {ctx.world}" if ctx else "")
    named = spec.name if spec.name == str(model) or not isinstance(model, (str, os.PathLike)) \
        else f"{spec.name} ({model})"
    return _Job(model, Path(out), net, spec, sha, state_sha, store, writer, run_device, units, all_units, rows,
                mine, named)


def _workers(workers: int | None, ctx) -> int:
    if workers is None:  # the cores are shared by the ranks of a node
        per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world if ctx else 1))
        workers = min(4, max(0, per_rank - 1))
    return workers


def _finish(job: _Job, ctx, source, corpus, *, device, batch_size, verify, progress, workers, attacks, budgets,
            attack_limit, attack_config, budget_scale, cascade, transfer_from) -> dict | None:
    """Attack ``job``'s model, then write its summary (rank 0); returns the summary (None on other ranks)."""
    import torch

    from qrobust._version import __version__

    manifest, spec, store = source.manifest, job.spec, job.store
    jobs_run = None
    if attacks:
        jobs_run = adversarial.attack(job.net, store, job.writer, ctx, source, manifest, job.all_units, job.rows,
                                      attacks=attacks, budgets=budgets, limit=attack_limit, config=attack_config,
                                      rule=budget_scale, cascade=cascade, transfer_from=transfer_from,
                                      n_classes=spec.num_classes, batch_size=batch_size, device=job.device,
                                      verify=verify, progress=progress, workers=workers, named=job.named)
    by_id = {ResultsStore.unit_id(u.variant, u.index): u for u in job.all_units}
    if ctx is not None:
        if ctx.rank:
            return None  # rank 0 merges and reports
        store.absorb_parts(by_id)
    predictions = summaries.finished_predictions(store, job.all_units, manifest)
    checks = {}
    if spec.is_callable:  # a user's model: its input convention is the user's choice, and can be wrong
        checks = input_check.probe(job.net, spec, source, job.all_units, predictions, store.labels[...], job.device,
                                   verify)
    summary = summaries.summarize(
        store, predictions, manifest,
        model={"name": spec.name, "arch": spec.arch, "quant": spec.quant, "sha256": job.sha,
               "state_sha256": job.state_sha, "normalize": spec.normalize, "spec": _public_spec(spec)},
        corpus={"suite": manifest["suite"]["name"], "manifest_sha256": source.manifest_sha256, "samples": job.rows,
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


def _run_units(jobs: list[_Job], source, batch_size, workers, device, verify, progress) -> list[tuple[_Job, Exception]]:
    """Stream the units the ``jobs`` still need (each read and decoded once) through every job's model that
    needs it; returns ``[(job, error)]`` for the models whose logits went bad (dropped, their finished units
    kept), in the order they failed."""
    import torch
    from torch.utils.data import DataLoader

    todo, seen = [], set()
    for job in jobs:  # the union, in plan order: each unit read once
        for u in job.mine:
            uid = job.store.unit_id(u.variant, u.index)
            if uid not in seen:
                seen.add(uid)
                todo.append(u)
    if not todo:
        return []
    shapes = {u.variant: jobs[0].store.arrays[u.variant].shape for u in todo}
    sequences = {v for v, shape in shapes.items() if len(shape) == 3}
    # a piece holds about one batch of images: batch_size images, or batch_size // T videos
    pieces = {v: max(1, batch_size // shapes[v][1]) if v in sequences else batch_size for v in shapes}
    loader = DataLoader(UnitStream(source, todo, verify, pieces), batch_size=None, num_workers=workers,
                        pin_memory=device.startswith("cuda"), prefetch_factor=2 if workers else None)
    remaining = [{ResultsStore.unit_id(u.variant, u.index): u.count for u in job.mine} for job in jobs]
    active = list(range(len(jobs)))
    failed = []
    bar = None
    if progress:
        from qrobust.shared.progress import bar as progress_bar

        bar = progress_bar(sum(u.count for u in todo), "score", "img")
    try:
        with torch.inference_mode():
            for part in loader:
                if isinstance(part, Failure):
                    raise CorpusError(part.message)
                uid = ResultsStore.unit_id(part.unit.variant, part.unit.index)
                pixels = part.pixels
                for k in list(active):
                    if uid not in remaining[k]:  # not a unit this model still needs
                        continue
                    job = jobs[k]
                    try:
                        top5 = _job_top5(job, part, pixels, part.unit.variant in sequences, batch_size, device)
                    except logits.ModelOutputError as e:
                        failed.append((job, logits.ModelOutputError(f"model {job.named} {e}")))
                        active.remove(k)
                        continue
                    job.writer.write(part.unit.variant, part.start, top5, part.labels, part.keys)
                    remaining[k][uid] -= len(part.keys)
                    if remaining[k][uid] == 0:
                        job.writer.mark_done([uid])
                if bar is not None:
                    bar.update(len(part.keys))
                if not active:
                    break
    finally:
        if bar is not None:
            bar.close()
    return failed


def _job_top5(job: _Job, part, pixels, sequence: bool, batch_size: int, device: str):
    if sequence:  # (n, T, H, W, 3): every frame is an image
        n, t = pixels.shape[:2]
        top5 = logits.top5(job.net, pixels.reshape(n * t, *pixels.shape[2:]), batch_size, device,
                           job.spec.num_classes, lambda i, part=part, t=t: _where(part, i // t, f", frame {i % t}"))
        return top5.reshape(n, t, logits.TOPK)
    return logits.top5(job.net, pixels, batch_size, device, job.spec.num_classes, lambda i, part=part: _where(part, i))


def _where(part, i: int, extra: str = "") -> str:
    """Sample ``i`` of a piece, for messages: variant, key, row and shard."""
    return (f"{part.unit.variant} sample {part.keys[i]!r}{extra} (row {part.start + i}, "
            f"shard {part.unit.shard['name']})")
