"""Scoring across processes: ``torchrun --nproc_per_node=G -m qrobust score ...`` (or ``--distributed``).

How the work is shared, and why:

* The unit of work stays what it is in one process: a (variant, shard) unit
  for predictions, an (attack job, batch) for attacks. Units are dealt to the
  ranks round robin by webdataset's node splitter
  (:func:`webdataset.shardlists.split_by_node`), each to exactly one rank, and
  batches are formed within a unit (and attack batches from the same subset
  rows) exactly as in one process. Predictions depend on batch composition
  (near-ties can flip) and attack seeds on the batch's samples, never on the
  process, so the results equal one process's bit for bit (given the same
  ``--batch-size``, which is per process, and the same kernels: torchrun runs
  each rank with ``OMP_NUM_THREADS=1``).
* Each rank writes its own store, ``OUT/parts/rank-R-of-W``
  (:class:`~qrobust.score.results.PartStore`): never two writers into one zarr
  chunk, which would lose data. After every rank is done, rank 0 merges the
  parts into ``OUT/predictions.zarr`` and progress.json, deletes them, and
  writes summary.json, as one process would have. Each part records the
  digests of its finished units' chunks, as the main store does, and is checked
  against them before it is merged; ``OUT/parts`` holding anything but the
  ranks' own folders (a link, a file, a folder of another name) is refused,
  never merged or deleted.
* Any run on a folder (one process or several, of any number) first merges
  parts left by an interrupted distributed run, then deals out what is still to
  do. So a restart resumes with the same number of processes, another number,
  or one process.
* Every rank runs the same steps; after each, the ranks tell each other whether
  it failed (:func:`step`), so a user error on one rank (a damaged shard, a NaN
  model) stops every rank with the same one-line message instead of leaving the
  others waiting at a collective.

Only the ranks' statuses travel between processes (over gloo; the default
group is NCCL on CUDA, gloo otherwise), so the timeout is long: ranks that
finish early wait at the end for the slowest.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

from qrobust.shared.distributed import init_process_group
from qrobust.shared.errors import QrobustError

log = logging.getLogger("qrobust.score")

# ranks that finish early wait for the slowest one at the end; a unit is at most a shard, but a rank may
# be dealt a few more of the costly ones (sequences) than another
TIMEOUT = datetime.timedelta(hours=24)


class DistributedError(QrobustError):
    """A distributed run cannot start (no or broken torchrun environment, device) or another rank stopped."""


@dataclass
class Context:
    """This process's place in a distributed run."""

    rank: int
    world: int
    device: str  # this rank's device: cuda:LOCAL_RANK where the user gave plain cuda
    group: object = None  # the gloo group the statuses travel over
    owned: bool = False  # this run initialized the process group (and destroys it)

    def split(self, items: list) -> list:
        """This rank's share of ``items``: every ``world``-th from ``rank`` (webdataset's node splitter).

        The same list on every rank gives each item to exactly one rank.
        """
        from webdataset.shardlists import split_by_node

        return list(split_by_node(items, group=self.group))

    def close(self) -> None:
        import torch.distributed as dist

        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def setup(distributed: bool, device: str) -> Context | None:
    """Join the process group when started by torchrun (or asked with ``distributed``); None for one process.

    torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; with ``WORLD_SIZE`` > 1 the run is distributed whether or
    not ``--distributed`` was given. ``--distributed`` without torchrun (or with
    a world of one) scores in this one process. Raises
    :class:`DistributedError` for an incomplete environment or a device that
    every rank would share.
    """
    env = os.environ
    text = env.get("WORLD_SIZE")
    launched = text is not None and ("RANK" in env or "LOCAL_RANK" in env)
    if not (distributed or launched):
        return None
    try:
        world = int(text) if text is not None else 1
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={text!r} is not a number of processes; start with "
                               "`torchrun --nproc_per_node=G -m qrobust score ...`") from None
    if world <= 1:
        if distributed:
            log.warning("--distributed without torchrun (WORLD_SIZE %s): scoring in this one process",
                        "unset" if text is None else text)
        return None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the processes with "
                               "`torchrun --nproc_per_node=G -m qrobust score ...`, which sets them")
    try:
        rank, local = int(env["RANK"]), int(env["LOCAL_RANK"])
    except ValueError:
        raise DistributedError(f"RANK={env['RANK']!r} / LOCAL_RANK={env['LOCAL_RANK']!r} are not numbers") from None
    if not 0 <= rank < world or local < 0:
        raise DistributedError(f"RANK={rank} is not a rank of a world of {world} processes")
    import torch
    import torch.distributed as dist

    cuda = device.split(":")[0] == "cuda"
    if cuda:
        if device != "cuda":
            raise DistributedError(f"--device {device} under torchrun: every rank of a node would use that one "
                                   "GPU; give --device cuda (each rank takes cuda:LOCAL_RANK)")
        if local >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank} (LOCAL_RANK {local}) has no GPU: this node has "
                                   f"{torch.cuda.device_count()}; start at most that many processes per node")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    owned = not dist.is_initialized()
    if owned:
        init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise DistributedError(f"the process group ({dist.get_rank()} of {dist.get_world_size()}) is not the "
                               f"environment's (RANK {rank} of WORLD_SIZE {world})")
    group = dist.new_group(backend="gloo", timeout=TIMEOUT) if dist.get_backend() != "gloo" else None
    log.info("rank %d of %d on %s", rank, world, device)
    return Context(rank, world, device, group, owned)


def step(ctx: Context | None, work, *, root_only: bool = False):
    """``work()`` on every rank (only rank 0 with ``root_only``), then every rank learns whether any failed.

    Returns ``work``'s result (None on ranks that did not run it). An error on
    any rank stops every rank: the rank that failed raises its own (a bug keeps
    its traceback), the others a :class:`DistributedError` naming that rank, so
    none waits for the others at a later step until the timeout. A
    KeyboardInterrupt is not held back (it should stop at once; torchrun then
    stops the other ranks). In one process (``ctx`` None) this is just ``work()``.
    """
    if ctx is None:
        return work()
    import torch.distributed as dist

    result = error = None
    try:
        if ctx.rank == 0 or not root_only:
            result = work()
    except Exception as e:
        error = e
    message = None if error is None else str(error) if isinstance(error, QrobustError) else \
        f"{type(error).__name__}: {error}"
    status = [None] * ctx.world
    dist.all_gather_object(status, message, group=ctx.group)
    if error is not None:
        raise error
    failed = [(r, message) for r, message in enumerate(status) if message is not None]
    if failed:
        r, message = failed[0]
        raise DistributedError(f"rank {r} of {ctx.world} stopped: {message}")
    return result
