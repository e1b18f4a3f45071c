"""Run a sweep of ``diffvision fit`` runs (fractions x arms x seeds), side by side on GPUs.

    python train/sweep.py configs/sweeps/cifar10_fractions.yaml
    python train/sweep.py configs/sweeps/cifar10_fractions.yaml --arms diff standard --seeds 0 --dry-run
    python train/sweep.py configs/sweeps/cifar10_dit.yaml --gpus 0 1 --jobs-per-gpu 3
    python train/sweep.py SPEC --root runs/sweeps/NAME -- --data.root /data/cifar10   # extra CLI args

A spec (YAML) names a ``diffvision fit`` config and what to vary; see ``configs/sweeps/``. Its ``arms``
are the named models compared: a timm model name (classification) or an ``attn_kind`` (generation), each
with optional per-arm keywords (an arm is an attention kind plus settings, e.g. DIFF with λinit 0.8). Every
run goes through the same CLI and configs users have, into ``<root>/<arm>_f<fraction>_s<seed>/``:

* a finished run has ``result.json`` (final metrics, parameters, wall time, device, command): it is
  skipped; an unfinished one resumes from its ``last.ckpt`` (``--ckpt_path last``); its wall time
  counts every attempt (``attempts.json``: start and last-seen time of each, refreshed every
  ``HEARTBEAT_S`` while it runs, so an attempt killed with the whole sweep is counted too);
* ``--time-limit`` stops the sweep cleanly before an outer limit (a job scheduler's, a lent
  machine's): running jobs are killed and resume next time; none is started that cannot finish by
  its estimated cost;
* jobs run longest-first on ``--jobs-per-gpu`` slots per GPU (``CUDA_VISIBLE_DEVICES``); small
  models leave a GPU mostly idle, so several share one.

Generation specs (``task: generation``) also sample with the diffusers pipeline and compute FID
(``train/fid_eval.py``) once training ends; that result goes into the same ``result.json``.
``python train/report.py <root>`` turns finished runs into tables and plots.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
TASKS = ("classification", "generation")
HEARTBEAT_S = 10.0


@dataclass
class Job:
    arm: str
    model: str                 # timm model name (classification) or attn_kind (generation)
    model_kwargs: dict         # per-arm model keywords, merged over the config's (e.g. head counts)
    fraction: float
    seed: int
    epochs: int
    val_every: int
    root: Path
    cost: float                # images seen in training: fraction x epochs (relative)
    extra: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.arm}_f{fraction_tag(self.fraction)}_s{self.seed}"

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def done(self) -> bool:
        return (self.dir / "result.json").is_file()


def fraction_tag(fraction: float) -> str:
    """0.01 -> '001', 0.1 -> '010', 0.25 -> '025', 1.0 -> '100' (percent, 3 digits; more if needed)."""
    pct = fraction * 100
    return f"{pct:03.0f}" if abs(pct - round(pct)) < 1e-9 else f"{pct:07.3f}".replace(".", "p")


def load_spec(path: Path) -> dict[str, Any]:
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep spec is a YAML mapping, got {type(spec).__name__}")
    if "kinds" in spec and "arms" not in spec:  # the key's name before it was told apart from attn_kind
        spec["arms"] = spec.pop("kinds")
    required = {"task", "config", "arms", "epochs", "seeds"}
    missing = required - set(spec)
    if missing:
        raise ValueError(f"{path}: missing keys {sorted(missing)}; a spec needs {sorted(required)}")
    unknown = set(spec) - required - {"validations", "fid"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; accepted: "
                         f"{sorted(required | {'validations', 'fid'})}")
    if spec["task"] not in TASKS:
        raise ValueError(f"{path}: task must be one of {TASKS}, got {spec['task']!r}")
    spec["epochs"] = {float(f): int(e) for f, e in spec["epochs"].items()}
    for fraction, epochs in spec["epochs"].items():
        if not 0 < fraction <= 1 or epochs < 1:
            raise ValueError(f"{path}: epochs maps a fraction in (0, 1] to epochs >= 1, got {fraction}: {epochs}")
    return spec


def arm_entry(task: str, arm: str, entry: Any) -> tuple[str, dict]:
    """A spec's ``arms`` value: a model name (classification) or an ``attn_kind`` (generation), or a mapping
    ``{model: name, model_kwargs: {...}}`` / ``{attn_kind: kind, model_kwargs: {...}}``."""
    key = "model" if task == "classification" else "attn_kind"
    if isinstance(entry, str):
        entry = {key: entry}
    if not (isinstance(entry, dict) and isinstance(entry.get(key), str) and set(entry) <= {key, "model_kwargs"}):
        raise ValueError(f"arms.{arm}: expected a {key} or {{{key}: ..., model_kwargs: {{...}}}}, got {entry!r}")
    if task == "generation":
        from diffvision.attention import get_attn_kind

        get_attn_kind(entry[key])  # an unknown kind fails here, not in the middle of a sweep
    return entry[key], dict(entry.get("model_kwargs") or {})


def _config(spec: dict) -> dict:
    path = Path(spec["config"])
    return yaml.safe_load((path if path.is_absolute() else REPO / path).read_text())


def validation_interval(epochs: int, validations: int) -> int:
    """The largest interval <= epochs / validations that divides ``epochs``: the last epoch is validated."""
    target = max(1, epochs // max(1, validations))
    return max(d for d in range(1, target + 1) if epochs % d == 0)


def build_jobs(spec: dict, root: Path, arms: Optional[list[str]], fractions: Optional[list[float]],
               seeds: Optional[list[int]], extra: list[str]) -> list[Job]:
    for name, chosen, known in (("arm", arms, list(spec["arms"])), ("fraction", fractions, list(spec["epochs"])),
                                ("seed", seeds, list(spec["seeds"]))):
        bad = [c for c in (chosen or []) if c not in known]
        if bad:
            raise SystemExit(f"unknown {name} {bad}; the spec has {known}")
    jobs = []
    forced_epochs = _extra_value(extra, "--trainer.max_epochs")  # an override after -- wins over the spec
    for fraction, epochs in spec["epochs"].items():
        epochs = int(forced_epochs) if forced_epochs else epochs
        if fractions and fraction not in fractions:
            continue
        for arm, entry in spec["arms"].items():
            if arms and arm not in arms:
                continue
            model, model_kwargs = arm_entry(spec["task"], arm, entry)
            for seed in spec["seeds"]:
                if seeds and seed not in seeds:
                    continue
                jobs.append(Job(arm, model, model_kwargs, fraction, int(seed), epochs,
                                validation_interval(epochs, spec.get("validations", 10)), root,
                                cost=fraction * epochs, extra=list(extra)))
    return sorted(jobs, key=lambda j: -j.cost)  # longest first: the short ones fill the gaps at the end


def fit_command(spec: dict, job: Job) -> list[str]:
    cmd = [sys.executable, "-m", "diffvision.cli", "fit", "--config", str(spec["config"]),
           "--experiment", job.name, "--trainer.default_root_dir", str(job.root),
           "--seed_everything", str(job.seed), "--data.data_fraction", str(job.fraction),
           "--data.fraction_seed", str(job.seed), "--trainer.max_epochs", str(job.epochs),
           "--trainer.check_val_every_n_epoch", str(job.val_every)]
    if spec["task"] == "classification":
        cmd += ["--model.init_args.model_name", job.model]
    else:
        cmd += ["--model.init_args.attn_kind", job.model]
    if job.model_kwargs:
        key = "model_kwargs" if spec["task"] == "classification" else "transformer_kwargs"
        merged = {**(_config(spec)["model"]["init_args"].get(key) or {}), **job.model_kwargs}
        cmd += [f"--model.init_args.{key}", json.dumps(merged)]
    return cmd + job.extra + ["--ckpt_path", "last"]


def fid_command(spec: dict, job: Job, log_dir: Path) -> list[str]:
    fid = dict(spec.get("fid") or {})
    cmd = [sys.executable, str(REPO / "train" / "fid_eval.py"), str(log_dir / "checkpoints" / "last.ckpt"),
           "--out", str(job.dir / "fid.json"), "--seed", str(job.seed)]
    for key, value in fid.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    data_root = _extra_value(job.extra, "--data.root")
    if data_root and "--data-root" not in cmd:
        cmd += ["--data-root", data_root]
    return cmd


def _extra_value(extra: list[str], key: str) -> Optional[str]:
    for i, arg in enumerate(extra):
        if arg == key and i + 1 < len(extra):
            return extra[i + 1]
        if arg.startswith(key + "="):
            return arg.split("=", 1)[1]
    return None


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

def latest_version(job: Job) -> Optional[Path]:
    versions = sorted(job.dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return versions[-1] if versions else None


def count_parameters(spec: dict, log_dir: Path) -> Optional[int]:
    """Parameters of the trained network, from its ``last.ckpt`` (EMA copies left out)."""
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        return None
    from diffvision.models import load_checkpoint_file

    state = load_checkpoint_file(ckpt, mmap=True)["state_dict"]
    prefix = "model." if spec["task"] == "classification" else "transformer."
    return sum(v.numel() for k, v in state.items() if k.startswith(prefix))


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    return f"CPU (torch {torch.__version__})"


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


def write_result(spec: dict, job: Job, command: list[str], attempts: list[dict]) -> dict:
    from diffvision.lightning.loggers import read_epoch_metrics

    log_dir = latest_version(job)
    metrics = read_epoch_metrics(log_dir)
    final = metrics.get(job.epochs - 1, {})
    result: dict[str, Any] = {
        "task": spec["task"], "kind": job.arm, "fraction": job.fraction, "seed": job.seed,
        "epochs": job.epochs, "steps": int(final.get("step", 0)) + 1 if final else None,
        "params": count_parameters(spec, log_dir), "wall_s": round(attempts_wall_s(attempts), 1),
        "attempts": len(attempts), "device": device_name(),
        "command": shlex.join(command), "log_dir": str(log_dir),
    }
    config = _config(spec)
    if spec["task"] == "classification":
        vals = {e: m["val/acc1"] for e, m in metrics.items() if "val/acc1" in m}
        if job.epochs - 1 not in vals:
            raise RuntimeError(f"{job.name}: no val/acc1 at the final epoch {job.epochs - 1} in {log_dir}/metrics.csv")
        result.update(model_name=job.model,
                      model_kwargs={**(config["model"]["init_args"].get("model_kwargs") or {}), **job.model_kwargs},
                      final={k: final[k] for k in ("val/acc1", "val/loss", "val/acc5") if k in final},
                      best={"val/acc1": max(vals.values()), "epoch": max(vals, key=vals.get)})
    else:
        fid = json.loads((job.dir / "fid.json").read_text())
        curve = [[int(m["step"]) + 1, m["val/fid"]] for e, m in sorted(metrics.items()) if "val/fid" in m]
        result.update(preset=config["model"]["init_args"]["preset"], attn_kind=job.model,
                      final={k: final[k] for k in ("val/loss", "val/loss_ema") if k in final},
                      fid_vs_step=curve, **fid)
    (job.dir / "result.json").write_text(json.dumps(result, indent=1))
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


def launch(command: list[str], job: Job, gpu: Optional[str], stage: str) -> tuple[subprocess.Popen, Any]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
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

    data = dict(_config(spec).get("data") or {})
    root = _extra_value(extra, "--data.root")
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
                    command = fid_command(spec, job, latest_version(job))
                    proc, log = launch(command, job, gpus[i // jobs_per_gpu], "fid")
                    slots[i] = Running(job, proc, "fid", command, running.fit_command, log, running.beat)
                    continue
                try:
                    result = write_result(spec, job, running.fit_command, record_attempt(job, time.time()))
                except Exception as err:  # noqa: BLE001  (one broken run must not stop the others)
                    status[job.name] = "failed"
                    print(f"[sweep] FAILED {job.name}: {type(err).__name__}: {err}", flush=True)
                    slots[i] = None
                    continue
                status[job.name] = "done"
                headline = (f"acc1 {100 * result['final']['val/acc1']:.2f}%" if spec["task"] == "classification"
                            else f"FID {result['fid']:.2f}")
                print(f"[sweep] done {job.name}: {headline} in {result['wall_s']:.0f} s", flush=True)
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
    except (KeyboardInterrupt, TimeoutError) as err:
        why = "time limit" if isinstance(err, TimeoutError) else "interrupted"
        for running in filter(None, slots):
            os.killpg(running.proc.pid, signal.SIGKILL)
            running.proc.wait()
            running.log.close()
            record_attempt(running.job, time.time())
            status[running.job.name] = "stopped"
            print(f"[sweep] stopped {running.job.name} ({why}); it resumes from last.ckpt next time", flush=True)
    for job in pending:
        status.setdefault(job.name, "not started")
    return status


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
