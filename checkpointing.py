"""Training checkpoints that survive preemption, crashes and full disks: save, find and load them atomically.

A checkpoint is a folder output_dir/checkpoint-N holding what step N+1 needs to run exactly as it would have
without the interruption:
    adapter_model.safetensors  the LoRA weights in PEFT's format, with adapter_config.json (PEFT loads the folder)
    optimizer.pt               AdamW's moments and step counts, full tensors keyed by each LoRA weight's path
    rng_state.pt               every rank's torch, CUDA and Python RNG states (LoRA dropout draws from them)
    trainer_state.json         step, data position, LR-scheduler state, world size, config, base-model fingerprint
    COMPLETE                   written last: size and sha256 of every other file

Atomic: rank 0 writes into checkpoint-N.tmp-*, fsyncs every file, writes COMPLETE, renames the folder to
checkpoint-N and fsyncs output_dir. A crash or a full disk midway leaves a .tmp folder, which is never taken (and is
removed at the next start), and the previous checkpoint untouched. On resume the sha256s are checked first: a
damaged checkpoint gives way to the one before it.

The optimizer state is gathered, not sharded. LoRA's is small: AdamW keeps two fp32 tensors per LoRA weight, ~1.3 GB
for Llama-3-8B with r=64 on every linear, against 16 GB of base weights, so one all-gather per LoRA unit (into rank
0's CPU memory) is cheap. In return the file is one torch.save keyed by each LoRA weight's path in the model (as in
the adapter file; fsdp_wrap.natural_lora_names): independent of FSDP's flat parameters and units and of the number
of ranks, readable without a process group, and written by one process, so a single rename makes it atomic. Sharded
per-rank files (torch.distributed.checkpoint) write in parallel and never hold the whole state on one rank, which a
full fine-tune needs and LoRA does not; they also need every rank to write to a shared filesystem, and a commit step
across ranks. Only the optimizer state is gathered whole: the model's full state dict would gather the 4-bit base
too (and with offload_to_cpu it crashes on CPU), so the LoRA weights are gathered unit by unit
(fsdp_wrap.gather_lora_state).

Output_dir must be on a filesystem that every rank sees when resuming: rank 0 writes, every rank reads.

Preemption (StopOnSignal, at the end): SIGTERM or SIGINT lets the current step finish, then every rank saves and
exits cleanly; a second signal exits at once.
"""
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from tqdm import tqdm

import fsdp_wrap
import lora
import model_loading

COMPLETE = "COMPLETE"
NAME = re.compile(r"checkpoint-(\d+)")
# Settings a resumed run must share with the checkpoint's run: what is trained (base model, LoRA shape), what the
# saved data position and optimizer state mean (batches per step, data order, optimizer), checked by name.
MUST_MATCH = ("quant", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "batch_size", "grad_accum", "seed",
              "lr", "lr_schedule", "warmup_steps", "weight_decay")


class ResumeError(ValueError):
    """A checkpoint that cannot be continued, or an output_dir that would mix two runs; the message says which."""


@dataclass
class TrainerState:
    step: int  # optimizer steps done
    epoch: int  # data position: the next step takes the micro-batches of this epoch...
    step_in_epoch: int  # ...that follow this many steps' worth of them
    world_size: int
    steps_per_epoch: int
    base_model: str  # --model as given: a path or a Hub id
    base_fingerprint: str  # fingerprint(model folder): the base weights, wherever they now live
    config: dict  # the whole Config of the run that saved it
    scheduler: dict = field(default_factory=dict)


def fingerprint(model_dir: Path) -> str:
    """A hash of config.json, the shard index, and each shard's header and first 64 KiB of weights.

    Reads ~100 KB per shard, not the weights: enough to tell two models (or two fine-tunes of one) apart, and the
    same for one model in any folder. Volatile config keys (the transformers version that saved it) are left out.
    """
    h = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        h.update(json.dumps(json.loads(index.read_text())["weight_map"], sort_keys=True).encode())
    for shard in sorted({e.file for e in model_loading.index_checkpoint(model_dir).values()}):
        with shard.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")  # safetensors: u64 header size, JSON header, data
            h.update(shard.name.encode() + f.read(header_len + 2**16))
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------------
# Finding checkpoints


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Every checkpoint-N folder in out_dir with its COMPLETE marker, oldest first."""
    found = [p for p in Path(out_dir).glob("checkpoint-*") if NAME.fullmatch(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    match = NAME.fullmatch(path.name)
    return int(match.group(1)) if match else -1


def damage(path: Path) -> str | None:
    """Why the checkpoint cannot be used, or None when every file has the size and sha256 recorded at save."""
    if not (path / COMPLETE).is_file():
        return f"it has no {COMPLETE} marker (its save was interrupted)"
    try:
        files = json.loads((path / COMPLETE).read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"its {COMPLETE} marker is unreadable ({e})"
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["size"]:
            return f"{name} has {file.stat().st_size} bytes, {want['size']} were written"
        if _sha256(file) != want["sha256"]:
            return f"{name} is corrupt (its sha256 differs from the one recorded at save)"
    return None


def select_resume(resume: str, out_dir: Path) -> Path | None:
    """The checkpoint to continue from: with "auto" the newest in out_dir, else the folder given. A damaged one
    gives way to the one before it, saying so. Rank 0 reads and decides, so every rank takes the same one."""
    choice: list = [None]
    if dist.get_rank() == 0 and resume:
        try:
            choice[0] = _select(resume, Path(out_dir))
        except ResumeError as e:
            choice[0] = e
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], Exception):
        raise choice[0]
    return choice[0]


def _select(resume: str, out_dir: Path) -> Path | None:
    if resume == "auto":
        candidates = list_checkpoints(out_dir)[::-1]
        if not candidates:
            tqdm.write(f"--resume auto: no checkpoint in {out_dir}, starting from step 0")
            return None
    else:
        path = Path(resume).expanduser()
        if not (path / "trainer_state.json").is_file() and not (path / COMPLETE).is_file():
            raise ResumeError(f"--resume {resume}: not a checkpoint folder (expected output_dir/checkpoint-N)")
        older = [c for c in list_checkpoints(path.parent)[::-1] if _step_of(c) < _step_of(path)]
        candidates = [path] + older
    for i, path in enumerate(candidates):
        reason = damage(path)
        if reason is None:
            if i > 0:
                tqdm.write(f"resuming from {path}, the newest usable checkpoint before {candidates[0].name}")
            return path
        tqdm.write(f"WARNING: cannot resume from {path}: {reason}; falling back to the checkpoint before it")
    raise ResumeError(f"no usable checkpoint among {[c.name for c in candidates]}; start over with --overwrite")


def read_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def check_resumable(state: TrainerState, path: Path, run: dict) -> None:
    """Refuse to continue a checkpoint with another base model, LoRA shape, data order or world size.

    `run` holds this run's TrainerState fields (all but the step, position and scheduler).
    """
    config = run["config"]
    problems = [f"--{k} is {config[k]!r}, the checkpoint's run used {state.config.get(k)!r}"
                for k in MUST_MATCH if state.config.get(k) != config[k]]
    if state.base_fingerprint != run["base_fingerprint"]:
        problems.insert(0, f"--model {config['model']} is not the base model the checkpoint was trained on "
                           f"({state.base_model}; fingerprints {run['base_fingerprint']} and {state.base_fingerprint})")
    if state.world_size != run["world_size"]:  # the sampler's split and the per-rank RNG states depend on it
        problems.append(f"{run['world_size']} ranks now, {state.world_size} saved it; resume on {state.world_size}")
    elif state.steps_per_epoch != run["steps_per_epoch"]:  # the saved data position would point elsewhere
        problems.append(f"an epoch is {run['steps_per_epoch']} steps now, {state.steps_per_epoch} then: "
                        "the data changed")
    if problems:
        raise ResumeError(f"cannot resume from {path}: " + "; ".join(problems))


def prepare_output_dir(out_dir: Path, resume: str, overwrite: bool) -> None:
    """Make sure output_dir is writable and holds no other run's checkpoints; clear leftovers of interrupted saves."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise PermissionError(f"--output_dir {out_dir} is not writable: {e.strerror or e}") from e
    existing = list_checkpoints(out_dir)
    if existing and not resume and not overwrite:
        raise ResumeError(f"{out_dir} holds another run's checkpoints (newest {existing[-1].name}): pass --resume auto "
                          "to continue that run, --overwrite to delete them, or another --output_dir")
    if dist.get_rank() == 0:
        leftovers = [p for p in out_dir.glob("checkpoint-*") if ".tmp-" in p.name or ".old-" in p.name]
        for path in leftovers + (existing if overwrite and not resume else []):
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------------
# Saving and loading


def save_checkpoint(out_dir: Path, state: TrainerState, model, optimizer, scheduler, keep_last: int = 0) -> Path:
    """Write output_dir/checkpoint-<step> atomically; a collective, so every rank calls it. Returns the folder.

    If writing fails (full disk, I/O error) every rank raises, and the earlier checkpoints are as they were.
    """
    rank = dist.get_rank()
    adapter = fsdp_wrap.gather_lora_state(model)  # collectives first, on every rank; then rank 0 writes alone
    with warnings.catch_warnings():  # torch's FSDP1 optimizer gather warns about its own internal helpers
        warnings.simplefilter("ignore", UserWarning)
        # cpu_offload: only rank 0 holds the gathered state, in CPU memory
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(model, optimizer, options=options)
        optim = _renamed(optim, fsdp_wrap.natural_lora_names(model))
    rngs = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(_rng_state(), rngs, dst=0)
    state = dataclasses.replace(state, scheduler=scheduler.state_dict())
    final = Path(out_dir) / f"checkpoint-{state.step}"
    error = [None]
    if rank == 0:
        try:
            _write(final, state, adapter, optim, rngs)
            for old in list_checkpoints(out_dir)[:-keep_last] if keep_last else []:
                shutil.rmtree(old, ignore_errors=True)
        except Exception as e:  # OSError, or torch.save's RuntimeError on a full disk: every rank must hear of it
            error[0] = f"saving {final} failed ({e}); the earlier checkpoints are intact"
    dist.broadcast_object_list(error, src=0)  # every rank stops if rank 0 could not write, none waits forever
    if error[0]:
        raise OSError(error[0])
    return final


def _write(final: Path, state: TrainerState, adapter: dict, optim: dict, rngs: list) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        cfg = state.config
        lora.save_adapter(adapter, tmp, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["model"])
        torch.save(optim, tmp / "optimizer.pt")
        torch.save(rngs, tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n")
        files = {}
        for file in sorted(tmp.iterdir()):
            _fsync(file)  # on disk before the marker that vouches for them
            files[file.name] = {"size": file.stat().st_size, "sha256": _sha256(file)}
        (tmp / COMPLETE).write_text(json.dumps({"step": state.step, "files": files}, indent=2) + "\n")
        _fsync(tmp / COMPLETE)
        _fsync(tmp)
        if final.exists():  # saved before by a run that fell back past it: set it aside, then replace it
            aside = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
            final.rename(aside)
            tmp.rename(final)
            shutil.rmtree(aside)
        else:
            tmp.rename(final)
        _fsync(final.parent)  # the rename itself is durable only once the directory is synced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a successful rename; a failed save leaves nothing


def load_checkpoint(path: Path, model, optimizer, scheduler) -> None:
    """Optimizer, scheduler and this rank's RNG states from `path`; a collective. The LoRA weights are loaded
    earlier, into the unwrapped model (lora.load_adapter), before FSDP shards it."""
    optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        names = {natural: fqn for fqn, natural in fsdp_wrap.natural_lora_names(model).items()}
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, optimizer, _renamed(optim, names), options=options)
    scheduler.load_state_dict(read_state(path).scheduler)
    _set_rng_state(torch.load(path / "rng_state.pt", weights_only=True)[dist.get_rank()])


def _renamed(optim: dict, names: dict[str, str]) -> dict:
    """A full optimizer state dict (keyed by parameter name) with its names mapped through `names`."""
    if not optim:  # ranks other than 0 get nothing when gathering
        return optim
    return {"state": {names.get(k, k): v for k, v in optim["state"].items()},
            "param_groups": [dict(g, params=[names.get(p, p) for p in g["params"]]) for g in optim["param_groups"]]}


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # files and directories alike
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------------
# Preemption


class StopOnSignal:
    """SIGTERM or SIGINT (preemption, Ctrl-C) asks for a clean stop: finish the step, save, exit. A second one kills.

    torchrun forwards the signal it gets to every rank; a scheduler may signal only some. So the ranks agree with an
    all-reduce after every step, and all of them stop on the same step: the save is a collective.
    """

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.signal is not None:  # asked twice: exit at once, as if there were no handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signal.Signals(signum).name  # no printing here: the signal may interrupt a print

    def agreed(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled."""
        flag = torch.tensor(float(self.signal is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
