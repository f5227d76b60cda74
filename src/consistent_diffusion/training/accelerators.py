"""What the training loop runs under besides ``accelerate``: a stop flag that SIGINT/SIGTERM set
(the loop checkpoints after the current step and stops), and ``LocalAccelerator``, the part of
``accelerate.Accelerator`` the loop uses, for runs that stay in this process."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            if self.requested:  # a second signal: stop now
                raise KeyboardInterrupt
            self.requested = True

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


class LocalAccelerator:
    """The part of ``accelerate.Accelerator`` the loop uses, for a run that stays in this process even
    when the program runs under ``torchrun`` / ``accelerate launch`` (where every ``Accelerator``
    shares the distributed state and would wrap the model for data parallelism across processes).

    The bench's prepare stage trains this way: each shard fine-tunes what its own cells need, and a
    run gives the same weights whether the bench ran in one process or several. Process index 0,
    the device is the CPU or this process's own GPU (``LOCAL_RANK``), bf16 autocast if asked."""

    process_index = 0
    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def __init__(self, cpu: bool, mixed_precision: str = "no") -> None:
        import os

        if cpu or not torch.cuda.is_available():
            self.device = torch.device("cpu")
        else:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.mixed_precision = mixed_precision

    def prepare(self, *objects: Any) -> tuple[Any, ...]:
        for item in objects:
            if isinstance(item, torch.nn.Module):
                item.to(self.device)
        return objects

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, parameters: Sequence[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def wait_for_everyone(self) -> None:
        return None

    def print(self, *args: Any) -> None:
        print(*args)
