"""Load a causal LM from safetensors straight into 4-bit bitsandbytes layers, one tensor at a time.

The path, top to bottom:
  resolve_model_dir   a local folder, or a Hub repo id downloaded into the huggingface_hub cache
  read_config         its config.json, refused unless transformers can build it as a causal LM
  load_tokenizer      the tokenizer saved beside it, or an error that names the folder
  index_checkpoint    which file holds which tensor, validated against the model before any data is read
  build_skeleton      the transformers model on the meta device (no memory), its decoder-layer linears swapped
                      for Linear4bit shells
  load_model          streams every tensor with safe_open, quantizes it on the rank's device, puts it in place;
                      threads copy the next tensors to the GPU meanwhile

Every rank runs this and builds the identical model: FSDP is later told not to broadcast (sync_module_states=False),
and quantization is deterministic, so the same files give the same packed bytes on every rank.
"""
import json
import os
import queue
import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from safetensors import SafetensorError, safe_open
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import quantization

# A tokenizer's vocabulary is in one of these (tokenizer_config.json alone holds none): the fast tokenizers' file,
# sentencepiece models, BPE's vocab.json (with merges.txt), WordPiece's vocab.txt, tiktoken and Mistral's tekken.
TOKENIZER_FILES = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken", "tekken.json")


class CheckpointError(ValueError):
    """A model folder or checkpoint that cannot be loaded; the message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------------------------------------------------
# Where the files are


def resolve_model_dir(model: str) -> Path:
    """A local folder as is; anything shaped like `org/name` from the Hub. (builtin.model_dir adds 'tiny'.)"""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: point --model at a Hugging Face model folder")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise CheckpointError(f"--model {model!r}: no such folder, and not a Hub repo id of the form 'org/name'")
    return _download(model)


def _download(repo_id: str) -> Path:
    # snapshot_download honours HF_HOME (cache location), HF_TOKEN (gated models) and HF_HUB_OFFLINE. Each rank calls it;
    # huggingface_hub's file locks make concurrent downloads into one cache safe, so no rank waits at a barrier for it.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError as e:
        raise CheckpointError(f"{repo_id} is gated: accept its licence on the Hub and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"{repo_id} is not on the Hub (or is private: set HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"cannot download {repo_id}: the Hub is unreachable or HF_HUB_OFFLINE is set, and it is not in the cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}). Download it where there is network "
            f"(`hf download {repo_id}`) or pass a local folder to --model."
        ) from e


def read_config(model_dir: Path) -> PretrainedConfig:
    """config.json of a causal LM this transformers can build; the one check, run before any data is tokenized."""
    file = model_dir / "config.json"
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"cannot read {file}: {e}; it must be the model's config.json") from e
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError) as e:  # an unknown model_type; a field this version cannot parse
        reason = str(e).partition("\n")[0].rstrip(".")
        raise CheckpointError(
            f"cannot read {file} (model_type {model_type!r}) with transformers {transformers.__version__}: {reason}. "
            "Upgrade transformers if the model is newer than it, or check model_type in config.json"
        ) from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CheckpointError(f"{file}: model_type {config.model_type!r} is not a causal LM transformers can build "
                              "(AutoModelForCausalLM has no class for it): --model needs a decoder-only language model")
    return config


def load_tokenizer(model_dir: Path):
    """The tokenizer saved beside the model, or a CheckpointError naming the folder and the fix."""
    fix = f"copy the base model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into {model_dir}"
    if not any(next(model_dir.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): {fix}")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers' and the Rust tokenizers' many types, often naming no file
        raise CheckpointError(f"cannot load the tokenizer in {model_dir} ({e}); if its files are damaged, {fix}") from e


# ----------------------------------------------------------------------------------------------------------------------
# What is in the files


@dataclass
class TensorEntry:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # as the safetensors header names it: "BF16", "F32", "I64", ...


def index_checkpoint(model_dir: Path) -> dict[str, TensorEntry]:
    """Tensor name -> file and shape, from the safetensors headers only (no tensor data is read)."""
    index_file, single_file = model_dir / "model.safetensors.index.json", model_dir / "model.safetensors"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
    elif single_file.is_file():
        files = [single_file]
    else:
        raise CheckpointError(
            f"{model_dir} holds neither model.safetensors.index.json nor model.safetensors; only safetensors "
            "checkpoints are supported (convert .bin weights with transformers' save_pretrained)"
        )
    entries: dict[str, TensorEntry] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"shard {file.name} is listed in {index_file.name} but missing from {model_dir}")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    info = f.get_slice(name)
                    entries[name] = TensorEntry(file, tuple(info.get_shape()), info.get_dtype())
        except SafetensorError as e:
            raise _corrupt(file, e) from e
    return entries


def _corrupt(file: Path, error: SafetensorError) -> CheckpointError:
    return CheckpointError(f"{file} is truncated or corrupt ({error}); download it again")


def check_checkpoint(entries: dict[str, TensorEntry], model: nn.Module) -> dict[Path, list[str]]:
    """Every tensor the model needs is present with its shape, and nothing else: fail before reading any data.

    Returns the tensors to load, grouped by file; harmless extras (old rotary caches, transformers' own list of
    ignorable keys) are left out.
    """
    expected = _expected_shapes(model)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = sorted(set(expected) - set(entries) - tied)
    if missing:
        raise CheckpointError(f"{len(missing)} tensors are missing from the checkpoint, first: {missing[:5]}")
    ignorable = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    ignorable.append(re.compile(r"rotary_emb\.inv_freq"))  # older checkpoints carry rotary caches; rebuilt anyway
    to_load: dict[Path, list[str]] = {}
    for name, entry in entries.items():
        if name not in expected:
            if not any(p.search(name) for p in ignorable):
                raise CheckpointError(f"unexpected tensor {name} in {entry.file.name}: the config does not describe it")
        elif entry.shape != expected[name]:
            raise CheckpointError(
                f"tensor {name} in {entry.file.name} has shape {list(entry.shape)}, "
                f"but the config expects {list(expected[name])}: the shard does not belong to this config.json"
            )
        else:
            to_load.setdefault(entry.file, []).append(name)
    return to_load


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, module in model.named_modules():  # Linear4bit shells: the checkpoint holds the dense (out, in) weight
        if quantization.is_4bit(module):
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
    return shapes


# ----------------------------------------------------------------------------------------------------------------------
# The model


def decoder_layer_class(model: nn.Module) -> type[nn.Module]:
    """The class FSDP wraps as one unit: transformers names it in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if len(classes) != 1:
        raise CheckpointError(
            f"{type(model).__name__} does not name exactly one decoder-layer class in _no_split_modules "
            f"(found {sorted(c.__name__ for c in classes)}); this architecture cannot be wrapped layer by layer"
        )
    return classes.pop()


def build_skeleton(config: PretrainedConfig, quant: str, attn_implementation: str | None = None) -> nn.Module:
    """The model on the meta device, with every nn.Linear inside the decoder layers replaced by a Linear4bit shell."""
    with torch.device("meta"):  # `config` from read_config, which refuses what AutoModelForCausalLM cannot build
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn_implementation)
    layer_cls = decoder_layer_class(model)
    if quant != "none":
        for layer in (m for m in model.modules() if isinstance(m, layer_cls)):
            for name, linear in list(layer.named_modules()):
                if type(linear) is nn.Linear:
                    layer.set_submodule(name, quantization.linear4bit_shell(linear, quant))
    return model


def load_model(model_dir: Path, quant: str = quantization.DEFAULT, device: torch.device | str = "cpu",
               progress: bool = True, attn_implementation: str | None = None,
               keep_on: torch.device | str | None = None) -> nn.Module:
    """Build the model from `model_dir`, streaming one tensor at a time onto `device`; all parameters frozen.

    attn_implementation: transformers' name ("sdpa", "flash_attention_2", ...); None lets transformers choose.
    keep_on: where the quantized tensors then wait (default: `device`). "cpu" keeps a model larger than one GPU off
    it: FSDP moves one unit at a time to the GPU as it wraps it, keeping only this rank's shard there.
    """
    if quant not in quantization.QUANT_TYPES:
        raise CheckpointError(f"--quant {quant!r}: choose one of {quantization.QUANT_TYPES}")
    device = torch.device(device)
    keep_on = torch.device(keep_on) if keep_on is not None else device
    model = build_skeleton(read_config(model_dir), quant, attn_implementation)
    _init_nonpersistent_buffers(model, keep_on)
    by_file = check_checkpoint(index_checkpoint(model_dir), model)

    quantized = {f"{name}.weight" for name, module in model.named_modules() if quantization.is_4bit(module)}
    where = {name: device if name in quantized else keep_on for names in by_file.values() for name in names}
    bar = tqdm(total=len(where), desc="loading", unit="tensor", disable=not progress)
    for name, tensor in _read_ahead(by_file, where):
        _put(model, name, tensor, device, keep_on)
        bar.update()
    bar.close()
    model.tie_weights()  # tied lm_head (Gemma, small Qwen/Llama) points at the loaded embedding again
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"these tensors were never loaded: {leftover[:5]}")
    model.requires_grad_(False)
    model.config.use_cache = False  # training: no KV cache
    return model


def _read_ahead(by_file: dict[Path, list[str]], where: dict[str, torch.device], threads: int = 8,
                chunk_bytes: int = 16 << 20):
    """(name, tensor on where[name]) for every tensor of `by_file`, in order, read by `threads` threads up to
    `threads` tensors ahead of the caller, who quantizes meanwhile. A tensor for the CPU is the file's own memory map.
    """
    gpu = next((d for d in where.values() if d.type == "cuda"), None)
    with ExitStack() as files, ThreadPoolExecutor(threads) as pool:
        handles = {file: files.enter_context(_open_shard(file)) for file in by_file}
        copier = _PinnedCopier(gpu, threads, chunk_bytes) if gpu is not None else None

        def read(file: Path, name: str) -> tuple[str, torch.Tensor, torch.cuda.Event | None]:
            try:
                tensor = handles[file].get_tensor(name)
            except SafetensorError as e:
                raise _corrupt(file, e) from e
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


def _open_shard(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as e:
        raise _corrupt(file, e) from e


class _PinnedCopier:
    """Copies CPU tensors to one GPU from several threads at once, through page-locked staging buffers.

    From pageable memory (the file's memory map), a copy to the GPU ran at about 8 GB/s, and copies from several
    threads did not overlap: an 8B model's 16 GB took 1.6-2.1 s with 1 to 16 threads. Through this class, 8 threads
    moved the same 16 GB in 0.6-0.7 s (one H100 host, BENCHMARKS.md). Each thread takes a stream and two buffers,
    filling one while the other is being copied from; the buffers, 2 x 16 MB per thread, are allocated once (and stay
    in torch's page-locked memory cache).
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


def _put(model: nn.Module, name: str, tensor: torch.Tensor, device: torch.device, keep_on: torch.device) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if quantization.is_4bit(module) and attr == "weight":  # quantized on `device`; .to moves quant_state along
        module.weight = quantization.quantize(tensor.to(device), module.weight.quant_type, device, module).to(keep_on)
        return
    tensor = tensor.to(device=keep_on, dtype=torch.bfloat16)  # the rest goes where it waits, with no round trip
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def _init_nonpersistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers not in the checkpoint (rotary inv_freq, Gemma's embed_scale) are recomputed by transformers' own init.

    Runs while the parameters are still on meta, so the init that transformers also applies to them is a no-op.
    inv_freq stays fp32 as transformers creates it: rounding it to bf16 shifts every rotary angle (logits moved by ~6e-3).
    """
    for owner in model.modules():
        names = [n for n in owner._non_persistent_buffers_set if owner._buffers.get(n) is not None]
        for attr in names:
            owner._buffers[attr] = torch.empty_like(owner._buffers[attr], device=device)
        if names:
            model._init_weights(owner)
