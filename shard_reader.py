"""Reading a model folder's safetensors shards tensor by tensor, a few tensors ahead of the caller, who quantizes
meanwhile: threads read the files and copy each tensor to the GPU through page-locked buffers.

Copies from pageable memory (the files' memory maps) do not overlap across threads, copies from page-locked memory
do: so each thread stages its tensor in 16 MB chunks through two page-locked buffers of its own, on a stream of its
own, and the caller's stream waits for each tensor's copy, not the caller (timings: BENCHMARKS.md, "Copying the
shards to the GPU").
"""
import queue
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

import cli


def read_ahead(by_file: dict[Path, list[str]], where: dict[str, torch.device], threads: int = 8,
               chunk_bytes: int = 16 << 20, error: type[Exception] = cli.Refusal):
    """(name, tensor on where[name]) for every tensor of `by_file`, in order, read by `threads` threads up to
    `threads` tensors ahead of the caller, who quantizes meanwhile. A tensor for the CPU is the file's own memory map.
    A file safetensors cannot read raises `error` naming it: the caller's refusal class (model_loading's
    ModelFolderError).
    """
    gpu = next((d for d in where.values() if d.type == "cuda"), None)
    with ExitStack() as files, ThreadPoolExecutor(threads) as pool:
        handles = {file: files.enter_context(_open_shard(file, error)) for file in by_file}
        copier = _PinnedCopier(gpu, threads, chunk_bytes) if gpu is not None else None

        def read(file: Path, name: str) -> tuple[str, torch.Tensor, torch.cuda.Event | None]:
            try:
                tensor = handles[file].get_tensor(name)
            except SafetensorError as e:
                raise corrupt(file, e, error) from e
            return (name, *copier.copy(tensor)) if where[name].type == "cuda" else (name, tensor, None)

        def arrived(name: str, tensor: torch.Tensor, event: torch.cuda.Event | None) -> tuple[str, torch.Tensor]:
            if event is not None:  # the caller's stream waits for the copy, not the caller
                torch.cuda.current_stream(tensor.device).wait_event(event)
            return name, tensor

        pending = deque()
        for file, names in by_file.items():
            for name in names:
                pending.append(pool.submit(read, file, name))
                if len(pending) > threads:
                    yield arrived(*pending.popleft().result())
        while pending:
            yield arrived(*pending.popleft().result())


def corrupt(file: Path, cause: SafetensorError, error: type[Exception] = cli.Refusal) -> Exception:
    """The refusal of a shard safetensors cannot read (its header or its data), naming the file and the fix."""
    return error(f"{file} is truncated or corrupt ({cause}); download it again")


def _open_shard(file: Path, error: type[Exception]):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as e:
        raise corrupt(file, e, error) from e


class _PinnedCopier:
    """Copies CPU tensors to one GPU from several threads at once, through page-locked staging buffers.

    Each thread takes a stream and two buffers, filling one while the other is being copied from; the buffers,
    2 x chunk_bytes per thread, are allocated once (and stay in torch's page-locked memory cache). Pinning whole
    tensors instead would leave several GB in that cache for the rest of the run.
    """

    def __init__(self, device: torch.device, threads: int, chunk_bytes: int):
        self.device, self.chunk_bytes = device, chunk_bytes
        self.consumer = torch.cuda.current_stream(device)  # the stream that will use the tensors
        self.free = queue.SimpleQueue()
        for _ in range(threads):
            buffers = [(torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True), torch.cuda.Event())
                       for _ in range(2)]
            self.free.put((torch.cuda.Stream(device), buffers))

    def copy(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """`tensor` on the GPU, and the event after which its copy is complete; from any thread."""
        stream, buffers = self.free.get()
        try:
            out = torch.empty(tensor.shape, dtype=tensor.dtype, device=self.device)
            stream.wait_stream(self.consumer)  # `out` may reuse memory that queued work on the consumer still reads
            src, dst = tensor.reshape(-1).view(torch.uint8), out.view(-1).view(torch.uint8)
            for i, start in enumerate(range(0, src.numel(), self.chunk_bytes)):
                buffer, copied = buffers[i % 2]
                copied.synchronize()  # the buffer's previous copy to the GPU has finished
                n = min(self.chunk_bytes, src.numel() - start)
                buffer[:n].copy_(src[start:start + n])
                with torch.cuda.stream(stream):
                    dst[start:start + n].copy_(buffer[:n], non_blocking=True)
                copied.record(stream)
            done = torch.cuda.Event()
            done.record(stream)
            return out, done
        finally:
            self.free.put((stream, buffers))
