"""The distributed runtime of `electra-triton pretrain`: process-group set-up, failure propagation, start-up checks.

A run is distributed under torchrun (WORLD_SIZE > 1) or with --fsdp. Every collective is bounded by --dist-timeout-s.
When one rank fails, the others must not wait in a collective until that timeout: the failing rank writes
"rank R: error" into the process group's key-value store (the first failure wins), and a watcher thread on every rank
polls it, prints it (rank 0 names the failing rank and its error) and ends its process with exit code 1. A rank that
loses the store (rank 0, its host under a plain launch, is gone) ends the same way.
"""

import contextlib
import dataclasses
import datetime
import os
import pathlib
import secrets
import socket
import sys
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist

FAILURE_KEY = "electra_triton/failure"
POLL_SECONDS = 0.5


class RunError(ValueError):
    """A run cannot start as asked (the message names the fix); nothing has been written."""


@dataclasses.dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    distributed: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_launch_environment(environ: dict[str, str] | os._Environ) -> None:
    """A multi-process launch needs a rendezvous address; torchrun sets it, a hand-made launch must."""
    if int(environ.get("WORLD_SIZE", 1)) <= 1:
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "RANK") if not environ.get(name)]
    if missing:
        raise RunError(
            f"WORLD_SIZE={environ['WORLD_SIZE']} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "not set: launch with torchrun (torchrun --nproc_per_node N -m electra_triton.pretrain ...), or set "
            "MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE in every process"
        )


def check_fsdp_available() -> None:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # noqa: F401
        except ImportError:
            raise RunError(f"--fsdp needs FSDP2 (fully_shard, torch >= 2.4); this is torch {torch.__version__}: "
                           "drop --fsdp to train with DDP") from None


def init_runtime(cfg) -> Runtime:
    """Set up the device and, for a distributed run, the process group (timeout --dist-timeout-s)."""
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RunError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    check_launch_environment(os.environ)
    if cfg.fsdp:
        check_fsdp_available()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1 and cfg.fsdp:
        # FSDP needs a process group even on one process.
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port()))})
    distributed = world_size > 1 or cfg.fsdp
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    return Runtime(rank, world_size, device, distributed)


def check_enough_documents(sources: list[tuple[str, str]], world_size: int) -> None:
    """Each rank reads the documents whose index is its own modulo the world size: every rank needs one at least.
    Counts documents up to world_size only, so the check costs a few reads whatever the corpus size."""
    if world_size <= 1:
        return
    from .data import read_documents

    count = 0
    for kind, path in sources:
        for _ in read_documents(kind, path):
            count += 1
            if count >= world_size:
                return
    raise RunError(f"the corpus has {count} document(s) for {world_size} processes: every process reads its own "
                   "documents, so give a larger --corpus or run fewer processes")


def check_resume_world_size(output_dir: pathlib.Path, world_size: int) -> None:
    """A checkpoint holds each rank's data position and RNG state, so it resumes on as many processes as wrote it.
    Read from the newest complete checkpoint's small state file, before the models are built."""
    from . import checkpoint as ckpt

    complete = [folder for folder in ckpt.list_checkpoints(output_dir) if (folder / ckpt.MANIFEST).is_file()]
    if not complete:
        return
    written_by = ckpt.load_checkpoint(complete[-1], "state")["world_size"]
    if written_by != world_size:
        raise RunError(f"{complete[-1]} was written by {written_by} processes and this run has {world_size}: a "
                       f"checkpoint holds every rank's data position and RNG state, so resume with {written_by} "
                       "processes (torchrun --nnodes x --nproc_per_node = that number)")


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict) -> None:
    """Load a checkpoint's full (unsharded) state into an FSDP2-sharded model and its optimizer; collective.

    Each full tensor is scattered into the layout of the parameter it replaces. (set_state_dict cannot do the model:
    it leaves the alias of a tied parameter, here the embeddings the generator and discriminator share, a plain tensor
    that will not copy into the sharded parameter.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded = {}
    for key, current in model.state_dict().items():
        full = model_state[key]
        if isinstance(current, DTensor):
            full = distribute_tensor(full.to(current.device, current.dtype), current.device_mesh, current.placements)
        sharded[key] = full
    model.load_state_dict(sharded)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def check_shared_output(runtime: Runtime, output_dir: pathlib.Path) -> None:
    """Rank 0 alone writes checkpoints, the tokenizer and the final models, and every rank reads them back on resume:
    the output folder must be one folder that all nodes see. Rank 0 leaves a random token there; each rank reads it."""
    if not runtime.distributed or runtime.world_size == 1:
        return
    marker = output_dir / ".shared-check"
    token = [secrets.token_hex(8) if runtime.main else None]
    if runtime.main:
        marker.write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    seen = marker.read_text() if marker.exists() else None
    problems: list[str | None] = [None] * runtime.world_size
    mine = None if seen == token[0] else f"rank {runtime.rank} on {socket.gethostname()}"
    dist.all_gather_object(problems, mine)
    runtime.barrier()
    if runtime.main:
        marker.unlink()
    unshared = [problem for problem in problems if problem]
    if unshared:
        raise RunError(f"--output-dir {output_dir} is not shared: {', '.join(unshared)} cannot see the files rank 0 "
                       "writes there. Every node must mount the same --output-dir (checkpoints, tokenizer and models "
                       "are written by rank 0 and read by all ranks on --resume)")


def _store() -> dist.Store | None:
    # The default group's store: torchrun's agent store, or the TCPStore rank 0 hosts under a plain env:// launch.
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def _say(text: str) -> None:
    print(f"electra-triton pretrain: error: {text}", file=sys.stderr, flush=True)


class FailureWatch:
    """Publishes this rank's failure to the others and ends this process when another rank has failed."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.store = _store()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="electra-triton-failure-watch", daemon=True)

    def start(self) -> None:
        if self.store is not None:
            self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()

    def publish(self, error: BaseException) -> str:
        """Record this rank's error unless another rank's came first; returns the failure that came first."""
        mine = f"rank {self.runtime.rank}: {type(error).__name__}: {error}"
        if self.store is None:
            return mine
        try:
            first = self.store.compare_set(FAILURE_KEY, "", mine)
        except (RuntimeError, dist.DistError):
            return mine
        return first.decode() if isinstance(first, bytes) else str(first)

    def _watch(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            try:
                failed = self.store.check([FAILURE_KEY])
                failure = self.store.get(FAILURE_KEY).decode() if failed else None
            except (RuntimeError, dist.DistError) as error:
                if self.stopping.is_set():
                    return
                failure = f"the rendezvous store is gone (rank 0 stopped?): {error}"
            if failure is None or self.stopping.is_set():
                continue
            if failure.startswith(f"rank {self.runtime.rank}:"):
                return  # this rank's own failure: the main thread is handling it
            _say(f"{failure.split(':', 1)[0]} failed, stopping rank {self.runtime.rank}. {failure}")
            sys.stderr.flush()
            os._exit(1)


@contextlib.contextmanager
def failure_propagation(runtime: Runtime) -> Iterator[None]:
    """Run the body on every rank; a failure on any rank stops all of them, and the process group is torn down."""
    if not runtime.distributed:
        yield
        return
    watch = FailureWatch(runtime)
    watch.start()
    try:
        yield
    except BaseException as error:
        first = watch.publish(error)
        watch.stop()
        if not first.startswith(f"rank {runtime.rank}:"):
            _say(f"{first.split(':', 1)[0]} failed first: {first}")
        with contextlib.suppress(RuntimeError, dist.DistError):  # the group may be broken by the failure itself
            dist.destroy_process_group()
        raise
    watch.stop()
    # No rank may tear the store down while another's watcher still reads it.
    dist.barrier()
    dist.destroy_process_group()
