"""Writing output others will read: a model folder written whole (merge.py's and quantize.py's --out), files any user
can read, and a full disk said as such.

    checked = check_out_folder(out, overwrite, MergeError)   # refused before any work: exists, not a model, ...
    with written_whole(out, checked, MergeError) as tmp:      # a hidden sibling, renamed to `out` at the end
        ...write config.json, shards...; copy_beside(base_dir, tmp)

A folder that is being written, or was left by a killed writer, never looks finished; two writers of one --out never
interleave.
"""
import errno
import fcntl
import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

# Everything a tokenizer (and generation defaults) may need, copied as is by the tools that write a model folder
BESIDE_WEIGHTS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                  "*.tiktoken", "chat_template*", "generation_config.json")


def check_out_folder(out: Path, overwrite: bool, error: type[Exception]) -> tuple[int, int] | None:
    """An --out that may be written: new or empty, or replaced with --overwrite when it holds a model (config.json);
    a folder of something else is never deleted. Returns the folder's identity (device, inode; None if there is
    none), which written_whole finds again before it replaces anything. `error`: the caller's refusal class."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return _identity(out)
    if not overwrite:
        raise error(f"--out {out} already exists; pass --overwrite to replace it, or choose another folder")
    if not (out / "config.json").is_file():
        raise error(f"--out {out} exists and is not a model folder (no config.json); refusing to delete it, even "
                    "with --overwrite")
    return _identity(out)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


@contextmanager
def written_whole(out: Path, checked: tuple[int, int] | None, error: type[Exception]) -> Iterator[Path]:
    """A temporary sibling of `out` to write a model folder into, renamed to `out` (replacing it) once the block
    ends: an interrupted write never looks finished, and the folder it replaces is kept until then.

    One writer at a time: each holds a lock on .NAME.lock beside `out` for the whole write (_lock_file), so a second
    one is refused at once. `out` must still be the folder check_out_folder found (`checked`): a writer that finished
    between this one's check and its start is refused too, never replaced unseen.

    The writer holds a lock on its temporary folder; the kernel drops it when the process dies. So the temporary
    folders of killed writers (SIGKILL runs no cleanup: up to a whole model's size) are the unlocked ones, removed
    here, while a writer still running keeps its own. A full disk is said as such, with the folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock_file(out.parent / f".{out.name}.lock") as free:
        if not free:
            raise error(f"--out {out} is being written by another merge.py or quantize.py: wait for it to end, or "
                        "choose another --out")
        if _identity(out) != checked:
            raise error(f"--out {out} was written by another merge.py or quantize.py after this one checked it: "
                        "choose another --out, or run again (with --overwrite to replace it)")
        for old in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
            with suppress(FileNotFoundError), _locked(old, wait=False) as unheld:  # (or removed by another meanwhile)
                if unheld:
                    shutil.rmtree(old, ignore_errors=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            with _locked(tmp, wait=True):
                yield tmp
                if out.exists():
                    shutil.rmtree(out)  # --overwrite, checked by check_out_folder
                tmp.rename(out)
        except BaseException as e:
            full = disk_full(e, tmp)  # before the removal frees the space
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise OSError(f"writing {out} failed ({full})") from None
            raise


@contextmanager
def _lock_file(path: Path) -> Iterator[bool]:
    """An exclusive lock on the file `path`, made for the block and removed after it; whether it was taken (not while
    another process holds it). A file opened just before its holder removed it is not the lock any more: such a
    lock, once taken, is dropped for the file now at `path`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        if _identity(path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            break
        os.close(fd)
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)  # while still held: whoever opens the path next makes a new lock
        os.close(fd)


@contextmanager
def _locked(folder: Path, wait: bool) -> Iterator[bool]:
    """An exclusive lock on a folder for the block; whether it was taken (without `wait`, not if another holds it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def copy_beside(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and generation files of the model folder `src` into `dst`; returns the names copied."""
    files = [f for pattern in BESIDE_WEIGHTS for f in src.glob(pattern) if f.is_file()]
    return [Path(shutil.copy(f, dst)).name for f in files]


def readable(path: Path) -> None:
    """Give a file or folder the mode a new one gets (0644 / 0755 under the usual umask of 022). safetensors' save_file
    and tempfile.mkdtemp make them private (0600 / 0700), which a server running as another user (a vLLM container)
    cannot read."""
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def disk_full(error: BaseException, path: Path) -> str | None:
    """'no space left on device ...', with the free space beside `path`, when that is why writing `path` failed: the
    errno says so, or the message (safetensors' errors have no errno), or torch.save's "unexpected pos N vs M", all it
    says when its writes come up short, while little space is left."""
    free = shutil.disk_usage(path if path.exists() else path.parent).free
    errors = [error, error.__cause__, error.__context__]
    if any(getattr(e, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(e) for e in errors) or (
            "unexpected pos" in str(error) and free < 2**28):
        return f"no space left on device: {free / 2**20:.1f} MiB free in {path.parent}; free some space"
    return None
