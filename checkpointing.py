"""Training checkpoints that survive preemption, crashes and full disks: save, find, check and load them.

A checkpoint is a folder output_dir/checkpoint-N holding what step N+1 needs to run exactly as it would have
without the interruption, written by run_folder.write_checkpoint (atomically, with a COMPLETE manifest):
    adapter_model.safetensors  the LoRA weights in PEFT's format, with adapter_config.json (PEFT loads the folder)
    train_config.json          the run's whole config (what merge.py and generate.py read: base, quant, LoRA shape,
                               prompt format)
    tokenizer files            the tokenizer with the chat template that rendered the training rows
    optimizer.pt               AdamW's moments and step counts, full tensors keyed by each LoRA weight's path
    rng_state.pt               every rank's torch, CUDA and Python RNG states (LoRA dropout draws from them)
    trainer_state.json         step, data position, LR-scheduler state, world size, config, base-model and data
                               fingerprints, and what --report_to's backends resume with (W&B's run id)
    COMPLETE                   written last: size and sha256 of every other file
A crash or a full disk midway leaves a .tmp folder, which is never taken (and is removed at the next start), and the
previous checkpoint untouched. On resume the sha256s are checked first: a damaged checkpoint gives way to the one
before it. The final adapter goes into output_dir itself, through the same writer.

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

Preemption (StopOnSignal, at the end): SIGTERM or SIGINT lets the current step finish (an evaluation is abandoned),
then every rank saves and exits cleanly; before training starts it stops the run at once, saving nothing; a second
signal exits at once.
"""
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from tqdm import tqdm

import fsdp_wrap
import moe_lora
import out_folder
import run_folder
from run_folder import COMPLETE, TRAIN_CONFIG

NAME = re.compile(r"checkpoint-(\d+)")
FINAL_FILES = ("adapter_model.safetensors", "adapter_config.json", TRAIN_CONFIG, "metrics.jsonl", "samples.jsonl")


class ResumeError(run_folder.FolderError):
    """A checkpoint that cannot be continued, or an output_dir that would mix two runs; the message says which."""


@dataclass
class TrainerState:
    step: int  # optimizer steps done
    epoch: int  # data position: the next step takes the micro-batches of this epoch...
    step_in_epoch: int  # ...that follow this many steps' worth of them
    world_size: int
    steps_per_epoch: int
    base_model: str  # --model as given: a path or a Hub id
    base_fingerprint: str  # model_loading.fingerprint(model folder): the base weights, wherever they now live
    config: dict  # the whole Config of the run that saved it
    scheduler: dict = field(default_factory=dict)
    data_fingerprint: str = ""  # data.fingerprint of the training rows ("" in checkpoints written before it existed)
    reporting: dict = field(default_factory=dict)  # what --report_to's backends resume with: W&B's run id


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
        if run_folder.sha256(file) != want["sha256"]:
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


def check_resumable(state: TrainerState, path: Path, run: dict, settings: dict[str, dict],
                    model_config=None) -> None:
    """Refuse to continue a checkpoint with another base model, data, LoRA shape, optimizer, schedule or world size.

    `run` holds this run's TrainerState fields (all but the step, position and scheduler). `settings` maps each
    setting to its metadata (settings.Config): it must be as it was, unless its "may_change" says why it need not; a
    "must_match" reason is given in the refusal; "rows" settings are named when the data's fingerprint differs.
    With the base's `model_config`, LoRA targets are compared by the linears they select in it, so a run saved with
    another spelling of the same set resumes: a Llama run saved before "all-linear" was the default named its 7 kinds.
    """
    config, saved = run["config"], state.config
    by_rows = bool(state.data_fingerprint)  # else (an older checkpoint) --dataset is compared by name like the rest
    skip = {k for k, meta in settings.items() if "may_change" in meta} | ({"dataset"} if by_rows else set())
    differ = [k for k in config if k in saved and saved[k] != config[k]]  # keys a checkpoint predates: unknowable
    if "lora_targets" in differ and model_config is not None and (
            moe_lora.targets_on(model_config, saved["lora_targets"]).keys()
            == moe_lora.targets_on(model_config, config["lora_targets"]).keys()):
        differ.remove("lora_targets")
    why = {k: f" ({meta['must_match']})" for k, meta in settings.items() if "must_match" in meta}
    problems = [f"--{k} is {config[k]!r}, the checkpoint's run used {saved[k]!r}{why.get(k, '')}"
                for k in differ if k not in skip]
    if by_rows and state.data_fingerprint != run["data_fingerprint"]:
        named = [f"--{k} {saved[k]!r} -> {config[k]!r}" for k in differ if settings.get(k, {}).get("rows")]
        problems.insert(0, f"the training rows differ from the checkpoint's run's (fingerprints "
                           f"{run['data_fingerprint']} and {state.data_fingerprint}): "
                           + ("; ".join(named) if named else "the same settings, so the files changed"))
    if state.base_fingerprint != run["base_fingerprint"]:
        problems.insert(0, f"--model {config['model']} is not the base model the checkpoint was trained on "
                           f"({state.base_model}; fingerprints {run['base_fingerprint']} and {state.base_fingerprint})")
    if state.world_size != run["world_size"]:  # the sampler's split and the per-rank RNG states depend on it
        problems.append(f"{run['world_size']} ranks now, {state.world_size} saved it; resume on {state.world_size}")
    elif state.steps_per_epoch != run["steps_per_epoch"] and not problems:  # the data position would point elsewhere
        problems.append(f"an epoch is {run['steps_per_epoch']} steps now, {state.steps_per_epoch} then: "
                        "the data changed")
    if problems:
        raise ResumeError(f"cannot resume from {path}: " + "; ".join(problems))


def check_output_dir(out_dir: Path, resume: str, overwrite: bool, dataset: str) -> None:
    """Refuse an output_dir the other flags contradict; on every rank, before the folder is made or read."""
    if resume not in ("", "auto") and Path(resume).expanduser().resolve() == Path(out_dir).resolve():
        newest = list_checkpoints(out_dir)[-1:]
        raise ResumeError(f"--resume {resume} is the run folder itself (--output_dir), not a checkpoint: pass --resume "
                          "auto to continue from its newest checkpoint"
                          + (f", {newest[0]}, or --resume one of its checkpoint-N" if newest else
                             " (it holds none yet, so the run starts from step 0)"))
    if overwrite and resume and not _foreign(resume, out_dir):
        raise ResumeError(f"--resume {resume} continues the run in {out_dir} and --overwrite deletes it: pass one of "
                          "them")
    if (Path(out_dir) / "config.json").is_file():  # a run folder never holds one: adapter_config.json is the adapter's
        raise ResumeError(f"--output_dir {out_dir} holds a model (config.json): a run writes its tokenizer and "
                          "generation files there, replacing the model's own (and --overwrite deletes them): choose "
                          "another --output_dir")
    data_dir = Path(dataset).expanduser()
    if data_dir.is_dir() and Path(out_dir).resolve().is_relative_to(data_dir.resolve()):
        raise ResumeError(f"--output_dir {out_dir} is inside the --dataset folder {data_dir}: choose an --output_dir "
                          "outside it, where the run's own files (metrics.jsonl, samples.jsonl) are not read as data")


def _foreign(resume: str, out_dir: Path) -> bool:
    """Whether --resume names a checkpoint of another run folder than output_dir."""
    return resume not in ("", "auto") and Path(resume).expanduser().resolve().parent != Path(out_dir).resolve()


def prepare_output_dir(out_dir: Path, resume: str, overwrite: bool) -> None:
    """Make sure output_dir holds no other run's work; clear leftovers of interrupted saves. Call it under the lock,
    after check_output_dir.

    A run with checkpoints is continued (--resume) or replaced (--overwrite). A finished run without checkpoints
    (an adapter and metrics.jsonl) cannot be continued, so only --overwrite replaces it. A checkpoint of another
    run folder is resumed into an empty output_dir, or replaces the run in it with --overwrite.
    """
    existing = list_checkpoints(out_dir)
    finished = [f for f in ("adapter_model.safetensors", "metrics.jsonl") if (out_dir / f).is_file()]
    if _foreign(resume, out_dir) and (existing or finished) and not overwrite:
        raise ResumeError(f"--resume {resume} is a checkpoint of another run folder, and --output_dir {out_dir} "
                          f"holds a run of its own ({existing[-1].name if existing else finished[0]}): pass "
                          "--overwrite to replace that run with the one resumed, or an empty --output_dir")
    if existing and not resume and not overwrite:
        raise ResumeError(f"{out_dir} holds another run's checkpoints (newest {existing[-1].name}): pass --resume auto "
                          "to continue that run, --overwrite to delete them, or another --output_dir")
    if "adapter_model.safetensors" in finished and not existing and not overwrite:
        raise ResumeError(f"{out_dir} holds a finished run's adapter and no checkpoint to resume from: pass "
                          "--overwrite to replace it, or another --output_dir")
    if finished and not existing and not resume and not overwrite:
        raise ResumeError(f"{out_dir} holds {finished[0]} of an earlier run: pass --overwrite to replace it, "
                          "--resume auto to continue it, or another --output_dir")
    if dist.get_rank() == 0:
        leftovers = [p for p in out_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
        # TensorBoard reads every event file in its folder, so an earlier run's would mix into the new curves. W&B's
        # folders are runs of their own, told apart by id: left as they are, with what they may not have synced.
        # (check_output_dir refused --overwrite with a resume of this folder's own run)
        # The tokenizer's files too: a chat_template.jinja the new run does not write would be read with its tokenizer
        replaced = existing + [out_dir / f for f in (*FINAL_FILES, "tensorboard")] + [
            f for pattern in out_folder.BESIDE_WEIGHTS for f in out_dir.glob(pattern)] if overwrite else []
        for path in leftovers + replaced:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    dist.barrier()  # nobody looks at the folder before it is clean


# ----------------------------------------------------------------------------------------------------------------------
# Saving and loading


def save_checkpoint(out_dir: Path, state: TrainerState, model, optimizer, scheduler, tokenizer,
                    keep_last: int = 0) -> Path:
    """Write output_dir/checkpoint-<step> atomically, with the tokenizer as training renders; a collective, so every
    rank calls it. Returns the folder.

    If writing fails (full disk, I/O error) every rank raises, and the earlier checkpoints are as they were.
    """
    adapter = fsdp_wrap.gather_lora_state(model)  # collectives first, on every rank; then rank 0 writes alone
    with warnings.catch_warnings():  # torch's FSDP1 optimizer gather warns about its own internal helpers
        warnings.simplefilter("ignore", UserWarning)
        # cpu_offload: only rank 0 holds the gathered state, in CPU memory
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(model, optimizer, options=options)
        optim = _renamed(optim, fsdp_wrap.natural_lora_names(model))
    rngs = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(_rng_state(), rngs, dst=0)
    state = dataclasses.replace(state, scheduler=scheduler.state_dict())
    final = Path(out_dir) / f"checkpoint-{state.step}"

    def write() -> None:
        run_folder.write_checkpoint(final, state.step, adapter, state.config, state.base_fingerprint, tokenizer, {
            "optimizer.pt": lambda path: torch.save(optim, path),
            "rng_state.pt": lambda path: torch.save(rngs, path),
            "trainer_state.json": lambda path: path.write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n"),
        })
        for old in list_checkpoints(out_dir)[:-keep_last] if keep_last else []:
            shutil.rmtree(old, ignore_errors=True)

    earlier = list_checkpoints(out_dir)  # what a failed save leaves to resume from
    _on_rank0(write, final, f"the earlier checkpoints are intact (newest: {earlier[-1].name})" if earlier else
              "no earlier checkpoint exists")
    return final


def save_final(out_dir: Path, model, config: dict, base_fingerprint: str, tokenizer) -> None:
    """The trained adapter, the run's config and the tokenizer into output_dir itself, as a set; a collective."""
    adapter = fsdp_wrap.gather_lora_state(model)
    _on_rank0(lambda: run_folder.write_final(Path(out_dir), adapter, config, base_fingerprint, tokenizer),
              Path(out_dir), "the checkpoints in it are intact; --resume auto saves again")


def _on_rank0(write: Callable[[], None], path: Path, intact: str) -> None:
    """Run `write` on rank 0 alone; if it fails, every rank raises the same error, so none waits forever."""
    error = [None]
    if dist.get_rank() == 0:
        try:
            write()
        except Exception as e:  # OSError, or torch.save's RuntimeError on a full disk: every rank must hear of it
            error[0] = f"saving {path} failed ({out_folder.disk_full(e, path) or e}); {intact}"
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise OSError(error[0])


def load_checkpoint(path: Path, model, optimizer, scheduler) -> None:
    """Optimizer, scheduler and this rank's RNG states from `path`; a collective. The LoRA weights are loaded
    earlier, into the unwrapped model (peft_format.load_adapter), before FSDP shards it."""
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


# ----------------------------------------------------------------------------------------------------------------------
# Preemption


class Interrupted(KeyboardInterrupt):
    """A signal before training started: there is nothing to save, so the run stops where it is. A KeyboardInterrupt,
    as Ctrl-C's own: libraries that clean up after one (datasets' cache files) do so, and `except Exception` passes it
    on."""


class StopOnSignal:
    """SIGTERM or SIGINT (preemption, Ctrl-C) asks for a clean stop, and each signalled rank says so at once. Before
    training starts (tokenizing, loading) the run stops there (Interrupted), saving nothing. Once begin_training() is
    called: finish the step, save, exit. A second signal kills.

    torchrun forwards the signal it gets to every rank; a scheduler may signal only some. So the ranks agree with an
    all-reduce after every step, and all of them stop on the same step: the save is a collective.
    """

    def __init__(self):
        self.signal, self.training = None, False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def begin_training(self) -> None:
        self.training = True

    def _handle(self, signum, frame):
        if self.signal is not None:  # asked twice: exit at once, as if there were no handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signal.Signals(signum).name
        news = (": stopping after this step, with a checkpoint (a second signal stops at once)" if self.training
                else " before training started: stopping now; nothing is saved")
        # os.write, not print: the signal may have interrupted a print, and print is not reentrant
        os.write(2, f"rank {os.environ.get('RANK', 0)}: got {self.signal}{news}\n".encode())
        if not self.training:
            raise Interrupted(self.signal)

    def agreed(self, device: torch.device, failed: bool = False) -> tuple[bool, bool]:
        """Whether any rank was signalled, and whether any rank passed `failed` (a write it could not make): the
        same on every rank, from one all-reduce."""
        flags = torch.tensor([float(self.signal is not None), float(failed)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, any_failed = flags.tolist()
        return bool(signalled), bool(any_failed)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
