"""Run a sweep of ``diffvision fit`` runs (fractions x arms x seeds), side by side on GPUs.

The jobs come from a spec (``diffvision.experiments.specs``); each runs as its own process:

* a finished run has ``result.json`` (``diffvision.experiments.results``: final metrics, parameters,
  wall time, device, command): it is skipped; an unfinished one resumes from its ``last.ckpt``
  (``--ckpt_path last``); its wall time counts every attempt (``attempts.json``: start and last-seen
  time of each, refreshed every ``HEARTBEAT_S`` while it runs, so an attempt killed with the whole
  sweep is counted too);
* ``--time-limit`` stops the sweep cleanly before an outer limit (a job scheduler's, a lent machine's):
  running jobs are killed and resume next time; none is started that cannot finish by its estimated cost;
  SIGTERM, SIGHUP and Ctrl-C stop it the same way (each fit runs in its own process group, which is
  killed: no fit outlives the sweep unless the sweep itself is SIGKILLed);
* a job whose run directory is locked by a live writer (``diffvision.run_lock``: e.g. a fit left running
  by a SIGKILLed sweep) is skipped, never started a second time into the same directory;
* jobs run longest-first on ``--jobs-per-gpu`` slots per GPU (``CUDA_VISIBLE_DEVICES``); small models
  leave a GPU mostly idle, so several share one.

Generation runs also sample with the diffusers pipeline and compute FID (``train/fid_eval.py``) once
training ends; that result goes into the same ``result.json``. ``main`` is ``train/sweep.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from diffvision.run_lock import lock_holder

from .results import (classification_result, generation_result, headline_text, latest_version, run_record,
                      save_result)
from .specs import (REPO, Job, build_jobs, extra_value, fid_command, fit_command, load_spec, merged_model_kwargs,
                    read_config, recipe_name)

__all__ = ["HEARTBEAT_S", "attempts_wall_s", "count_parameters", "main", "record_attempt", "run_sweep",
           "write_run_result"]

HEARTBEAT_S = 10.0
# where each task's LightningModule keeps the trained network (the rest is EMA copies and the like)
NETWORK_PREFIX = {"classification": "model.", "generation": "transformer."}


# ---------------------------------------------------------------------------------------------
# A job's attempts and result
# ---------------------------------------------------------------------------------------------

def record_attempt(job: Job, now: float, new: bool = False) -> list[dict]:
    """Start a new attempt of ``job`` (``new``) or mark the current one as alive at ``now``."""
    path = job.dir / "attempts.json"
    attempts = json.loads(path.read_text()) if path.exists() else []
    if new or not attempts:
        attempts.append({"start": round(now, 1), "seen": round(now, 1)})
    else:
        attempts[-1]["seen"] = round(now, 1)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(attempts))
    os.replace(partial, path)  # a kill while writing leaves the previous record
    return attempts


def attempts_wall_s(attempts: list[dict]) -> float:
    return sum(a["seen"] - a["start"] for a in attempts)


def count_parameters(task: str, log_dir: Path) -> Optional[int]:
    """Parameters of the trained network, from its ``last.ckpt`` (EMA copies left out)."""
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return None
    from diffvision.checkpoints import load_checkpoint_file, model_state_dict

    state = model_state_dict(load_checkpoint_file(ckpt, mmap=True), NETWORK_PREFIX[task], source=ckpt)
    return sum(v.numel() for v in state.values())


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU (torch {torch.__version__})"


def write_run_result(spec: dict, job: Job, command: list[str], attempts: list[dict]) -> dict:
    """The finished job's ``result.json``, from its logs (and, for generation, its ``fid.json``)."""
    from diffvision.lightning.loggers import read_epoch_metrics

    log_dir = latest_version(job.dir)
    metrics = read_epoch_metrics(log_dir)
    record = run_record(spec["task"], metrics, kind=job.arm, fraction=job.fraction, seed=job.seed, epochs=job.epochs,
                        params=count_parameters(spec["task"], log_dir), wall_s=round(attempts_wall_s(attempts), 1),
                        attempts=len(attempts), device=device_name(), command=shlex.join(command), log_dir=str(log_dir))
    if spec["task"] == "classification":
        result = classification_result(record, metrics, job.model, merged_model_kwargs(spec, job), job.name)
    else:
        result = generation_result(record, metrics, read_config(spec)["model"]["init_args"]["preset"], job.model,
                                   json.loads((job.dir / "fid.json").read_text()))
    result["recipe"] = recipe_name(spec, job)
    save_result(job.dir, result)
    return result


# ---------------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------------

@dataclass
class Running:
    job: Job
    proc: subprocess.Popen
    stage: str                 # "fit" or "fid"
    command: list[str]
    fit_command: list[str]
    log: Any
    beat: float                # when attempts.json was last written (the attempt's start, then heartbeats)


def run_dir_writer(job: Job) -> Optional[str]:
    """Who is writing one of ``job``'s run directories now, or None."""
    for run_dir in sorted(job.dir.glob("version_*")):
        holder = lock_holder(run_dir)
        if holder is not None:
            return f"{run_dir} is being written by {holder}"
    return None


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum, frame):
    raise _Terminated(signum)


def launch(command: list[str], job: Job, gpu: Optional[str], stage: str) -> tuple[subprocess.Popen, Any]:
    # DIFFVISION_DEBUG: an unattended job's log keeps the traceback of a failure, not one line
    env = dict(os.environ, PYTHONUNBUFFERED="1", DIFFVISION_DEBUG="1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    job.dir.mkdir(parents=True, exist_ok=True)
    log = open(job.dir / f"{stage}.log", "a")
    log.write(f"\n$ {shlex.join(command)}\n")
    log.flush()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log


def prepare_data(spec: dict, extra: list[str]) -> None:
    """Decode the dataset into the cache once, before many runs would each do it at the same time."""
    from diffvision.data import ImageDataModule

    data = dict(read_config(spec).get("data") or {})
    root = extra_value(extra, "--data.root")
    if root:
        data["root"] = root
    keep = {k: data[k] for k in ("dataset", "root", "img_size", "cache_dir") if k in data}
    ImageDataModule(**keep).prepare_data()


def run_sweep(spec: dict, jobs: list[Job], gpus: list[Optional[str]], jobs_per_gpu: int,
              time_limit: Optional[float], rate: Optional[float]) -> dict[str, str]:
    """Run ``jobs`` on ``jobs_per_gpu`` slots per GPU; returns {job name: 'done' | 'failed' | 'stopped' | 'skipped'}."""
    status = {j.name: "skipped" for j in jobs if j.done}
    pending = [j for j in jobs if not j.done]
    slots: list[Optional[Running]] = [None] * (len(gpus) * jobs_per_gpu)
    t0 = time.time()
    # SIGTERM / SIGHUP (a job scheduler, a closed terminal) stop the sweep as Ctrl-C does: its fits run in
    # their own process groups (a Ctrl-C in the terminal must not reach them mid-write), so they would
    # otherwise outlive it and a restarted sweep would find their directories busy.
    stop_signals = (signal.SIGTERM, signal.SIGHUP)
    handlers = ({sig: signal.signal(sig, _terminate) for sig in stop_signals}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        while pending or any(slots):
            for i, running in enumerate(slots):
                if running is None:
                    continue
                code = running.proc.poll()
                if code is None:
                    continue
                running.log.close()
                job = running.job
                if code != 0:
                    status[job.name] = "failed"
                    print(f"[sweep] FAILED {job.name} ({running.stage}, exit {code}); see {job.dir}/{running.stage}.log",
                          flush=True)
                    slots[i] = None
                    continue
                if spec["task"] == "generation" and running.stage == "fit":
                    command = fid_command(spec, job, latest_version(job.dir))
                    proc, log = launch(command, job, gpus[i // jobs_per_gpu], "fid")
                    slots[i] = Running(job, proc, "fid", command, running.fit_command, log, running.beat)
                    continue
                try:
                    result = write_run_result(spec, job, running.fit_command, record_attempt(job, time.time()))
                except Exception as err:  # noqa: BLE001  (one broken run must not stop the others)
                    status[job.name] = "failed"
                    print(f"[sweep] FAILED {job.name}: {type(err).__name__}: {err}", flush=True)
                    slots[i] = None
                    continue
                status[job.name] = "done"
                print(f"[sweep] done {job.name}: {headline_text(result)} in {result['wall_s']:.0f} s", flush=True)
                slots[i] = None
            elapsed = time.time() - t0
            for i in range(len(slots)):
                if slots[i] is not None or not pending:
                    continue
                job = pending[0]
                if time_limit is not None and rate is not None and elapsed + job.cost / rate > time_limit:
                    # too long for the time left: try a shorter one
                    fitting = [j for j in pending if elapsed + j.cost / rate <= time_limit]
                    if not fitting:
                        break
                    job = fitting[0]
                pending.remove(job)
                writer = run_dir_writer(job)
                if writer is not None:
                    status[job.name] = "running elsewhere"
                    print(f"[sweep] skip {job.name}: {writer} (a fit of an earlier sweep still running?)", flush=True)
                    continue
                command = fit_command(spec, job)
                proc, log = launch(command, job, gpus[i // jobs_per_gpu], "fit")
                print(f"[sweep] start {job.name} on {'GPU ' + gpus[i // jobs_per_gpu] if gpus[0] is not None else 'CPU'}",
                      flush=True)
                slots[i] = Running(job, proc, "fit", command, command, log, beat=time.time())
                record_attempt(job, slots[i].beat, new=True)
            now = time.time()
            for running in filter(None, slots):
                if now - running.beat >= HEARTBEAT_S:
                    record_attempt(running.job, now)
                    running.beat = now
            if time_limit is not None and elapsed > time_limit:
                raise TimeoutError
            if time_limit is not None and rate is not None and not any(slots) and pending:
                break  # nothing left that fits
            time.sleep(1.0)
    except (KeyboardInterrupt, TimeoutError, _Terminated) as err:
        for sig in handlers:
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        why = "time limit" if isinstance(err, TimeoutError) else f"{err}" if isinstance(err, _Terminated) else "interrupted"
        for running in filter(None, slots):
            try:
                os.killpg(running.proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it had just ended
                pass
            running.proc.wait()
            running.log.close()
            record_attempt(running.job, time.time())
            status[running.job.name] = "stopped"
            print(f"[sweep] stopped {running.job.name} ({why}); it resumes from last.ckpt next time", flush=True)
        if isinstance(err, _Terminated):
            print(f"[sweep] terminated by {err}", flush=True)
            raise SystemExit(128 + err.signum) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    for job in pending:
        status.setdefault(job.name, "not started")
    return status


# ---------------------------------------------------------------------------------------------
# CLI (train/sweep.py)
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Arguments after -- go to every `diffvision fit` call.")
    parser.add_argument("spec", type=Path, help="sweep spec YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--root", type=Path, default=None, help="runs directory (default runs/sweeps/<spec name>)")
    parser.add_argument("--arms", "--kinds", nargs="+", default=None, help="only these arms of the spec")
    parser.add_argument("--fractions", nargs="+", type=float, default=None, help="only these fractions")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds")
    parser.add_argument("--gpus", nargs="*", default=None,
                        help="GPU ids (default: every visible GPU; none -> CPU, one job at a time)")
    parser.add_argument("--jobs-per-gpu", type=int, default=1, help="runs sharing one GPU (default 1)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds: stop (and kill running jobs, which resume later) after this long")
    parser.add_argument("--rate", type=float, default=None,
                        help="cost units (fraction x epochs) one slot trains per second; with --time-limit, "
                             "jobs that cannot finish in time are not started")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)

    spec = load_spec(args.spec)
    root = args.root or REPO / "runs" / "sweeps" / args.spec.stem
    jobs = build_jobs(spec, root, args.arms, args.fractions, args.seeds, extra)
    if args.gpus is None:
        import torch

        args.gpus = [str(i) for i in range(torch.cuda.device_count())]
    gpus: list[Optional[str]] = list(args.gpus) or [None]
    if gpus == [None]:
        args.jobs_per_gpu = 1
    print(f"[sweep] {len(jobs)} runs ({sum(j.done for j in jobs)} done) in {root}; "
          f"{len(gpus) * args.jobs_per_gpu} at a time on {'GPUs ' + ','.join(args.gpus) if args.gpus else 'CPU'}",
          flush=True)
    if args.dry_run:
        for job in jobs:
            print(("# done: " if job.done else "") + shlex.join(fit_command(spec, job)))
        return 0
    prepare_data(spec, extra)
    t0 = time.time()
    status = run_sweep(spec, jobs, gpus, args.jobs_per_gpu, args.time_limit, args.rate)
    counts = {s: sum(v == s for v in status.values()) for s in sorted(set(status.values()))}
    print(f"[sweep] finished in {time.time() - t0:.0f} s: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
          flush=True)
    return 1 if counts.get("failed") else 0
