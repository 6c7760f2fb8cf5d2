"""``--part I/N`` and ``--finalize``: one corpus built by N independent runs (a SLURM job array, any
batch scheduler), in one shared folder.

Every run plans the same jobs from the same inputs (the plan check refuses a
run whose suite, sources, selection or pixel-library versions differ) and
deals them to N parts, longest first, each to the part with the least work so
far: part I builds its jobs and nothing else. Each part records the summaries
of its shards in ``OUT/.qrobust/parts/``; the manifest is written from those
records by the part that finds every shard recorded, or by ``--finalize``,
which also names what is missing. The shards are the same bytes a single run
would write (the unit of work and its seeding do not depend on who runs it),
so the corpus is too.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from qrobust.generate.jobs import Job
from qrobust.shared import manifest as mf
from qrobust.shared.files import write_atomic
from qrobust.shared.errors import QrobustError
from qrobust.shared.shards import keys_digest, shard_summary

PARTS_DIR = "parts"  # under the corpus's state folder


class PartError(QrobustError, ValueError):
    """A bad --part, or parts that do not add up to a corpus yet."""


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), 1 <= I <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise PartError(f"--part {text!r}: expected I/N with 1 <= I <= N, e.g. 3/8 "
                        "(SLURM: --part $((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT with --array=0-7)")
    return int(m.group(1)), int(m.group(2))


def deal(planned: list[Job], costs: list[float], n: int) -> list[list[Job]]:
    """Deal jobs (longest first) to ``n`` parts, each to the part with the least estimated work so far
    (the lowest-numbered among equals): deterministic, and balanced within the longest job."""
    parts: list[list[Job]] = [[] for _ in range(n)]
    load = [0.0] * n
    for k in sorted(range(len(planned)), key=lambda k: -costs[k]):
        i = min(range(n), key=lambda p: (load[p], p))
        parts[i].append(planned[k])
        load[i] += costs[k]
    return parts


def record_path(state: Path, i: int, n: int) -> Path:
    return state / PARTS_DIR / f"part-{i:05d}-of-{n:05d}.json"


SUMMARY_FIELDS = {"sha256": str, "bytes": int, "count": int, "keys_sha256": str}


def write_record(state: Path, i: int, n: int, plan_sha256: str, samples_sha256: str, results: list) -> None:
    """What part I of N built: (variant id, shard index, summary) of each of its shards, and a digest of
    the usable samples it saw (its source scan)."""
    shards = sorted([vid, index, summary] for job in results for vid, index, summary in job)
    path = record_path(state, i, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"plan_sha256": plan_sha256, "samples_sha256": samples_sha256,
                                      "part": f"{i}/{n}", "shards": shards}, sort_keys=True))


def _entry(item) -> tuple[str, int, dict]:
    vid, index, summary = item
    if not (isinstance(vid, str) and mf.VARIANT_ID.fullmatch(vid) and isinstance(index, int) and index >= 0
            and isinstance(summary, dict)
            and all(isinstance(summary.get(k), t) for k, t in SUMMARY_FIELDS.items())):
        raise TypeError(item)
    return vid, index, {k: summary[k] for k in SUMMARY_FIELDS}


def recorded_shards(state: Path, plan_sha256: str, samples_sha256: str) -> dict[str, tuple[str, int, dict]]:
    """{shard name: (variant id, index, summary)} from every part record of this plan (any N).

    A record made from other usable samples than ``samples_sha256`` (a part
    whose source scan differed, e.g. a read error on its node) is refused: its
    shards were cut from another sample list."""
    out: dict[str, tuple[str, int, dict]] = {}
    for path in sorted((state / PARTS_DIR).glob("part-*-of-*.json")):
        try:
            record = json.loads(path.read_text())
            if record.get("plan_sha256") != plan_sha256:
                continue  # a record of another plan (the folder was rebuilt): not this corpus's
            entries = [_entry(item) for item in record["shards"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise PartError(f"{path}: unreadable part record; delete it and rerun that part") from None
        if record.get("samples_sha256") != samples_sha256:
            raise PartError(f"part {record.get('part')} ({path.name}) saw other usable samples than this run: "
                            "its source scan differed (a read error on its node?); delete that record and "
                            f"{state / 'scan.json'}, then rerun the parts")
        for vid, index, summary in entries:
            out[mf.shard_name(vid, index)] = (vid, index, summary)
    return out


def collect(out: Path, state: Path, plan_sha256: str, samples_sha256: str, planned: list[Job],
            summarize: bool) -> tuple[list, list[str]]:
    """The shard summaries of every planned shard, from the parts' records, and the names of those missing.

    A recorded shard counts only if it holds the planned samples and its file is
    still there at the recorded size (otherwise it was changed since: its part
    must build it again). With ``summarize``, a shard on disk that no record
    lists (its part was stopped after publishing it) is summarized here (read
    and hashed) instead of counting as missing.
    """
    records = recorded_shards(state, plan_sha256, samples_sha256)
    found, missing = [], []
    for job in planned:
        keys_sha256 = keys_digest([s.key for s in job.samples])
        for vid in job.group:
            name = mf.shard_name(vid, job.shard)
            path = out / name
            entry = records.get(name)
            if entry is not None:  # recorded: it counts while it is there at the recorded size
                if entry[2]["keys_sha256"] == keys_sha256 and path.is_file() \
                        and path.stat().st_size == entry[2]["bytes"]:
                    found.append([entry])
                else:
                    missing.append(name)
            elif summarize and path.is_file():
                try:
                    summary = shard_summary(path)
                except (OSError, ValueError):
                    summary = None
                if summary is not None and summary["keys_sha256"] == keys_sha256:
                    found.append([(vid, job.shard, summary)])
                else:
                    missing.append(name)
            else:
                missing.append(name)
    return found, missing


def missing_message(missing: list[str], planned_parts: list[list[Job]] | None) -> str:
    """Which shards are missing, and which parts would build them."""
    head = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    how = "run `qrobust generate` without --part (same arguments) to build them here"
    if planned_parts:
        n = len(planned_parts)
        owners = sorted({i + 1 for i, jobs in enumerate(planned_parts) for j in jobs for vid in j.group
                         if mf.shard_name(vid, j.shard) in set(missing)})
        if owners:
            how = "rerun --part " + ", ".join(f"{i}/{n}" for i in owners[:8]) + \
                  (" ..." if len(owners) > 8 else "") + ", or " + how
    return f"{len(missing)} shard(s) not built yet: {head}; {how}"


def part_counts(state: Path) -> list[int]:
    """The N of the part records present (``part-I-of-N``), to name the parts to rerun."""
    found = set()
    for path in (state / PARTS_DIR).glob("part-*-of-*.json"):
        m = re.fullmatch(r"part-\d+-of-(\d+)\.json", path.name)
        if m:
            found.add(int(m.group(1)))
    return sorted(found)
