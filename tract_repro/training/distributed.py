"""Multi-process data-parallel training for the one training loop, set up from the standard env vars.

A launcher (torchrun, submitit on SLURM, or a test) starts one process per device and exports
``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.  With
``WORLD_SIZE`` > 1, :func:`process_group` joins the group (NCCL when the run's Device is CUDA,
each rank on ``cuda:LOCAL_RANK``; gloo on the CPU) and leaves it at the end.  With
``WORLD_SIZE`` unset or 1 nothing at all changes: no process group, no collectives.

How a step is split.  ``train.batch_size`` is the *global* batch B, whatever the number of ranks
W.  Rank r trains on the contiguous samples [r·B/W, (r+1)·B/W) of the global batch, cut into
``train.accumulate`` = k equal micro-batches (:func:`batch_slices`).  The random draws (data
flips, t, ε) are made for the whole global batch and sliced (:mod:`tract_repro.common.batch_random`),
so every sample sees the same randomness for any W and k.  Each micro-batch back-propagates
(its per-sample loss sum)/B, the ranks *sum* their gradients, and the result is the gradient of
the single-process loss at batch B (to float rounding; the order of the additions differs).
Clipping, Adam, the EMAs and the phase logic then run identically on every rank, so the ranks'
weights stay equal (checked at every checkpoint); rank 0 alone writes files.

Why an explicit all-reduce rather than DistributedDataParallel.  DDP would wrap the student,
prefixing its state-dict keys, which the EMAs, checkpoints, teachers and ``ema.pt`` all use
unprefixed.  It always *averages* over ranks, while our loss is already normalised by the global
batch.  It needs ``find_unused_parameters`` bookkeeping whenever a network has a branch that a
step does not use (an optional class or guidance embedding).  What it gains, overlapping the
all-reduce with the backward pass, only pays where communication is a large part of a step, and
in a distillation step a good part of the time goes to the target (teacher and self-teacher
calls, no backward) with nothing to overlap.  Summing the gradients ourselves, in large flat
buckets after the last micro-batch, costs one collective per bucket per step (what DDP's
``no_sync`` gives with accumulation).  The student stays an ordinary module, and the arithmetic is
exactly the one stated above.  The all-reduce has not been timed at paper scale; if it turns out
to dominate there, DDP with a summing communication hook is the drop-in alternative.

Dropout draws from torch's global RNG inside the network, so it is *not* independent of the rank
count: each rank r > 0 reseeds its global RNG from (seed, r) after building the networks (rank 0
keeps the stream of a single-process run), and checkpoints store every rank's RNG state, so a
resumed run with the same W is exact.  Runs with dropout therefore agree across different W or k
in distribution only; without dropout they agree to float rounding.
"""
import contextlib
import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tract_repro.common.errors import ConfigError

#: flat all-reduce buckets hold at most this many gradient elements (bounds the extra memory)
BUCKET_ELEMENTS = 1 << 24


def batch_slices(batch_size, world_size=1, rank=0, accumulate=1):
    """[(start, stop)] of rank ``rank``'s micro-batches within a global batch; one-line ValueError if it doesn't split evenly."""
    batch_size, world_size, accumulate = int(batch_size), int(world_size), int(accumulate)
    if accumulate < 1:
        raise ConfigError(f"train.accumulate = {accumulate}: use 1 (no accumulation) or more micro-batches per step")
    parts = world_size * accumulate
    if batch_size % parts:
        raise ConfigError(f"train.batch_size = {batch_size} does not split into {world_size} process(es) × "
                         f"train.accumulate = {accumulate} equal micro-batches: make train.batch_size a multiple of {parts}")
    per_rank, per_micro = batch_size // world_size, batch_size // parts
    first = rank * per_rank
    return [(first + m * per_micro, first + (m + 1) * per_micro) for m in range(accumulate)]


def rank_seed(seed, rank):
    """A 63-bit seed for rank ``rank``'s global RNG (dropout), distinct per (seed, rank)."""
    digest = hashlib.sha256(f"tract-repro dropout seed {int(seed)} rank {int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class World:
    """This process's place among the ranks; every method is a no-op (or the identity) for one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        """Whether this process writes the run directory."""
        return self.rank == 0

    def slices(self, batch_size, accumulate=1):
        return batch_slices(batch_size, self.size, self.rank, accumulate)

    def barrier(self):
        if self.size > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag):
        """Whether ``flag`` is true on any rank (a collective when there are several ranks)."""
        if self.size == 1:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, …] on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    @torch.no_grad()
    def sum_gradients(self, parameters, loss):
        """Sum ``.grad`` over ranks in place, in flat buckets, and return the summed ``loss`` (a scalar tensor).

        A gradient that is None on some ranks (a branch they did not use) counts as zeros there; one
        that is None on every rank stays None, as it would in one process (Adam skips it).
        """
        params = [p for p in parameters if p.requires_grad]
        device = loss.device
        stats = torch.cat([torch.tensor([p.grad is not None for p in params], dtype=torch.float64, device=device),
                           loss.detach().to(torch.float64).reshape(1)])
        dist.all_reduce(stats)
        used = [p for p, n in zip(params, stats[:-1].tolist()) if n > 0]
        for p in used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in used]):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset:offset + g.numel()].view(g.shape))
                offset += g.numel()
        return stats[-1].to(loss.dtype)

    @torch.no_grad()
    def check_in_sync(self, modules, when):
        """Raise on every rank if the ranks' copies of ``modules`` differ (they must stay equal bit for bit)."""
        if self.size == 1:
            return
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
        if not tensors:
            return
        fingerprint = torch.stack([t.detach().to(torch.float64).sum() for t in tensors])
        both = torch.cat([fingerprint, -fingerprint])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if not torch.equal(both[:len(tensors)], -both[len(tensors):]):
            raise RuntimeError(f"the {self.size} ranks' weights differ {when}: data-parallel training went out of step")


def _buckets(grads):
    """Consecutive groups of gradients of one dtype and device, each at most BUCKET_ELEMENTS long (or one tensor)."""
    bucket, size = [], 0
    for g in grads:
        if bucket and (g.dtype != bucket[0].dtype or g.device != bucket[0].device or size + g.numel() > BUCKET_ELEMENTS):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel()
    if bucket:
        yield bucket


def _env_int(name, default=None):
    value = os.environ.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} = {value!r} is not an integer") from None


def world_from_env():
    """(rank, world size, local rank) from the environment; (0, 1, 0) when WORLD_SIZE is unset."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return 0, 1, 0
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE = {size} but {', '.join(missing)} not set: start the processes with torchrun "
                         f"or the SLURM executor, or unset WORLD_SIZE for one process")
    rank = _env_int("RANK")
    if not 0 <= rank < size:
        raise ConfigError(f"RANK = {rank} is outside 0..{size - 1} (WORLD_SIZE = {size})")
    return rank, size, _env_int("LOCAL_RANK", rank)


def _bind_gpu(dev, local_rank):
    """Point a CUDA Device at this rank's GPU: cuda:LOCAL_RANK, or cuda:0 when the task sees a single GPU."""
    count = torch.cuda.device_count()
    index = 0 if count == 1 else local_rank  # one visible GPU per task (e.g. SLURM --gpus-per-task=1) is this rank's
    if index >= count:
        raise ConfigError(f"LOCAL_RANK = {local_rank} but this node has {count} visible GPU(s): "
                         f"start at most {count} processes per node")
    if dev.device.index is not None and dev.device.index != index:
        raise ConfigError(f"Device.name = '{dev.device}' pins one GPU, but rank {local_rank} of this node must use "
                         f"cuda:{index}: set Device.name = 'cuda' (or 'auto') for multi-process runs")
    dev.device = torch.device("cuda", index)
    torch.cuda.set_device(dev.device)


@contextlib.contextmanager
def process_group(dev):
    """Join the process group described by the environment for the duration of a run; yield this process's World.

    ``dev`` (the run's Device) picks the backend, NCCL for CUDA and gloo for the CPU, and on CUDA
    is pointed at this rank's GPU.  A group that is already initialised is used and left alone.
    """
    rank, size, local_rank = world_from_env()
    if size == 1:
        yield World()
        return
    if dev.is_cuda:
        _bind_gpu(dev, local_rank)
    owned = not dist.is_initialized()
    if owned:
        kwargs = dict(device_id=dev.device) if dev.is_cuda else {}
        dist.init_process_group("nccl" if dev.is_cuda else "gloo", init_method="env://", rank=rank, world_size=size,
                                **kwargs)
    elif (dist.get_rank(), dist.get_world_size()) != (rank, size):
        raise ConfigError(f"the initialised process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
                         f"but RANK = {rank} and WORLD_SIZE = {size}")
    try:
        yield World(rank, size, local_rank)
    finally:
        if owned:
            dist.destroy_process_group()
