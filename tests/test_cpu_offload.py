"""--cpu_offload on one GPU (offload.WeightStream): the decoder layers' frozen weights live in host memory and visit
the device around their use only. Training computes exactly what it computes with them resident, the device holds at
most two layers' weights at once, and each layer crosses to it twice a step (forward, and the recompute of backward).
On CPU the same mechanism copies between two CPU buffers."""
import gc

import pytest
import torch
from conftest import DEVICE, adapted_4bit, common, exactly_as_plain, losses, run_inprocess
from transformers import LlamaConfig

import fsdp_wrap
import offload
import train
from builtin import make_tokenizer, write_random_checkpoint


def on_device(stream: offload.WeightStream) -> int:
    """How many layers' weights the device holds now."""
    return sum(w.buffer.untyped_storage().nbytes() > 0 for w in stream.layers)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])  # Mixtral: 4-bit experts, whose quant_state is the module's
def test_streamed_weights_give_the_loss_and_gradients_of_resident_ones(checkpoints, process_group, arch):
    model, _ = exactly_as_plain(checkpoints(arch), cpu_offload=True)
    stream = model.weight_stream
    assert len(stream.layers) == 2 and stream.fetches == 2 * 2
    assert on_device(stream) == 0  # backward's end let the last of them go


def test_the_device_holds_two_layers_at_most_and_each_crosses_twice_a_step(tmp_path, process_group):
    """Six layers, three training steps of AdamW and a no-grad forward between them."""
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    write_random_checkpoint(config, tmp_path, tokenizer=make_tokenizer())
    torch.manual_seed(0)
    model, layer_cls = adapted_4bit(tmp_path)
    model = fsdp_wrap.wrap_model(model, layer_cls, DEVICE, wrapping=fsdp_wrap.Wrapping(cpu_offload=True))
    stream, seen = model.weight_stream, []
    for layer in (m for m in model.modules() if isinstance(m, layer_cls)):  # after the stream's own hooks
        layer.register_forward_pre_hook(lambda m, args: seen.append(on_device(stream)))
    assert on_device(stream) == 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(4, 500, (2, 32), device=DEVICE)
    for step in range(3):
        model(input_ids=ids, labels=ids).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert on_device(stream) == 0 and stream.fetches == (step + 1) * 2 * 6 + (6 if step else 0)
        if step == 0:
            with torch.no_grad():
                model(input_ids=ids, labels=ids)
            assert stream.fetches == 2 * 6 + 6  # once each, no recompute
    assert len(seen) == 3 * 2 * 6 + 6 and max(seen) == 2


def test_streaming_needs_checkpointing(checkpoints, process_group, monkeypatch):
    """Without a recompute nothing brings a layer's weights back for its backward: refused on the command line, and
    by wrap_model, before anything moves."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past "--cpu_offload needs a GPU"
    with pytest.raises(ValueError, match="--grad_checkpointing non_reentrant or reentrant"):
        train.parse_config(["--cpu_offload", "--grad_checkpointing", "none"])
    model, layer_cls = adapted_4bit(checkpoints("llama"))
    with pytest.raises(ValueError, match="--grad_checkpointing non_reentrant or reentrant"):
        fsdp_wrap.wrap_model(model, layer_cls, DEVICE,
                             wrapping=fsdp_wrap.Wrapping(cpu_offload=True, grad_checkpointing="none"))


def eight_layers(path):
    """8 layers of 4-bit weights with 2048 x 8192 MLPs: 33.6 MB a layer, 268 MB in all."""
    config = LlamaConfig(vocab_size=512, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=512)
    write_random_checkpoint(config, path, tokenizer=make_tokenizer(), device="cuda")
    return (4 * 2048 * 2048 + 3 * 2048 * 8192) // 2


@pytest.mark.skipif(DEVICE.type != "cuda", reason="--cpu_offload needs a GPU")
def test_streamed_training_gives_the_losses_of_resident_training(tmp_path):
    """Through train.py's flags, three steps each."""
    eight_layers(tmp_path / "model")
    runs = {name: losses(run_inprocess(common(tmp_path / "model", tmp_path / name) + ["--batch_size", "2", *flags]))
            for name, flags in {"resident": [], "streamed": ["--cpu_offload"]}.items()}
    torch.testing.assert_close(runs["streamed"], runs["resident"], rtol=1e-3, atol=0)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU memory")
def test_streamed_layers_stay_off_the_gpu(tmp_path, process_group):
    """Once wrapped, the GPU holds none of the eight layers' weights (the resident model holds them all), and a
    training step's peak is at least five layers' weights lower."""
    layer_bytes, ids = eight_layers(tmp_path), torch.randint(4, 500, (2, 512), device=DEVICE)
    held, peak = {}, {}
    for name, streamed in {"resident": False, "streamed": True}.items():
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()  # whatever an earlier model left behind is not this one's
        torch.manual_seed(0)
        model, layer_cls = adapted_4bit(tmp_path, keep_on="cpu" if streamed else None)
        model = fsdp_wrap.wrap_model(model, layer_cls, DEVICE, wrapping=fsdp_wrap.Wrapping(cpu_offload=streamed))
        torch.cuda.synchronize()
        held[name] = torch.cuda.memory_allocated() - before
        torch.cuda.reset_peak_memory_stats()
        model(input_ids=ids, labels=ids).backward()
        torch.cuda.synchronize()
        peak[name] = torch.cuda.max_memory_allocated() - before
        del model
    assert held["streamed"] < held["resident"] - 0.95 * 8 * layer_bytes, held
    assert peak["streamed"] < peak["resident"] - 5 * layer_bytes, peak
