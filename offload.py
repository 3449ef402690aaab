"""Host memory in place of GPU memory, for what the GPU needs only for a moment: checkpointed layer inputs (long
sequences), and on one GPU the frozen weights of the decoder layers (how a 70B model trains on one GPU; BENCHMARKS.md
has the memory measured).

Layer inputs. With every decoder layer checkpointed, what a layer keeps between forward and backward is its input:
seq x hidden x 2 bytes, for every layer at once. For an 8B model at 131,072 tokens that is 1 GiB per layer, 32 GiB in
all; for 70B at batch 4 x 2,048 tokens, 128 MiB per layer, 10 GiB over its 80 layers. ActivationOffload.checkpoint is a
checkpoint function that sends each such input to pinned host memory as forward leaves the layer, and brings it back
one layer ahead of backward, so that the GPU holds about two of them.

How: torch's non-reentrant checkpoint saves the inputs of the checkpointed function as saved tensors (everything inside
the function is recomputed instead), and saved tensors go through the innermost `saved_tensors_hooks`. Entered around
the checkpoint call only, the hooks below see exactly the layer inputs, and nothing that autograd saves elsewhere
(torch.autograd.graph.save_on_cpu, by contrast, moves every saved tensor). On CUDA both copies run on side streams:
the copy out overlaps the next layers' forward, and the copy of layer k-1's input back overlaps layer k's backward.
On CPU the hooks copy too, so that tests run the same mechanism.

Frozen weights (WeightStream). A decoder layer's 4-bit weights, their quant_state and its norms are one pinned host
buffer, copied whole into a GPU buffer just before the layer runs: in forward while the layer before it computes, in
backward (where checkpointing recomputes the layer first) while the layer after it does. The GPU holds at most two
layers' weights at any time, whatever the depth. Every tensor of the layer is a view of its GPU buffer, whose storage
is resized to nothing when the layer is done (what FSDP does with the gathered parameters it frees): views that
autograd keeps, such as the packed weight bitsandbytes holds for its backward, then pin no memory, and see the data
again when the buffer is refilled for the recompute.
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


NEEDS_RECOMPUTE = ("--cpu_offload on one GPU brings each layer's weights back for its backward by recomputing the "
                   "layer: it needs --grad_checkpointing non_reentrant or reentrant")


class _LayerWeights:
    """One decoder layer's frozen tensors as views of one device buffer, whose bytes live in one host buffer.
    quant_state_tensors(module): (owner, attribute, tensor) of the tensors a module holds outside its parameters and
    buffers (quantization.state_tensors: bitsandbytes' quant_state)."""

    def __init__(self, layer: torch.nn.Module, device: torch.device, quant_state_tensors):
        slots = []  # (owner, attribute, tensor): every reference to a tensor of the layer, re-pointed below
        for module in layer.modules():
            for key, p in module._parameters.items():
                if p is not None and p.requires_grad:
                    raise ValueError(f"{type(layer).__name__} holds the trainable {key!r}: only frozen weights "
                                     "stream from host memory (LoRA weights belong to the layer's adapters)")
            slots += [(p, "data", p) for p in module._parameters.values() if p is not None]  # the Parameter stays
            slots += [(module, key, b) for key, b in module._buffers.items() if b is not None]
            slots += list(quant_state_tensors(module))
        tensors = {id(t): t for *_, t in slots}  # a tensor referenced twice is stored once
        offsets, self.nbytes = {}, 0
        for key, t in tensors.items():  # 64-byte aligned, so that every view of the buffer may take any dtype
            offsets[key] = self.nbytes
            self.nbytes += -(-t.numel() * t.element_size() // 64) * 64
        self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")  # async copies
        self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        views = {}
        for key, t in tensors.items():
            start, n = offsets[key], t.numel() * t.element_size()
            self.host[start:start + n].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
            views[key] = self.buffer[start:start + n].view(t.dtype).view(t.shape)
        for owner, attr, t in slots:  # every reference now points into the buffer; the originals are freed
            setattr(owner, attr, views[id(t)])
        self.ready = None  # CUDA event: the copy into the buffer is done
        self.free()

    @property
    def resident(self) -> bool:
        return self.buffer.untyped_storage().nbytes() > 0

    def free(self) -> None:
        self.buffer.untyped_storage().resize_(0)


class WeightStream:
    """Keeps `layers` (a model's decoder layers, in the order forward runs them) in host memory, each brought to
    `device` around its own use. Needs activation checkpointing: backward must run each layer again, which is what
    brings its weights back. On CPU it copies between two CPU buffers, so that tests run the same mechanism."""

    def __init__(self, layers: list[torch.nn.Module], device: torch.device, quant_state_tensors):
        self.device, self.cuda = device, device.type == "cuda"
        self.copy_in = torch.cuda.Stream(device) if self.cuda else None
        self.layers = [_LayerWeights(layer, device, quant_state_tensors) for layer in layers]
        self.host_bytes = sum(w.nbytes for w in self.layers)
        self.fetches = 0  # layer copies to the device so far: what the tests read
        self._callback_queued = False
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda module, args, i=i: self._before(i))
            layer.register_forward_hook(lambda module, args, out, i=i: self._after(i))

    def _before(self, i: int) -> None:
        if torch._C._current_graph_task_id() == -1:  # forward: the layers run first to last
            self._use(i)
            self._fetch(i + 1)
            return
        # Backward: checkpointing recomputes layer i just before its backward, once layer i+1's backward is over.
        self._release(i + 1)
        if not self._callback_queued:  # layer 0 has no layer below it to release it
            torch.autograd.Variable._execution_engine.queue_callback(self._release_all)
            self._callback_queued = True
        self._use(i)
        self._fetch(i - 1)

    def _after(self, i: int) -> None:
        if torch._C._current_graph_task_id() == -1:  # in backward, the layer's own backward still needs it
            self._release(i)

    def _fetch(self, i: int) -> None:
        if not 0 <= i < len(self.layers) or self.layers[i].resident:
            return
        w = self.layers[i]
        # Allocated in the compute stream's order, which alone frees it; the copy starts once the compute queued so
        # far is done with whatever memory this reuses, and runs while the compute queued next does.
        w.buffer.untyped_storage().resize_(w.nbytes)
        self.fetches += 1
        if not self.cuda:
            w.buffer.copy_(w.host)
            return
        self.copy_in.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_in):
            w.buffer.copy_(w.host, non_blocking=True)
        w.ready = self.copy_in.record_event()

    def _use(self, i: int) -> None:
        self._fetch(i)  # a no-op unless nothing fetched it ahead (the first layer)
        w = self.layers[i]
        if w.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(w.ready)
            w.ready = None

    def _release(self, i: int) -> None:
        if 0 <= i < len(self.layers) and self.layers[i].resident:
            self._use(i)  # a copy still in flight must land before its memory can go back
            self.layers[i].free()

    def _release_all(self) -> None:
        self._callback_queued = False
        for i in range(len(self.layers)):
            self._release(i)
