"""Several processes, one run of a stage that drives its own loop (PPO): the process group of a
torchrun / accelerate launch and the collective operations that make the processes' statistics
and gradients those of one global batch. The Trainer stages leave all this to transformers.

In a single process (no launch, or WORLD_SIZE=1) every function here is the identity: the same
code runs either way. Between CPU processes the backend is gloo, between GPUs nccl.
"""

import contextlib
import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """True in a process of a launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(backend: str | None):
    """Join the launch's process group for the block (torchrun sets RANK, WORLD_SIZE and the
    rendezvous address); nothing in a single process or when a group is already up."""
    if not launched() or dist.is_initialized():
        yield
        return
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes (a new tensor on the input's device; the input is
    left as it was). nccl reduces GPU tensors only: a CPU tensor (a count, a flag) goes through
    this process's GPU there, so callers need not know the backend."""
    total = tensor.detach().clone()
    if world_size() > 1:
        through_gpu = total.device.type == "cpu" and dist.get_backend() == "nccl"
        reduced = total.cuda() if through_gpu else total
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        total = reduced.to(tensor.device)
    return total


def sum_gradients(parameters: list) -> None:
    """Replace each parameter's gradient by its sum over the processes (one all-reduce of all
    gradients flattened together): every process then takes the same optimizer step. Summed, not
    averaged: each process's loss is already its share of the global mean (its token sum over the
    global token count), so the sum is the gradient of the global batch whatever each holds."""
    if world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def all_gather_list(values: list) -> list:
    """Every process's `values` (any picklable items) concatenated in rank order."""
    if world_size() == 1:
        return list(values)
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(values))
    return [value for part in parts for value in part]


def from_main_process(value):
    """Rank 0's `value` on every process: a decision that the processes must take together (one
    that leads into a collective operation) is taken once."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_parameters(parameters: list) -> None:
    """Give every process rank 0's values of `parameters` (trainable weights start equal)."""
    if world_size() == 1:
        return
    for parameter in parameters:
        dist.broadcast(parameter.data, src=0)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
