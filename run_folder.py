"""A run folder (output_dir, and each checkpoint-N in it): what it holds, its one writer, and who may write it.

    adapter_model.safetensors, adapter_config.json   the LoRA weights in PEFT's format (PEFT loads the folder as is)
    train_config.json                                the run's whole config: base, quant, LoRA shape, data, schedule
    tokenizer.json, tokenizer_config.json, ...       the tokenizer, with the chat template that rendered the training
                                                     rows (chat_template.jinja), as PEFT and TRL save it
    metrics.jsonl, samples.jsonl                     output_dir only: one JSON object per step, per sample
    tensorboard/, wandb/                             output_dir only, with --report_to (reporting.py)
    .lock                                            output_dir only: held by the run writing it

_write_set writes the files of every folder, final (write_final) or checkpoint (write_checkpoint), so the two
never drift apart, and read_run_config reads
back what an adapter was trained on (merge.py and generate.py take the base's quantization from it). Every file is
fsynced in a temporary sibling before it is put in place: a checkpoint folder is renamed whole (with a COMPLETE
manifest of sizes and sha256s, checked on resume); output_dir holds other files, so there the adapter's files are
renamed in one by one with adapter_config.json (what makes a folder an adapter) removed first and put back last, and
a kill midway leaves no adapter rather than weights of one run beside the config of another.

One run at a time per output_dir: rank 0 holds an exclusive lock on output_dir/.lock for the whole run
(lock_output_dir); the kernel drops it when the process dies, so a killed run never blocks the next.
"""
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

import cli
import model_loading
import out_folder
import peft_format
import quantization

COMPLETE = "COMPLETE"
TRAIN_CONFIG = "train_config.json"
LOCK = ".lock"


class FolderError(cli.Refusal):
    """An output_dir that cannot be used for this run; the message says why and what to do."""


def lock_output_dir(out_dir: Path):
    """Make output_dir, and take it for this run: rank 0 holds an exclusive lock on output_dir/.lock until the run
    ends. A second run is refused at once, naming the holder; a killed holder's lock is gone with its process.

    Returns the open lock file on rank 0 (close it to release) and None elsewhere; a collective.
    """
    handle, error = None, [None]
    if dist.get_rank() == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=out_dir):
                pass
            handle = open(out_dir / LOCK, "a+")
        except OSError as e:
            error[0] = FolderError(f"--output_dir {out_dir} is not writable: {e.strerror or e}")
        else:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                handle.truncate(0)  # "a+": every write appends, so this line becomes the whole file
                handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
                handle.flush()
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "a process that has not written its name yet"
                handle.close()
                handle = None
                error[0] = FolderError(f"{out_dir} is in use by another run ({holder}): wait for it to end, stop it, "
                                       "or choose another --output_dir")
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]
    return handle


def write_final(out_dir: Path, adapter: dict, config: dict, base_fingerprint: str, tokenizer) -> None:
    """The trained adapter, the run's config and the tokenizer into output_dir, as a set: written in a temporary folder
    inside it, then renamed in with adapter_config.json last (module docstring)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir))
    try:
        names = _write_set(tmp, adapter, config, base_fingerprint, tokenizer, {})
        _replace_files(tmp, out_dir, order=sorted(names, key=lambda f: f == "adapter_config.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # empty after the renames; a failed save leaves nothing


def write_checkpoint(final: Path, step: int, adapter: dict, config: dict, base_fingerprint: str, tokenizer,
                     extra: dict[str, Callable[[Path], None]]) -> None:
    """A checkpoint-N folder: the adapter, the config, the tokenizer and `extra` files (name -> writer), with a
    COMPLETE manifest of each file's size and sha256, written in a temporary sibling and renamed to `final` whole."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    try:
        names = _write_set(tmp, adapter, config, base_fingerprint, tokenizer, extra)
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)} for name in names}
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
        _fsync(tmp / COMPLETE)
        out_folder.readable(tmp)
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


def _write_set(tmp: Path, adapter: dict, config: dict, base_fingerprint: str, tokenizer,
               extra: dict[str, Callable[[Path], None]]) -> list[str]:
    """The one writer of a run folder's files, final or checkpoint: the adapter in PEFT's format (recording its
    base's fingerprint), the run's config, the tokenizer, then `extra`; each fsynced, so that nothing is renamed into
    place before it is on disk. Returns the names. Called on rank 0 alone: transformers saves a tokenizer on every
    rank that asks."""
    peft_format.save_adapter(adapter, tmp, config["lora_rank"], config["lora_alpha"], config["lora_dropout"],
                             config["model"], base_fingerprint)
    (tmp / TRAIN_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(tmp)  # with the chat template training rendered with: apply_chat_template renders it
    for name, writer in extra.items():
        writer(tmp / name)
    names = sorted(p.name for p in tmp.iterdir())
    for name in names:
        _fsync(tmp / name)
    return names


def _replace_files(src: Path, dst: Path, order: list[str]) -> None:
    """Rename src's files into dst in this order, after removing the last one's old copy from dst: a reader finds
    the whole new set, or the set without its last file, never a mix whose last file belongs to another."""
    (dst / order[-1]).unlink(missing_ok=True)
    _fsync(dst)
    for name in order:
        os.replace(src / name, dst / name)
    _fsync(dst)


def read_run_config(folder: Path) -> dict:
    """The config of the run that wrote a run folder (output_dir or checkpoint-N): base, quant, LoRA shape. Checkpoints
    written before train_config.json was saved in them carry it in trainer_state.json. {} for an adapter trained
    elsewhere."""
    folder = Path(folder)
    if (folder / TRAIN_CONFIG).is_file():
        return json.loads((folder / TRAIN_CONFIG).read_text())
    if (folder / "trainer_state.json").is_file():
        return json.loads((folder / "trainer_state.json").read_text())["config"]
    return {}


def trained_quant(folder: Path, base_dir: Path, error: type[cli.Refusal] = FolderError) -> str:
    """The base quantization an adapter was trained against; the default for an adapter from elsewhere. A base
    pre-quantized to another 4-bit type is refused: quantize.py's copies of one model share its fingerprint
    (check_base), but not the weights the adapter learned on."""
    config = read_run_config(folder)
    if "quant" not in config:
        tqdm.write(f"{folder} does not say how its base was quantized (no {TRAIN_CONFIG}): assuming "
                   f"{quantization.DEFAULT}")
    quant = config.get("quant", quantization.DEFAULT)
    stored = model_loading.weights_quant(model_loading.read_config(base_dir))
    if "quant" in config and stored is not None and quant not in (stored, "none"):
        raise error(f"the adapter in {folder} was trained on an {quant} base ({TRAIN_CONFIG}), and {base_dir} is "
                    f"pre-quantized to {stored}: not the weights it learned on. Pass the base it was trained on")
    return quant


def check_base(adapter_dir: Path, model: str, model_dir: Path, allow_other_base: bool,
               error: type[cli.Refusal] = FolderError) -> None:
    """Refuse an adapter on a base other than the one it was trained on, by fingerprint (model_loading.fingerprint),
    before any model loads: a base and its instruct model have the same shapes, so nothing else would tell. The
    adapter's record is peft_format.trained_fingerprint, or trainer_state.json's in checkpoints written before it
    existed.
    --allow_other_base (`allow_other_base`) applies it anyway; an adapter from another tool, with no record, is
    warned about."""
    adapter_dir = Path(adapter_dir)
    state = adapter_dir / "trainer_state.json"
    recorded = peft_format.trained_fingerprint(adapter_dir) or (
        json.loads(state.read_text()).get("base_fingerprint") if state.is_file() else None)
    trained_on = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if recorded is None:
        warnings.warn(f"the adapter in {adapter_dir} does not record the base it was trained on (written by another "
                      f"tool?): --model {model} is not checked against it ({trained_on!r} in its adapter_config.json)")
        return
    given = model_loading.fingerprint(model_dir)
    if recorded == given:
        return
    if not allow_other_base:
        raise error(f"the adapter in {adapter_dir} was trained on {trained_on} (fingerprint {recorded}), not on "
                    f"--model {model} (fingerprint {given}): pass the base it was trained on, or --allow_other_base "
                    "to apply it to this one on purpose")
    warnings.warn(f"--allow_other_base: the adapter in {adapter_dir}, trained on {trained_on} (fingerprint "
                  f"{recorded}), is applied to --model {model} (fingerprint {given})")


def open_metrics(path: Path, resumed_step: int):
    """metrics.jsonl to append to, cut back to the resumed step (cut_back)."""
    cut_back(path, resumed_step)
    return path.open("a")


def cut_back(path: Path, resumed_step: int) -> None:
    """Keep the whole lines of a per-step file (metrics.jsonl, samples.jsonl) up to the resumed step, so a resumed
    run's file reads as one run. A line torn by a kill or a full disk is not whole: it is dropped, as are the steps
    after the checkpoint. The kept lines replace the file atomically: a kill here loses nothing."""
    if not path.is_file():
        return
    kept = [line + "\n" for line, step in _whole_lines(path) if step <= resumed_step] if resumed_step else []
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def last_metrics_step(path: Path) -> int:
    """The last step metrics.jsonl holds a whole line of (0: none), before open_metrics cuts it back."""
    return max((step for _, step in _whole_lines(path)), default=0)


def _whole_lines(path: Path) -> list[tuple[str, int]]:
    """A per-step file's lines that parse as a step's record, with their step; a torn line is left out."""
    found = []
    for line in path.read_bytes().decode(errors="replace").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            found.append((line, record["step"]))
    return found


def sha256(path: Path) -> str:
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
