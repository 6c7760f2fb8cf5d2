"""The live part of scoring: white-box attacks on the clean ``onecrop`` images.

Each (attack, budget) is a *job*. Jobs run on a deterministic subset of the
corpus's rows (all, or ``attack_limit`` rows spread evenly over the corpus, so
a class-sorted corpus keeps every class), in batches of ``batch_size`` subset
rows; a finished (job, batch) is recorded in the store's progress, so an
interrupted run resumes at the next batch. Per sample the store keeps the
final prediction and the outcome: 1 fooled, 0 robust, 2 not attacked because
an earlier attack of a ``cascade`` fooled it (robust accuracy of later attacks
is then unknown; WCAR is exact), 3 not among this attack's rows. Samples the
model misclassifies clean are fooled without being attacked (their prediction
is the clean one).

An expensive attack can run on fewer rows than the others (its ``limit``
setting, e.g. ``autoattack-linf.limit=1000`` as RobustBench evaluates
AutoAttack on a subset): its rows are spread evenly over the attack rows, so
the subsets are nested, and WCAR at a budget is computed on the rows every
attack at that budget ran on (its ``n`` is in the summary).

Budgets are defined for 3x224x224 inputs (:data:`REFERENCE_SHAPE`). For other
crop sizes the default rule ``budget_scale="dims"`` keeps the per-pixel
perturbation of the reference: L2 budgets scale with sqrt(d / d_ref), L1
budgets (and absolute L1 step sizes) with d / d_ref, Linf not at all.
``"none"`` uses the numbers as given. The rule and the resulting eps are
recorded with every result.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from qrobust.score import distributed as dist
from qrobust.score.comparability import PAPER_ATTACKS
from qrobust.score.logits import ModelOutputError, checked
from qrobust.score.stream import CorpusError, Failure, UnitStream
from qrobust.shared.errors import QrobustError
from qrobust.shared.seeding import sample_seed

log = logging.getLogger("qrobust.score")

FOOLED, ROBUST, SKIPPED, NOT_RUN = 1, 0, 2, 3


class AttackConfigError(QrobustError, ValueError):
    """An attack, budget or hyper-parameter was asked for that does not exist or does not fit."""


@dataclass(frozen=True)
class Job:
    attack: str
    budget: str
    eps: float
    norm: str
    cost: float
    params: dict = field(hash=False)
    transfer: bool = False  # crafted on a surrogate (FP) model, evaluated on the scored one
    limit: int | None = None  # attack only this many of the attack rows (spread evenly)

    @property
    def id(self) -> str:
        return f"{'transfer-' if self.transfer else ''}{self.attack}/{self.budget}"

    def record(self) -> dict:
        return {"attack": self.attack, "budget": self.budget, "eps": self.eps, "norm": self.norm,
                "params": self.params, "transfer": self.transfer, "limit": self.limit}


def plan_jobs(attacks: list[str], budgets: list[str], shape: tuple[int, ...], *, config: dict | None = None,
              rule: str = "dims") -> list[Job]:
    """Resolve attack names (or ``all``), budget names and overrides into jobs.

    ``config`` maps attack name -> {hyper-parameter: value, "budgets": {budget: eps}}
    (an attack config file, or ``--attack-set`` on the command line); eps given
    there are taken as they are (no scaling), which the job's record shows.
    """
    from qrobust.score.attacks import ATTACKS, BUDGET_NAMES, at_shape

    config = dict(config or {})
    if attacks == ["all"] or attacks == "all":  # the paper's five; slide-l1, apgd-l1 and square-linf are extras
        attacks = [n for n in ATTACKS if n in PAPER_ATTACKS]
    for name in config:
        ATTACKS.get(name)  # a typo in a config file is an error, not a silent no-op
    for b in budgets:
        if b not in BUDGET_NAMES:
            raise AttackConfigError(f"unknown budget {b!r}; budgets are {', '.join(BUDGET_NAMES)}")
    jobs = []
    for name in dict.fromkeys(attacks):
        spec = ATTACKS.get(name)
        overrides = dict(config.get(name, {}))
        eps_overrides = overrides.pop("budgets", {}) or {}
        limit = overrides.pop("limit", None)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise AttackConfigError(f"{name}: limit must be a positive integer, not {limit!r}")
        unknown = set(eps_overrides) - set(BUDGET_NAMES)
        if unknown:
            raise AttackConfigError(f"{name}: unknown budget(s) {sorted(unknown)} in the attack config")
        for b in budgets:
            eps, params = at_shape(name, b, shape, overrides, rule=rule, eps=eps_overrides.get(b))
            if not eps > 0:
                raise AttackConfigError(f"{name}/{b}: eps must be positive, got {eps}")
            jobs.append(Job(name, b, eps, spec.norm, spec.cost, params, limit=limit))
    return jobs



def subset_rows(total: int, limit: int | None) -> np.ndarray:
    """The corpus rows to attack: all, or ``limit`` rows spread evenly (deterministic).

    >>> subset_rows(10, 4).tolist()
    [0, 2, 5, 7]
    """
    if not limit or limit >= total:
        return np.arange(total)
    return (np.arange(limit) * total) // limit


def run_attacks(net, jobs: list[Job], store, source, units, rows: np.ndarray, *, seed: int, batch_size: int,
                device: str, verify: bool, cascade: bool, progress: bool, workers: int = 0,
                surrogate=None, share=None) -> None:
    """Run every unfinished (job, batch) and write outcomes and predictions into ``store``.

    ``share``, in a distributed run, picks this rank's batches from the sorted
    list of batches with unfinished jobs (the same list on every rank). A batch
    is the same rows, in the same order, with the same per-sample seeds
    whichever process runs it, and a cascade reads only its own batch's rows,
    so the outcomes do not depend on how the batches are shared.
    """
    import torch

    from qrobust.score.attacks import run_attack

    n_batches = math.ceil(len(rows) / batch_size)
    todo = {b: [j for j in jobs if store.attack_unit_id(j.id, b) not in store.done] for b in range(n_batches)}
    todo = {b: js for b, js in todo.items() if js}
    if share is not None:
        todo = {b: todo[b] for b in share(sorted(todo))}
    if not todo:
        return
    if cascade:  # cheapest first within a budget; budgets in the order asked
        for b in todo:
            todo[b] = sorted(todo[b], key=lambda j: (j.budget, j.cost))
    needed = np.concatenate([rows[b * batch_size:(b + 1) * batch_size] for b in sorted(todo)])
    bar = None
    if progress:
        from qrobust.shared.progress import bar as progress_bar

        bar = progress_bar(sum(len(js) * len(rows[b * batch_size:(b + 1) * batch_size]) for b, js in todo.items()),
                           "attacks", "img")
    flags = _ReferenceFlags()  # AutoAttack's own checks (e.g. Square beating APGD) are masking warnings too
    logging.getLogger("qrobust.attacks.autoattack").addHandler(flags)
    try:
        for b, keys, labels, pixels in _batches(source, units, rows, needed, sorted(todo), batch_size, verify,
                                                workers):
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float().div_(255)
            y = torch.from_numpy(labels.astype(np.int64)).to(device)
            with torch.inference_mode():
                clean_pred = checked(net(x), len(keys), None, lambda i: f"clean sample {keys[i]!r}",
                                     "clean attack batch").argmax(1)
            correct = (clean_pred == y).cpu().numpy()
            group = store.root["attacks"]
            if "zero_grad_share" not in group.attrs:  # a gradient-masking probe, once, on the first batch read
                from qrobust.score.attacks.checks import zero_gradient_share

                group.attrs["zero_grad_share"] = float(zero_gradient_share(net, x, y))
            lo = b * batch_size
            for job in todo[b]:
                outcome = np.where(correct, ROBUST, FOOLED).astype(np.int8)
                pred = clean_pred.cpu().numpy().astype(np.int32)
                attack_mask = correct.copy()
                if job.limit is not None:  # a nested subset of the attack rows
                    mine = np.isin(np.arange(lo, lo + len(keys)), subset_rows(len(rows), job.limit))
                    outcome[~mine] = NOT_RUN
                    pred[~mine] = -1
                    attack_mask &= mine
                if cascade:  # skip rows an attack already run at this budget fooled (the store knows them)
                    earlier = store.fooled_by_others(job.id, lo, len(keys))
                    outcome[attack_mask & earlier] = SKIPPED
                    attack_mask &= ~earlier
                idx = np.flatnonzero(attack_mask)
                if len(idx):
                    seeds = torch.tensor([sample_seed(seed, f"attack/{job.id}", keys[i]) for i in idx],
                                         dtype=torch.int64)
                    sel = torch.from_numpy(idx).to(device)
                    crafter = surrogate if job.transfer else net  # a transfer attack is crafted on the FP model
                    x_adv = run_attack(job.attack, crafter, x[sel], y[sel], job.eps, seeds=seeds, params=job.params)
                    _check_budget(job, x_adv, x[sel])
                    with torch.inference_mode():  # rescored in fp32 (the store's prediction is this one)
                        adv_pred = checked(net(x_adv.float()), len(idx), None,
                                           lambda i: f"sample {keys[idx[i]]!r} under {job.id}",
                                           "attack batch").argmax(1).cpu().numpy()
                    pred[idx] = adv_pred
                    outcome[idx] = np.where(adv_pred == labels[idx], ROBUST, FOOLED)
                store.write_attack(job.id, lo, outcome, pred)
                store.mark_done([store.attack_unit_id(job.id, b)])
                if bar is not None:
                    bar.update(len(keys))
    finally:
        logging.getLogger("qrobust.attacks.autoattack").removeHandler(flags)
        if flags.messages:
            group = store.root["attacks"]
            group.attrs["reference_flags"] = sorted(set(group.attrs.get("reference_flags", [])) | flags.messages)
        if bar is not None:
            bar.close()


class _ReferenceFlags(logging.Handler):
    """Collects the warnings the reference AutoAttack raises about the evaluation, to keep them in the results."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.add(record.getMessage())


def _check_budget(job: Job, x_adv, x) -> None:
    """An attack that leaves its budget or [0, 1] is a bug; never store its outcome."""
    d = (x_adv - x).flatten(1)
    size = {"linf": d.abs().amax(1), "l2": d.norm(dim=1), "l1": d.abs().sum(1)}[job.norm]
    slack = 1e-5 * max(1.0, job.eps)
    if bool((size > job.eps + slack).any()) or bool((x_adv < 0).any()) or bool((x_adv > 1).any()):
        worst = float(size.max())
        raise RuntimeError(f"{job.id}: adversarial examples left the budget ({worst:.6g} > eps {job.eps:.6g}) "
                           "or [0, 1]; this is a qrobust bug")


def _batches(source, units, rows, needed, batch_ids, batch_size, verify, workers):
    """(batch index, keys, labels, pixels) for each batch id, read from the clean/onecrop units."""
    from torch.utils.data import DataLoader

    wanted = set(needed.tolist())
    units = [u for u in units if any(u.start <= r < u.start + u.count for r in wanted)]
    stream = UnitStream(source, units, verify, {u.variant: 256 for u in units})
    loader = DataLoader(stream, batch_size=None, num_workers=min(workers, len(units)))
    pos = {int(r): i for i, r in enumerate(rows)}  # row -> index in the subset
    pending: dict[int, dict[int, tuple]] = {b: {} for b in batch_ids}
    want_count = {b: len(rows[b * batch_size:(b + 1) * batch_size]) for b in batch_ids}
    next_batch = 0
    for part in loader:
        if isinstance(part, Failure):
            raise CorpusError(part.message)
        for i, key in enumerate(part.keys):
            r = part.start + i
            if r in wanted:
                b = pos[r] // batch_size
                pending[b][pos[r]] = (key, int(part.labels[i]), part.pixels[i])
        while next_batch < len(batch_ids) and len(pending[batch_ids[next_batch]]) == want_count[batch_ids[next_batch]]:
            b = batch_ids[next_batch]
            items = [pending[b][k] for k in sorted(pending[b])]
            del pending[b]
            next_batch += 1
            keys, labels, pixels = zip(*items)
            yield b, list(keys), np.array(labels), np.stack(pixels)
    if next_batch < len(batch_ids):
        raise CorpusError(f"clean/onecrop ended before attack batch {batch_ids[next_batch]} was complete")


def plan_attacks(store, ctx, manifest, rows, *, attacks, budgets, limit, config, rule, transfer_from, n_classes,
                  batch_size, device):
    """(jobs, subset rows, {job id: settings}, surrogate model or None); the store's attack arrays are made
    (or checked) by the one process that writes it."""
    from qrobust.score.attacks import BUDGET_NAMES, resolved_params
    from qrobust.shared.models import load_model

    if "clean/onecrop" not in manifest["variants"]:
        raise CorpusError("attacks start from clean/onecrop, which this corpus lacks")
    if limit is not None and limit < 1:
        raise CorpusError("--attack-limit must be at least 1")
    crop = manifest["suite"]["spec"]["geometry"]["crop"]
    jobs = plan_jobs(attacks, list(budgets or BUDGET_NAMES), (3, crop, crop), config=config, rule=rule)
    # record what really runs on this model (AutoAttack adapts its targets to the number of classes)
    jobs = [dataclasses.replace(j, params=resolved_params(j.attack, j.params, n_classes)) for j in jobs]
    surrogate = None
    if transfer_from:
        surrogate, sspec, _ = load_model(transfer_from, num_classes=n_classes, device=device)
        if sspec.quant:
            log.warning("--transfer-from %s is quantized; the transfer check expects a float model", sspec.name)
        base = [j for j in jobs if j.attack == "pgd-linf"] or plan_jobs(
            ["pgd-linf"], list(budgets or BUDGET_NAMES), (3, crop, crop), config=config, rule=rule)
        jobs += [Job(j.attack, j.budget, j.eps, j.norm, j.cost, j.params, transfer=True) for j in base]
    subset = subset_rows(rows, limit)
    records = {j.id: {**j.record(), "scale": rule, **({"surrogate": transfer_from} if j.transfer else {})}
               for j in jobs}
    if ctx is None or ctx.rank == 0:
        store.open_attacks(subset, records, batch_size)
    log.info("attacks: %s on %d rows", ", ".join(records), len(subset))
    return jobs, subset, records, surrogate


def attack(net, store, writer, ctx, source, manifest, all_units, rows, *, attacks, budgets, limit, config, rule,
            cascade, transfer_from, n_classes, batch_size, device, verify, progress, workers, named) -> dict:
    """Plan, check and run the attack jobs of a scoring run; returns {job id: settings} of this run.

    ``store`` is the results store, ``writer`` where this process writes (the
    store, or this rank's part, then given this rank's share of the batches).
    """
    plan = dist.step(ctx, lambda: plan_attacks(store, ctx, manifest, rows, attacks=attacks, budgets=budgets,
                                                limit=limit, config=config, rule=rule, transfer_from=transfer_from,
                                                n_classes=n_classes, batch_size=batch_size, device=device))
    jobs, subset, records, surrogate = plan

    def run() -> None:
        if writer is not store:
            writer.open_attacks(subset, records, batch_size)
        onecrop = [u for u in all_units if u.variant == "clean/onecrop"]
        try:
            run_attacks(net, jobs, writer, source, onecrop, subset, seed=manifest.get("seed") or 0,
                                    batch_size=batch_size, device=device, verify=verify, cascade=cascade,
                                    progress=progress, workers=workers, surrogate=surrogate,
                                    share=ctx.split if ctx is not None else None)
        except ModelOutputError as e:
            raise ModelOutputError(f"model {named} {e}") from None

    dist.step(ctx, run)
    return records


def attack_config(path: str | None = None, sets: list[str] | None = None) -> dict:
    """Overrides from a TOML file and ``ATTACK.KEY=VALUE`` strings (these win), as ``{attack: {key: value}}``.

    The file has one table per attack, e.g. ``[pgd-linf]`` ``steps = 50`` and
    ``[pgd-linf.budgets]`` ``small = 0.001``. A set's value is read as TOML
    (``50``, ``0.5``, ``true``), else kept as a string; ``pgd-l2.budgets.small=0.25`` sets one eps.

    >>> attack_config(sets=["pgd-linf.steps=50", "pgd-l2.budgets.small=0.25"])
    {'pgd-linf': {'steps': 50}, 'pgd-l2': {'budgets': {'small': 0.25}}}
    """
    import tomllib

    config: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                config = tomllib.load(f)
        except OSError as e:
            raise AttackConfigError(f"attack config {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise AttackConfigError(f"attack config {path}: not valid TOML: {e}") from None
        bad = [k for k, v in config.items() if not isinstance(v, dict)]
        if bad:
            raise AttackConfigError(f"attack config {path}: {bad[0]!r} must be a table named after an attack")
    for item in sets or []:
        target, sep, text = item.partition("=")
        parts = target.strip().split(".")
        if not sep or len(parts) not in (2, 3) or (len(parts) == 3 and parts[1] != "budgets"):
            raise AttackConfigError(f"--attack-set {item!r}: expected ATTACK.KEY=VALUE or ATTACK.budgets.BUDGET=EPS")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        entry = config.setdefault(parts[0], {})
        if len(parts) == 3:
            entry.setdefault("budgets", {})[parts[2]] = value
        else:
            entry[parts[1]] = value
    return config
