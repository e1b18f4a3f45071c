"""Fault-injecting callbacks for the fault tests, run in a subprocess: a test writes this file beside its run
(as killer.py) and names the classes with --trainer.callbacks+=killer.<Class>."""
import builtins
import io
import os
import signal
import time

import lightning.pytorch as pl
import torch


class KillAtStep(pl.Callback):
    """SIGKILL this process once training has made `step` optimizer steps: no handler, no cleanup."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillWhileWriting(pl.Callback):
    """SIGKILL this process as soon as it has opened (created, truncated) a file whose name contains `name`
    for writing, before a byte of it is written."""

    def __init__(self, name: str) -> None:
        real_open = io.open

        def open_then_die(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if name in os.path.basename(str(file)) and ("w" in mode or "a" in mode):
                os.kill(os.getpid(), signal.SIGKILL)
            return handle

        io.open = builtins.open = open_then_die  # pathlib writes through io.open


class PauseAtStep(pl.Callback):
    """At `step`, write this process's pid to `<flags>/ready` and wait (at most a minute) for `<flags>/go`."""

    def __init__(self, step: int, flags: str) -> None:
        self.step, self.flags = step, flags

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            with open(os.path.join(self.flags, "ready.partial"), "w") as f:
                f.write(str(os.getpid()))
            os.replace(os.path.join(self.flags, "ready.partial"), os.path.join(self.flags, "ready"))
            deadline = time.time() + 60
            while not os.path.exists(os.path.join(self.flags, "go")) and time.time() < deadline:
                time.sleep(0.05)


class PoisonAtStep(pl.Callback):
    """Make one weight NaN after optimizer step `step`, as a diverging update would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")
