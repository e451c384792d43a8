"""A run on disk and in processes: atomic checkpoints, finding and loading them, and launching under torchrun.

Not a script: train.py and distill.py write checkpoints with `save_checkpoint`, derive their random draws
from `step_seed` and log with `RunLog`; sample.py, fid.py, diagnose.py, study.py and distill.py find and
load them; train.py and sample.py run under torchrun through `run_distributed`; sample.py keeps the memory
that tensors free for reuse on CPU (`keep_freed_memory`).

    model, checkpoint = load_model(latest_checkpoint("results/SiT-T-4-dar-static-c4"))   # EMA weights, eval mode

Run layout: results/<run-name>/log.jsonl and results/<run-name>/checkpoints/<step:07d>.pt. A checkpoint is
a dict of plain tensors and containers (loaded with weights_only=True): model, ema, opt, step, args,
model_config (the model.create_model kwargs and "name"), data (the data.load_data description), rng, and
optional extras (repa_projector; for a distill.py generator: generator (gen_steps, teacher), fake,
fake_opt; loss, the loss of its weights checked before it was saved, and
recent_losses, the history of train.py's divergence guard). Files are written through a temp file
.<name>.<pid>.tmp beside them (write_atomically); remove_partial_files deletes those a killed writer left.

The command lines of the scripts check the range of every number they take with `in_range`.
"""
import argparse
import ctypes
import datetime
import json
import math
import os
import pickle
import platform
import re
import shutil
import signal
import socket
import sys
import time
import zipfile
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

def first_line(err):
    """The first line of an exception's message, with its type: torch's messages run over many lines."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def write_atomically(path, write, what, hint=""):
    """Fill `path` through the temp file .<name>.<pid>.tmp beside it (write(file), flush, fsync, rename; the pid
    keeps processes that write the same file apart): a kill leaves the old file (or none) and at worst the
    temp file. A failed write (a full disk) removes the temp
    file and is an OSError naming `what`, the path and the cause, followed by `hint`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError ("unexpected pos")
        temporary.unlink(missing_ok=True)
        raise OSError(f"could not write {what} {path} ({first_line(err)}){hint}") from None
    return path


def write_json_atomically(path, value, what, indent=None):
    """`value` as JSON into `path`, through write_atomically."""
    return write_atomically(path, lambda f: f.write(json.dumps(value, indent=indent).encode()), what)


def remove_partial_files(*folders):
    """Delete the temp files (.<name>.tmp) that a writer killed mid-write left in `folders`; their paths."""
    found = [p for folder in map(Path, folders) if folder.is_dir() for p in sorted(folder.glob(".*.tmp"))]
    for path in found:
        path.unlink(missing_ok=True)
    return found


def tensor_bytes(value):
    """Bytes of the tensors in nested dicts, lists and tuples: about the size of their torch.save file."""
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def save_checkpoint(checkpoint, checkpoint_dir, keep):
    """Write checkpoint_dir/<step:07d>.pt atomically (write_atomically); keep the newest `keep` (0 keeps all).
    A kill at any moment leaves every earlier checkpoint intact; a failed write (a full disk) also does, and
    says how much space a checkpoint needs."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0 (0 keeps all), got {keep}")
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_files(checkpoint_dir)  # one writer: any temp file here is left by a killed process
    path = checkpoint_dir / f"{checkpoint['step']:07d}.pt"
    needed, free = tensor_bytes(checkpoint) / 2 ** 20, shutil.disk_usage(checkpoint_dir).free / 2 ** 20
    write_atomically(path, lambda f: torch.save(checkpoint, f), "checkpoint",
                     f"; a checkpoint needs about {needed:.0f} MB, {free:.0f} MB are free there. The earlier "
                     f"checkpoints are kept: free some space, then resume with --resume auto")
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


def latest_checkpoints(results_dir):
    """The latest checkpoint of every run under results_dir (results_dir/<run>/checkpoints), in run order."""
    root = Path(results_dir)
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [c for c in (latest_checkpoint(run) for run in runs) if c is not None]


def newest_checkpoint(results_dir):
    """The most recently written of the runs' latest checkpoints under results_dir, or None."""
    found = latest_checkpoints(results_dir)
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
    """The records of run_dir/log.jsonl (train.py writes one per log or eval line); [] if there is none. A
    last line cut short (a crash or a full disk mid-write) is left out; any other bad line is an error."""
    path = Path(run_dir) / "log.jsonl"
    lines = path.read_text().split("\n") if path.exists() else []
    records = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):  # a complete line (a newline follows it) that is not JSON
                raise ValueError(f"{path} line {number} is not a JSON record: repair or delete that line") from None
    return records


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

    def __init__(self, run_dir, enabled=True):
        self.run_dir, self.path, self.enabled = Path(run_dir), Path(run_dir) / "log.jsonl", enabled

    def write(self, record, line):
        if not self.enabled:
            return
        print(line, flush=True)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: the error alone names no file
            raise OSError(f"could not append to {self.path} ({err.strerror or err})") from None

    def keep_until(self, step):
        """Drop the records after `step` (written by a run that went on past its last checkpoint) and a last
        line cut short by a crash; the number of records dropped."""
        records = read_log(self.run_dir)
        kept = [record for record in records if record["step"] <= step]
        if self.path.exists():
            write_atomically(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()),
                             "the log")
        return len(records) - len(kept)



#################################################################################
#                                    Loading                                    #
#################################################################################

def holds_pickle(path):
    """Whether `path` is a torch.save zip or starts as a pickle (PROTO opcode, protocol 2-5): a file whose
    loading failed in the unpickler despite that holds more than plain tensors."""
    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def load_torch_file(path, device, what, hint="", mmap=False):
    """torch.load(path) of tensors and plain containers only (weights_only=True; mmap for a zip file): a
    missing, truncated or corrupt file, or one holding pickled objects (which could run code), is a
    clear error that calls the file `what` (and ends with `hint`)."""
    path = Path(path)
    if path.is_dir():  # e.g. train.py --resume given a run directory, which sample.py's --ckpt accepts
        raise ValueError(f"{what} {path} is a directory; expected a checkpoint file, e.g. "
                         f"{path / 'checkpoints' / '<step>.pt'}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # torch.load fails with RuntimeError, EOFError, UnpicklingError, zip errors...
        if isinstance(err, pickle.UnpicklingError) and holds_pickle(path):
            found = re.search(r"GLOBAL (\S+)", str(err))
            raise ValueError(f"{what} {path} is not a plain-tensor checkpoint: it holds pickled objects"
                             f"{f' ({found.group(1)})' if found else ''}, which can run code when loaded, and "
                             f"was refused for safety (torch.load weights_only=True). Load only files of "
                             f"tensors you trust") from None
        raise ValueError(f"{what} {path} is truncated or corrupt ({first_line(err)}){hint}") from None


def load_checkpoint(path, device="cpu", what="checkpoint"):
    """torch.load a train.py checkpoint; a missing, truncated or corrupt file is a clear error that calls it `what`
    (the flag that named it, e.g. "--resume")."""
    checkpoint = load_torch_file(path, device, what, "; use an earlier checkpoint from its folder")
    missing = [k for k in CHECKPOINT_KEYS if k not in checkpoint] if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if missing:
        raise ValueError(f"{what} {path} is not a train.py checkpoint (missing {', '.join(missing)})")
    return checkpoint


def on_this_machine(model_config, kernel="auto"):
    """A checkpoint's model_config with the kernel that computes DAR here (router.KERNELS; auto: the one this
    machine picks): how DAR is computed is the loading machine's choice, not the run's (a run trained with kernel
    cpu samples on a GPU, one trained with triton on a CPU); the weights are the same whichever kernel made them."""
    return dict(model_config, kernel=kernel)


def load_model(path, ema=True, device="cpu", kernel="auto", what="checkpoint"):
    """(the SiT of a checkpoint with its EMA (or raw) weights, in eval mode, the checkpoint dict); a DAR model
    computes Eq. 5 with `kernel` (on_this_machine); errors call the file `what`."""
    checkpoint = load_checkpoint(path, device, what)
    config = on_this_machine(checkpoint["model_config"], kernel)
    model = create_model(config.pop("name"), **config)
    model.load_state_dict(checkpoint["ema" if ema else "model"])
    return model.to(device).eval(), checkpoint


#################################################################################
#                                   Launching                                   #
#################################################################################

class Terminated(BaseException):
    """SIGTERM, which torchrun sends to every process when one of them fails (a BaseException, as
    KeyboardInterrupt is, so that no `except Exception` swallows it)."""


def process_gone(pid):
    """Whether process `pid` of this machine has exited (or is a zombie that torchrun has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:  # no /proc (macOS): the signal reached a live process
        return False


def lost_peer(err, peers, rank, rerun, wait=2.0):
    """(the rank that reports, one line) when `err` in this process comes from a peer that is gone: its
    process on this machine has exited (waiting up to `wait` s for one that is still shutting down), or a
    collective lost its connection, or torchrun's SIGTERM came; None for any other error."""
    host, deadline = socket.gethostname(), time.time() + wait
    while True:
        gone = [r for r, (peer_host, pid) in enumerate(peers) if r != rank and peer_host == host and process_gone(pid)]
        if gone or time.time() > deadline or isinstance(err, Terminated):
            break
        time.sleep(0.1)
    if gone:
        what = ", ".join(f"rank {r} (pid {peers[r][1]})" for r in gone) + (" has" if len(gone) == 1 else " have")
        what += " died, so the other processes stopped"
    elif isinstance(err, Terminated):
        what = "stopped by SIGTERM (torchrun sends it to every process when one fails: see its report)"
    elif re.search(r"(reset|closed) by peer", str(err)):
        what = "a process on another machine lost its connection (see torchrun's report)"
    else:
        return None
    return min(r for r in range(len(peers)) if r not in gone), f"error: {what}; {rerun}"


def run_distributed(work, args, device, rerun="run the same command again"):
    """work(args, rank, world size, device): in this process, or under torchrun in a process group (NCCL on
    CUDA, gloo on CPU; each process on the GPU of its LOCAL_RANK) that is destroyed when work ends. The
    timeout is long because rank 0 alone first reads (or downloads) the data while the others wait.

    When a process of the group dies (killed, out of memory, a crash), the others stop at their next
    collective or at torchrun's SIGTERM, and the lowest surviving rank says in one line which rank died,
    then `rerun` (what to do next), instead of a traceback of the broken connection."""
    device = torch.device(device)
    if "RANK" not in os.environ:
        return work(args, 0, 1, device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=2))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    peers = [None] * world_size
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    owner = os.getpid()

    def raise_terminated(signum, frame):  # in this process; a forked DataLoader worker just ends, as by default
        if os.getpid() == owner:
            raise Terminated()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return work(args, rank, world_size, device)
    except (RuntimeError, Terminated) as err:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun's SIGTERM must not cut the report short
        report = lost_peer(err, peers, rank, rerun)
        if report is None:
            raise
        if report[0] == rank:
            print(report[1], file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()


def keep_freed_memory():
    """Where the C library is glibc (Linux), keep the memory that freed tensors leave for the next ones, instead of
    handing it back to the OS; returns whether it could. By default glibc serves blocks over a threshold that it
    adapts as it goes with fresh mappings, and returns its heap's free top once that passes twice the threshold:
    a model's evaluation on CPU then often takes its activations' pages from the OS again, each first touch a page
    fault (a median of 18,000 per DAR chunk-4 evaluation of SiT-D/4 at batch 32, 23,000 dense, 0 for residual's).
    With blocks under 32 MiB served from the heap and up to 1 GiB of freed memory held for reuse, none faulted,
    and DAR's evaluations there took 12-13% less time, residual's the same (docs/kernel-log.md). sample.py and
    bench.py --op sample call it on CPU; a training step measured no different, so train.py does not."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 32 << 20))


#################################################################################
#                                 Command lines                                 #
#################################################################################

def in_range(kind, low=None, high=None, high_excluded=False):
    """An argparse type: a finite `kind` (int or float) in [low, high] ([low, high) with high_excluded; None:
    unbounded). Anything else is argparse's one-line error naming the flag and the allowed range."""
    noun = "an integer" if kind is int else "a number"
    if high is None:
        allowed = f"{noun} >= {low}" if low is not None else noun
    else:
        allowed = f"{noun} in [{'-inf' if low is None else low}, {high}{')' if high_excluded else ']'}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if (value is None or not math.isfinite(value) or (low is not None and value < low)
                or (high is not None and (value >= high if high_excluded else value > high))):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def default_device():
    """CUDA where this machine has it (a GPU per process under torchrun), else the CPU: where train.py trains and
    every other script's default --device."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_arg(text):
    """An argparse type for --device: a device torch knows (cpu, cuda, cuda:1) that this machine has; anything
    else is argparse's one-line error, not a torch.load failure that reads like a corrupt checkpoint."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available on this machine (use cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text
