"""A run on disk and in processes: atomic checkpoints, finding and loading them, and launching under torchrun.

Not a script: train.py and distill.py write checkpoints with `save_checkpoint`, derive their random draws
from `step_seed` and log with `RunLog`; sample.py, fid.py, diagnose.py, study.py and distill.py find and
load them; train.py and sample.py run under torchrun through `run_distributed`.

    model, checkpoint = load_model(latest_checkpoint("results/SiT-T-4-dar-static-c4"))   # EMA weights, eval mode

Run layout: results/<run-name>/checkpoints/<step:07d>.pt. A checkpoint is a dict of plain tensors and
containers (loaded with weights_only=True): model, ema, opt, step, args, model_config (the
model.create_model kwargs and "name"), data (the data.load_data description), rng, and optional extras
(repa_projector; for a distill.py generator: generator (gen_steps, teacher), fake, fake_opt).
"""
import datetime
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model import create_model

CHECKPOINT_KEYS = ("model", "ema", "opt", "step", "args", "model_config", "data", "rng")
CHECKPOINT_NAME = re.compile(r"^(\d{7})\.pt$")

#################################################################################
#                              Writing and finding                              #
#################################################################################

def save_checkpoint(checkpoint, checkpoint_dir, keep):
    """Write checkpoint_dir/<step:07d>.pt atomically (temp file, fsync, rename); keep the newest `keep`
    (0 keeps all). A kill at any moment leaves every earlier checkpoint intact."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / f"{checkpoint['step']:07d}.pt"
    temporary = checkpoint_dir / f".{path.name}.tmp"
    with open(temporary, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    for stale in checkpoint_dir.glob(".*.tmp"):  # left by a process killed while writing
        stale.unlink()
    if keep:
        for old in sorted(p for p in checkpoint_dir.iterdir() if CHECKPOINT_NAME.match(p.name))[:-keep]:
            old.unlink()
    return path


def latest_checkpoint(run_dir):
    """The path of the highest-step checkpoint in run_dir/checkpoints, or None."""
    checkpoint_dir = Path(run_dir) / "checkpoints"
    if not checkpoint_dir.is_dir():
        return None
    found = sorted(p for p in checkpoint_dir.iterdir() if CHECKPOINT_NAME.match(p.name))
    return str(found[-1]) if found else None


def newest_checkpoint(results_dir):
    """The most recently written of the runs' latest checkpoints under results_dir/*/checkpoints, or None."""
    root = Path(results_dir)
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    found = [c for c in (latest_checkpoint(run) for run in runs) if c is not None]
    return max(found, key=lambda c: os.path.getmtime(c)) if found else None


def resolve_checkpoint(ckpt, results_dir, flag="--ckpt"):
    """--ckpt (a file, a run directory, or None for the newest under --results-dir) -> a checkpoint path;
    errors name `flag`."""
    if ckpt is None:
        found = newest_checkpoint(results_dir)
        if found is None:
            raise ValueError(f"no checkpoint under {results_dir}/*/checkpoints: train one with "
                             f"`python train.py --router dar --chunk 4`, or pass --ckpt / --results-dir")
        return found
    if Path(ckpt).is_dir():
        found = latest_checkpoint(ckpt)
        if found is None:
            raise ValueError(f"{flag} {ckpt}: a directory without checkpoints/<step>.pt files")
        return found
    if not Path(ckpt).is_file():
        raise ValueError(f"{flag} {ckpt}: no such file or run directory")
    return ckpt


def read_log(run_dir):
    """The records of run_dir/log.jsonl (train.py writes one per log or eval line); [] if there is none."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def validation_curve(run_dir, key="val_loss_ema"):
    """[(step, validation loss)] of a run, from its log."""
    return [(record["step"], record[key]) for record in read_log(run_dir) if key in record]


#################################################################################
#                        A run's random draws and its log                        #
#################################################################################

def step_seed(seed, step, stream):
    """A well-mixed 64-bit seed for one step's draws; stream separates the noise (0) from per-rank draws."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(2, np.uint64)[0] >> 1)


class RunLog:
    """results/<run>/log.jsonl: one JSON record per log or eval line, written by rank 0 only."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record, line):
        if not self.enabled:
            return
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def keep_until(self, step):
        """Drop the records after `step` (written by a run that went on past its last checkpoint)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, self.path)


#################################################################################
#                                    Loading                                    #
#################################################################################

def load_torch_file(path, device, what, hint=""):
    """torch.load(path) (tensors and plain containers only); a missing, truncated or corrupt file is a clear
    error that calls the file `what` (and ends with `hint`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch.load fails with RuntimeError, EOFError, UnpicklingError, zip errors...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{what} {path} is truncated or corrupt ({type(err).__name__}: {first_line}){hint}") from None


def load_checkpoint(path, device="cpu"):
    """torch.load a train.py checkpoint; a missing, truncated or corrupt file is a clear error."""
    checkpoint = load_torch_file(path, device, "checkpoint", "; use an earlier checkpoint from its folder")
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint (missing {', '.join(missing)})")
    return checkpoint


def load_model(path, ema=True, device="cpu"):
    """(the SiT of a checkpoint with its EMA (or raw) weights, in eval mode, the checkpoint dict)."""
    checkpoint = load_checkpoint(path, device)
    config = dict(checkpoint["model_config"])
    model = create_model(config.pop("name"), **config)
    model.load_state_dict(checkpoint["ema" if ema else "model"])
    return model.to(device).eval(), checkpoint


#################################################################################
#                                   Launching                                   #
#################################################################################

def run_distributed(work, args, device):
    """work(args, rank, world size, device): in this process, or under torchrun in a process group (NCCL on
    CUDA, gloo on CPU; each process on the GPU of its LOCAL_RANK) that is destroyed when work ends. The
    timeout is long because rank 0 alone first reads (or downloads) the data while the others wait."""
    device = torch.device(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    try:
        if dist.is_initialized():
            return work(args, dist.get_rank(), dist.get_world_size(), device)
        return work(args, 0, 1, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
