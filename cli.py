"""What train.py, merge.py, generate.py and quantize.py do around their work: the flags read before the heavy
libraries load, and a refusal said in one line.

    $ torchrun --nproc_per_node 2 train.py --lr=-1
    error: --lr must be positive, got -1.0        # once, exit status 2, and in torchrun's failure summary

A refusal is a `Refusal`, the base of the project's error classes (data.DataError, run_folder.FolderError and
checkpointing.ResumeError, model_loading.ModelFolderError, lora.AdapterError, merge.MergeError,
quantize.QuantizeError), or any ValueError raised while the flags are read (argparse's, a --config file's,
train.validate's): the input was refused, the message says what to change, and a traceback would only bury it. Any
other exception is a bug, and keeps its traceback.

Under torchrun each rank that refuses writes its line into its error file, through torch's own `record`, and torchrun
prints that file in its failure summary, where a bug's traceback goes too. On the screen the line is said once per
node: a node's ranks read the same flags and files, so they refuse alike, and its first rank says it at once. Another
rank waits up to FIRST_RANK_S first: when the first rank refuses too, torchrun stops the others meanwhile, and the
line is said once; a rank still running after the wait met the refusal alone, and says it.

Nothing here imports torch before the flags are read: it is imported in main(), after them.
"""
import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

REFUSED = 2  # the exit status of a refusal, as argparse's for a bad flag; a bug's is Python's, 1
FIRST_RANK_S = 10  # how long a rank waits for its node's first rank to say a refusal (module docstring)


class Refusal(ValueError):
    """Input the project will not work with: the message says what is wrong and what to do instead."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a flag it cannot read is a Refusal like any other. (argparse would print its usage and
    exit on every rank, where torchrun's summary does not see it.)"""

    def error(self, message: str):
        raise Refusal(f"{message} (see {self.prog} --help)")


def check_flags(parser: argparse.ArgumentParser) -> None:
    """The command line, read before the heavy libraries are imported: --help exits here, and a flag argparse refuses
    is answered at once, not seconds later. The command reads it again in main(), with the defaults that live beside
    the code that uses them."""
    try:
        parser.parse_args()
    except Refusal as e:
        _write_error_file(f"error: {e}")
        sys.exit(refuse(e))


def main(parse: Callable[[], Any], run: Callable[[Any], Any]) -> int:
    """run(parse()) as the command, under torch's elastic `record`; the exit status: 0, or REFUSED after saying why.
    A bug raises, its traceback recorded for torchrun's summary."""
    from torch.distributed.elastic.multiprocessing.errors import record

    def command():
        try:
            args = parse()
        except ValueError as e:  # the flags' checks read nothing but the flags and the files they name
            raise Refusal(str(e)) from None
        return run(args)

    try:
        record(command, error_handler=_ErrorFile())()
    except Refusal as e:
        return refuse(e)
    return 0


def refuse(e: Refusal) -> int:
    """Say it, once per node (module docstring); returns the exit status."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        time.sleep(FIRST_RANK_S)  # torchrun stops this rank meanwhile if the first one refuses too
    sys.stdout.flush()  # what was printed before comes before it
    print(f"error: {e}", file=sys.stderr, flush=True)
    return REFUSED


def _write_error_file(message: str) -> None:
    """The error file torchrun reads back into its failure summary, as torch's ErrorHandler.record_exception writes it
    but without "py_callstack": the summary then shows "message" where it would show the traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)


class _ErrorFile:
    """`record`'s error handler: torch's ErrorHandler, except that a refusal is recorded as its one line."""

    def __init__(self):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
        self.torch = ErrorHandler()

    def initialize(self) -> None:
        self.torch.initialize()

    def record_exception(self, e: BaseException) -> None:
        if isinstance(e, Refusal):
            _write_error_file(f"error: {e}")
        else:
            self.torch.record_exception(e)
