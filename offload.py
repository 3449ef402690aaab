"""Checkpointed decoder-layer inputs in host memory, for sequences too long for them to stay on the GPU.

With every decoder layer checkpointed, what a layer keeps between forward and backward is its input: seq x hidden x 2
bytes, for every layer at once. For an 8B model at 131,072 tokens that is 1 GiB per layer, 32 GiB in all; for 70B at
batch 4 x 2,048 tokens, 128 MiB per layer, 10 GiB over its 80 layers. ActivationOffload.checkpoint is a checkpoint
function that sends each such input to pinned host memory as forward leaves the layer, and brings it back one layer
ahead of backward, so that the GPU holds about two of them.

How: torch's non-reentrant checkpoint saves the inputs of the checkpointed function as saved tensors (everything inside
the function is recomputed instead), and saved tensors go through the innermost `saved_tensors_hooks`. Entered around
the checkpoint call only, the hooks below see exactly the layer inputs, and nothing that autograd saves elsewhere
(torch.autograd.graph.save_on_cpu, by contrast, moves every saved tensor). On CUDA both copies run on side streams:
the copy out overlaps the next layers' forward, and the copy of layer k-1's input back overlaps layer k's backward.
On CPU the hooks copy too, so that tests run the same mechanism.
"""
import weakref

import torch
from torch.utils.checkpoint import checkpoint


class _Offloaded:
    """One saved layer input, in host memory; `previous` is the layer input saved before it, which backward needs
    next. Autograd keeps this object alive exactly as long as it would have kept the GPU tensor."""

    def __init__(self, host: torch.Tensor, previous: "_Offloaded | None"):
        self.host, self.device_tensor = host, None  # device_tensor: brought back ahead of its use, not yet used
        self.previous = weakref.ref(previous) if previous is not None else lambda: None
        self.copied = self.fetched = None  # CUDA events: the copy out, and the copy back, are done


class ActivationOffload:
    """Pass `checkpoint` as checkpoint_wrapper's checkpoint_fn. One instance per model: it links the layer inputs of
    one forward in the order backward will need them back."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        if self.cuda:
            self.copy_out, self.copy_in = torch.cuda.Stream(device), torch.cuda.Stream(device)
        self.last = lambda: None  # the input saved most recently (weakly: a finished step's inputs must be freed)
        self.saved_bytes = 0  # bytes sent to host memory so far: what the tests and the log read

    def checkpoint(self, fn, *args, **kwargs):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    def _pack(self, tensor: torch.Tensor) -> "_Offloaded | torch.Tensor":
        if tensor.device != self.device or tensor.numel() == 0:  # not an activation: checkpoint's own empty marker
            return tensor
        if self.cuda:
            self.copy_out.wait_stream(torch.cuda.current_stream(self.device))  # the layer input has been computed
            with torch.cuda.stream(self.copy_out):
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)  # pinned: an asynchronous copy
                host.copy_(tensor, non_blocking=True)
            # The GPU tensor is freed once forward is done with it; its memory may be reused only after the copy.
            tensor.record_stream(self.copy_out)
        else:
            host = tensor.clone()
        entry = _Offloaded(host, self.last())
        if self.cuda:
            entry.copied = self.copy_out.record_event()
        self.last = weakref.ref(entry)
        self.saved_bytes += tensor.numel() * tensor.element_size()
        return entry

    def _unpack(self, entry: "_Offloaded | torch.Tensor") -> torch.Tensor:
        if isinstance(entry, torch.Tensor):
            return entry
        if not self.cuda:
            return entry.host
        if entry.device_tensor is None:  # the last layer's input, or one unpacked twice: nothing was ahead of it
            self._fetch(entry)
        tensor, entry.device_tensor = entry.device_tensor, None
        main = torch.cuda.current_stream(self.device)
        main.wait_event(entry.fetched)
        tensor.record_stream(main)  # allocated on copy_in, used and freed on the main stream
        previous = entry.previous()
        if previous is not None and previous.device_tensor is None:
            self._fetch(previous)  # the next layer backward reaches; copied in while this one computes
        return tensor

    def _fetch(self, entry: _Offloaded) -> None:
        self.copy_in.wait_event(entry.copied)
        with torch.cuda.stream(self.copy_in):
            entry.device_tensor = entry.host.to(self.device, non_blocking=True)
        entry.fetched = self.copy_in.record_event()
