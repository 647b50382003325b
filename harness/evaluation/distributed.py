"""Data parallel `harness run` on the launchers users already have: `torchrun` and `accelerate launch`.

Both start one process per device and describe it in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT). Every rank loads the model; lmms-eval shards each task's documents the way it always
does (rank r takes documents r, r+N, r+2N, ...) and gathers its logged samples to rank 0. The harness
adds what lmms-eval does not know about: each rank's per-request records are gathered to rank 0, which
alone computes the paired metrics, counts FLOPs, runs the timing pass (the other ranks wait, so its device
is otherwise idle) and writes the store and summary.csv. Rank 0 also decides which cells are already
finished (a rerun resumes after the last committed cell) and shares the unpruned reference's answers.

One process (no launcher) is a world of one: every collective below is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

#: how long a rank waits at a collective for the others: rank 0's timing pass and FLOPs counts of a cell
#: on a 7B model run while the others wait, so the default of 30 minutes is too short to be safe
TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank (0 gathers and writes), world size, local rank (its device)."""

    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, environ=None) -> Ranks:
        """The launcher's variables (torchrun and accelerate launch set the same ones); one process without."""
        env = os.environ if environ is None else environ
        try:
            rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
            local = int(env.get("LOCAL_RANK", rank))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun or accelerate launch "
                             f"set them), got {env.get('RANK')!r}, {env.get('WORLD_SIZE')!r}, "
                             f"{env.get('LOCAL_RANK')!r}") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world}")
        if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR / MASTER_PORT are not set: start data parallel "
                             "runs with torchrun or accelerate launch, which set them")
        return cls(rank, world, local)

    def device(self, device: str) -> str:
        """Each rank's own device: `cuda` (or `cuda:N` in a single process) becomes `cuda:LOCAL_RANK`."""
        if self.parallel and device.split(":")[0] == "cuda":
            return f"cuda:{self.local}"
        return device

    def start(self, device: str) -> None:
        """Join the process group (NCCL between GPUs, gloo on CPU); nothing for one process."""
        if not self.parallel:
            return
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            return
        backend = "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(self.local)
            backend = "nccl"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)

    def stop(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives (no-ops for one process)
    def barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            dist.barrier()

    def share(self, obj):
        """Rank 0's `obj` on every rank (any picklable value)."""
        if not self.parallel:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if not self.parallel:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    @property
    def backend(self) -> str:
        """lmms-eval's `distributed_executor_backend`: its torch.distributed path once a group exists."""
        return "torchrun" if self.parallel else "accelerate"
