"""Long sequences: checkpointed layer inputs offloaded to host memory (offload.py) and the tiled MLP (fused.py) compute
what plain runs compute, and the mechanisms do what they claim: every layer input goes to host memory, no MLP sees
more than a tile. On a GPU, memory falls."""
import pytest
import torch
from conftest import DEVICE, adapted_4bit, common, exactly_as_plain, loss_and_grads, losses, run_inprocess
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

import fsdp_wrap
import offload


def offloaders(model) -> list[offload.ActivationOffload]:
    """The ActivationOffload behind each checkpointed layer (checkpoint_wrapper keeps its bound method)."""
    return [m.checkpoint_fn.func.__self__ for m in model.modules() if isinstance(m, CheckpointWrapper)
            and isinstance(getattr(m.checkpoint_fn.func, "__self__", None), offload.ActivationOffload)]


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_offloaded_layer_inputs_give_the_same_loss_and_gradients(checkpoints, process_group, arch):
    """Offloading moves each layer's input to host memory and back: the loss and every LoRA gradient are those of
    the plain run, exactly, and the bytes sent are exactly the layer inputs (2 layers x tokens x hidden x bf16)."""
    model, ids = exactly_as_plain(checkpoints(arch), offload_activations=True)
    (offloader,) = set(offloaders(model))  # one per model, shared by its layers
    assert offloader.saved_bytes == 2 * ids.numel() * 64 * 2


def test_tiled_mlp_gives_the_same_loss_and_gradients_and_no_mlp_sees_more_than_a_tile(checkpoints, process_group):
    """Tiles of 16 tokens over 2 x 40 tokens (5 tiles, crossing the rows): the down projection never sees more than
    16 tokens, and the loss and gradients are the untiled ones up to the rounding of summing LoRA's bf16 weight
    gradients tile by tile."""
    path, ids = checkpoints("qwen3"), torch.randint(4, 400, (2, 40), device=DEVICE)
    _, plain_loss, plain_grads = loss_and_grads(path, ids)
    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(  # every module's input of intermediate size
        lambda m, args: seen.append(args[0].flatten(0, -2).shape[0]) if args and isinstance(args[0], torch.Tensor)
        and args[0].shape[-1] == 128 else None)
    try:
        _, loss, grads = loss_and_grads(path, ids, tiled_mlp=16)
    finally:
        hook.remove()
    assert seen and max(seen) == 16
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert (grads - plain_grads).norm() <= 1e-2 * plain_grads.norm()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_tiled_moe_mlp_gives_the_same_loss_and_gradients(checkpoints, process_group, arch):
    """A mixture of experts' MLP routes each token alone, so tiles of 16 tokens over 2 x 40 give the untiled loss
    and gradients up to the same rounding as a dense MLP's; its block takes (batch, seq, hidden) inputs only, and
    2-D tiles failed in transformers' forward with a traceback at the first step."""
    path, ids = checkpoints(arch), torch.randint(4, 400, (2, 40), device=DEVICE)
    _, plain_loss, plain_grads = loss_and_grads(path, ids)
    _, loss, grads = loss_and_grads(path, ids, tiled_mlp=16)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert (grads - plain_grads).norm() <= 1e-2 * plain_grads.norm()


def test_offloaded_and_tiled_training_gives_the_losses_of_plain_training(checkpoints, tmp_path):
    """Through train.py's flags, three steps each. Offloaded, with LoRA dropout (each recompute must draw the
    forward's mask again): the plain run's losses, exactly. Tiled, without dropout (on a GPU a tile draws other random
    numbers than the whole batch would, a mask as valid but not the same): the same losses up to the rounding of
    matmuls over fewer rows (on a GPU, other kernels)."""
    path, tol = checkpoints("llama"), 1e-2 if DEVICE.type == "cuda" else 1e-3

    def run(name, *flags):
        return losses(run_inprocess(common(path, tmp_path / name) + ["--batch_size", "4", *flags]))

    offloaded = run("offloaded", "--lora_dropout", "0.1", "--offload_activations")
    torch.testing.assert_close(offloaded, run("plain", "--lora_dropout", "0.1"),  # GPU: attention's backward
                               rtol=0 if DEVICE.type == "cpu" else 1e-3, atol=0)  # accumulates in any order
    torch.testing.assert_close(run("tiled", "--tiled_mlp", "32"), run("untiled"), rtol=tol, atol=0)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU memory")
def test_offloading_and_tiling_lower_peak_gpu_memory(tmp_path, process_group):
    """An 8-layer model at 8,192 tokens: offloaded, forward leaves the eight layer inputs (8,192 x 1,024 x 2 bytes =
    16 MiB each) off the GPU for backward (at least three quarters of them, should a copy still be in flight); tiled,
    the MLP's (tokens x 4,096) intermediates (64 MiB each) never exist whole, which lowers the peak of the step."""
    from transformers import LlamaConfig

    from builtin import make_tokenizer, write_random_checkpoint

    config = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192)
    write_random_checkpoint(config, tmp_path, tokenizer=make_tokenizer(), device="cuda")
    ids = torch.randint(4, 500, (1, 8192), device=DEVICE)
    kept, peaks = {}, {}
    for name, wrap in {"plain": {}, "offload": dict(offload_activations=True), "tiled": dict(tiled_mlp=1024)}.items():
        torch.manual_seed(0)
        model, layer_cls = adapted_4bit(tmp_path)
        model = fsdp_wrap.wrap_model(model, layer_cls, DEVICE, wrapping=fsdp_wrap.Wrapping(**wrap))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = model(input_ids=ids, labels=ids)
        torch.cuda.synchronize()  # the copies to host memory are done; their GPU tensors are freed at the next call
        torch.empty(1, device=DEVICE)  # into the allocator
        kept[name] = (torch.cuda.memory_allocated() - before) / 2**20  # what forward leaves for backward
        loss.backward()
        peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
        del model, loss
    assert kept["offload"] < kept["plain"] - 0.75 * 8 * 16, kept  # the 8 layer inputs, 16 MiB each
    assert peaks["tiled"] < peaks["plain"] - 64, peaks  # at least one (8192 x 4096) intermediate fewer at once
