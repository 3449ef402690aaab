"""The built-in example model: a tiny random Llama with a tokenizer trained here, written as real checkpoints are.

    python train.py           # --model tiny (the default): built into ~/.cache/fsdp_qlora on first use

It needs no download, and it goes through the same loader as any real model: sharded safetensors, config.json and a
tokenizer. Its tokenizer is BPE trained on the built-in dataset (data.builtin_examples), so the task's words become
single tokens and LoRA alone learns the task in under a minute. The tests and benchmark.py write their checkpoints
with write_random_checkpoint too.
"""
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PretrainedConfig,
                          PreTrainedTokenizerFast)
from transformers.core_model_loading import revert_weight_conversion

import model_loading
from data import builtin_examples, render
from settings import BUILTIN_MODEL


def model_dir(model: str) -> Path:
    """--model as the tools take it: 'tiny', built here, or whatever model_loading.resolve_model_dir takes."""
    return tiny_checkpoint() if model == BUILTIN_MODEL else model_loading.resolve_model_dir(model)


def make_tokenizer():
    """The built-in model's tokenizer, made locally: BPE trained in a blink on the built-in examples.

    The task's words become single tokens, so a tiny model learns the task in minutes; any other text still
    encodes, as characters, and decodes back to itself.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Metaspace(prepend_scheme="never")])
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\u2581"]  # printable ASCII, newline, Metaspace's space
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([text for ex in builtin_examples() for text in render(ex)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")





def write_random_checkpoint(config: PretrainedConfig, out_dir: Path, max_shard_size: str = "1MB", seed: int = 0,
                            tokenizer=None, device: str = "cpu") -> Path:
    """Random weights for a real architecture as sharded safetensors, config and tokenizer: the files save_pretrained
    writes, shard for shard.

    Written through huggingface_hub rather than model.save_pretrained: inside a process group transformers (5.24)
    writes the model files on rank 0 only, whatever is_main_process says, and the rank that builds the default model
    (tiny_checkpoint) may be any rank. The names are save_pretrained's all the same: its own revert_weight_conversion
    writes a mixture-of-experts layer's fused 3-D experts one per expert, as the checkpoints on the Hub hold them.
    device="cuda" initialises an 8B model in seconds instead of minutes.
    """
    with torch.random.fork_rng(devices=[device] if device != "cpu" else []):  # the caller's RNG stays as it was
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})  # a tied lm_head is saved once, as the embedding
    state = {name: t for name, t in model.state_dict().items() if name not in tied}
    # An expert split off its fused tensor is a view into it; safetensors stores a tensor only with its whole storage
    state = {name: t if name in state else t.clone() for name, t in revert_weight_conversion(model, state).items()}
    save_torch_state_dict(state, out_dir, max_shard_size=max_shard_size, metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(out_dir)
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def tiny_checkpoint(cache_dir: Path | None = None) -> Path:
    """The built-in model: a 4-layer Llama with a small BPE tokenizer, built once into the cache."""
    return cached_checkpoint("tiny-llama-v2", _build_tiny, cache_dir)


def cached_checkpoint(name: str, build: Callable[[Path], None], cache_dir: Path | None = None) -> Path:
    """The checkpoint folder `name` in the cache (~/.cache/fsdp_qlora, or under $XDG_CACHE_HOME), which `build(folder)`
    writes once.

    Every rank (and every job sharing the cache) may get here at once, and a folder may be left incomplete by a crash
    or by an older version of its builder: one process builds under a file lock while the others wait on it, the
    folder is complete before its name appears, and a folder that does not pass `_is_complete` is rebuilt.
    """
    cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fsdp_qlora"
    target = cache_dir / name
    if _is_complete(target):  # the usual case: no lock taken
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # A lock file in the cache itself, not a barrier: the ranks of a multi-node job may each have their own cache,
    # and a process group may not exist (python train.py, merge.py). The lock is released when the file is closed,
    # also when the holder dies.
    with open(cache_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(target):  # the first holder builds; the others find its folder complete
            _build_atomically(target, build)
    return target


def _build_tiny(folder: Path) -> None:
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        # Tied embeddings and a wide init give a random model logits sharp enough for LoRA alone to learn the task:
        # with 0.02 and a separate lm_head, the built-in task's loss stalls near 3.3 after 60 steps; here it reaches
        # ~0.1.
        tie_word_embeddings=True, initializer_range=0.1,
    )
    write_random_checkpoint(config, folder, max_shard_size="1MB", tokenizer=tokenizer)


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """`build` into a temporary folder beside `target`, then renamed to it (we hold target's lock)."""
    prefix = f".tmp-{target.name}-"
    for stale in target.parent.glob(prefix + "*"):  # from builders that were killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))  # beside the target: the rename is atomic
    try:
        build(tmp)
        if not _is_complete(tmp):
            raise model_loading.ModelFolderError(f"building {target.name} in {tmp} left an incomplete folder")
        for file in tmp.iterdir():  # on disk before the name appears: a power cut leaves no empty shards behind it
            with file.open("rb") as f:
                os.fsync(f.fileno())
        if target.exists():  # incomplete (checked under the lock): rebuilt, never trusted
            shutil.rmtree(target)
        tmp.rename(target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself
        finally:
            os.close(dir_fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_complete(folder: Path) -> bool:
    """config.json names an architecture, every shard of the index is there with a readable header, the tokenizer
    loads. (A shard's header lists its tensors' offsets; safetensors refuses a file shorter than they say.)"""
    if not (folder / "config.json").is_file():
        return False
    try:
        AutoConfig.from_pretrained(folder)  # no model_type: ValueError
        model_loading.index_weights(folder)  # no index, a missing or truncated shard: ModelFolderError (a ValueError)
        AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError):
        return False
    return True
