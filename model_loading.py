"""A model folder -> a 4-bit model on a device: a causal LM loaded from safetensors straight into 4-bit bitsandbytes
layers, one tensor at a time.

The path, top to bottom:
  resolve_model_dir   a local folder, or a Hub repo id downloaded into the huggingface_hub cache
  read_config         its config.json, refused unless transformers can build it as a causal LM from weights we can
                      read: 16-bit, or pre-quantized by bitsandbytes to 4 bits (resolve_quant: which --quant applies)
  load_tokenizer      the tokenizer saved beside it, or an error that names the folder
  index_weights       which file holds which tensor, validated against the model before any data is read
  build_skeleton      the transformers model on the meta device (no memory), its decoder-layer linears swapped
                      for Linear4bit shells and MoE experts for Packed4bit ones (in a pre-quantized model
                      folder: those it stores in 4 bits)
  host_bytes          the loaded model's size in host memory, from the headers (host_memory.py sets it against
                      what the node has)
  load_model          streams every tensor with safe_open, quantizes it on the rank's device, puts it in place;
                      threads copy the next tensors to the GPU meanwhile (shard_reader). A pre-quantized weight
                      arrives with its quant_state entries and goes in as its packed bytes are (dequantized only
                      where the model keeps a linear in bf16: lm_head, or all of them with --quant none)

Every rank runs this and builds the identical model: FSDP is later told not to broadcast (sync_module_states=False),
and quantization is deterministic, so the same files give the same packed bytes on every rank.

What bitsandbytes' stored format means (quant_state entries, packed sizes) is quantization.py's to say; here the
"weights" are a model folder's safetensors shards (not a training run's checkpoint-N).
"""
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from safetensors import SafetensorError, safe_open
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import cli
import conversions
import quantization
import shard_reader

# A tokenizer's vocabulary is in one of these (tokenizer_config.json alone holds none): the fast tokenizers' file,
# sentencepiece models, BPE's vocab.json (with merges.txt), WordPiece's vocab.txt, tiktoken and Mistral's tekken.
TOKENIZER_FILES = ("tokenizer.json", "*.model", "vocab.json", "vocab.txt", "*.tiktoken", "tekken.json")
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


class ModelFolderError(cli.Refusal):
    """A model folder that cannot be loaded (its config, tokenizer or weights); the message says what is wrong and how
    to fix it."""


# ----------------------------------------------------------------------------------------------------------------------
# Where the files are


def resolve_model_dir(model: str) -> Path:
    """A local folder as is; anything shaped like `org/name` from the Hub. (builtin.model_dir adds 'tiny'.)"""
    path = Path(model).expanduser()
    if path.is_file():
        raise ModelFolderError(f"--model {path} is a file: point --model at the Hugging Face model folder holding it "
                               "(config.json and safetensors weights)")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():  # a run's output_dir
        try:
            base = f", {json.loads((path / 'adapter_config.json').read_text())['base_model_name_or_path']!r},"
        except (OSError, ValueError, TypeError, KeyError):  # a damaged config still tells what the folder is
            base = ""
        raise ModelFolderError(f"--model {path} is an adapter folder (adapter_config.json), not a model: pass its "
                               f"base{base} as --model (merge.py and generate.py take this folder as --adapter)")
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelFolderError(f"{path} has no config.json: point --model at a Hugging Face model folder")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise ModelFolderError(f"--model {model!r}: no such folder, and not a Hub repo id of the form 'org/name'")
    return _download(model)


def _download(repo_id: str) -> Path:
    # snapshot_download honours HF_HOME (cache location), HF_TOKEN (gated models) and HF_HUB_OFFLINE. Each rank calls
    # it; huggingface_hub's file locks make concurrent downloads into one cache safe, so no rank waits at a barrier.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except GatedRepoError as e:
        raise ModelFolderError(f"{repo_id} is gated: accept its licence on the Hub and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise ModelFolderError(f"{repo_id} is not on the Hub (or is private: set HF_TOKEN)") from e
    except LocalEntryNotFoundError as e:
        raise ModelFolderError(
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
        raise ModelFolderError(f"cannot read {file}: {e}; it must be the model's config.json") from e
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, OSError) as e:  # an unknown model_type; a field this version cannot parse
        reason = str(e).partition("\n")[0].rstrip(".")
        raise ModelFolderError(
            f"cannot read {file} (model_type {model_type!r}) with transformers {transformers.__version__}: {reason}. "
            "Upgrade transformers if the model is newer than it, or check model_type in config.json"
        ) from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelFolderError(f"{file}: model_type {config.model_type!r} is not a causal LM transformers can build "
                               "(AutoModelForCausalLM has no class for it): --model needs a decoder-only language "
                               "model")
    try:
        quantization.stored_quant(getattr(config, "quantization_config", None))
    except ValueError as e:  # quantized in a way we cannot read: every method but bitsandbytes 4-bit
        raise ModelFolderError(f"{file}: {e}. point --model at the 16-bit original; `python quantize.py` writes a "
                               "bitsandbytes 4-bit copy of it that loads here") from e
    return config


def weights_quant(config: PretrainedConfig) -> str | None:
    """The 4-bit type ("nf4" or "fp4") of pre-quantized weights (quantization.stored_quant); None for 16-bit ones
    (read_config has refused every other quantization)."""
    return quantization.stored_quant(getattr(config, "quantization_config", None))


def resolve_quant(config: PretrainedConfig, quant: str, default: str = quantization.DEFAULT, log=None) -> str:
    """--quant as it applies to this model folder. auto: pre-quantized weights' own 4-bit type (said through `log`),
    else `default`. Pre-quantized weights also take their own type, or none (dequantized to bf16); another 4-bit type
    is refused: the 16-bit weights it would be quantized from are not in the folder."""
    choices = (quantization.AUTO, *quantization.QUANT_TYPES)
    if quant not in choices:
        raise ModelFolderError(f"--quant {quant!r}: choose one of {choices}")
    stored = weights_quant(config)
    if stored is None:
        return default if quant == quantization.AUTO else quant
    where = f"{Path(config.name_or_path) / 'config.json'} says the checkpoint is pre-quantized to {stored}"
    if quant not in (quantization.AUTO, stored, "none"):
        raise ModelFolderError(f"--quant {quant}, but {where}: the 16-bit weights that {quant} would be quantized "
                               f"from are not in it. Leave --quant at {quantization.AUTO} (or pass {stored}) to use "
                               f"its own {stored} weights, or point --model at the 16-bit original")
    if log and quant != stored:
        log(f"{where}: " + ("its packed 4-bit weights are used as they are" if quant == quantization.AUTO else
                            "--quant none dequantizes them to bf16 (the 4-bit rounding stays in the weights)"))
    return stored if quant == quantization.AUTO else quant


def load_tokenizer(model_dir: Path):
    """The tokenizer saved beside the model, or a ModelFolderError naming the folder and the fix."""
    fix = f"copy the base model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into {model_dir}"
    if not any(next(model_dir.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise ModelFolderError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): {fix}")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers' and the Rust tokenizers' many types, often naming no file
        raise ModelFolderError(f"cannot load the tokenizer in {model_dir} ({e}); if its files are damaged, "
                               f"{fix}") from e


# ----------------------------------------------------------------------------------------------------------------------
# What is in the files


@dataclass
class TensorEntry:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # as the safetensors header names it: "BF16", "F32", "I64", ...

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype].itemsize


def index_weights(model_dir: Path) -> dict[str, TensorEntry]:
    """Tensor name -> file and shape, from the safetensors headers only (no tensor data is read)."""
    index_file, single_file = model_dir / "model.safetensors.index.json", model_dir / "model.safetensors"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
    elif single_file.is_file():
        files = [single_file]
    else:
        raise ModelFolderError(
            f"{model_dir} holds neither model.safetensors.index.json nor model.safetensors; only safetensors "
            "checkpoints are supported (convert .bin weights with transformers' save_pretrained)"
        )
    entries: dict[str, TensorEntry] = {}
    for file in files:
        if not file.is_file():
            raise ModelFolderError(f"shard {file.name} is listed in {index_file.name} but missing from {model_dir}")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    info = f.get_slice(name)
                    entries[name] = TensorEntry(file, tuple(info.get_shape()), info.get_dtype())
        except SafetensorError as e:
            raise shard_reader.corrupt(file, e, ModelFolderError) from e
    return entries


QUANTIZED_FROM = "quantized_from.json"  # quantize.py's record of its source folder and that folder's fingerprint


def fingerprint(model_dir: Path) -> str:
    """A hash of config.json, the shard index, and each shard's header and first 64 KiB of weights.

    Reads ~100 KB per shard, not the weights: enough to tell two models (or two fine-tunes of one) apart, and the
    same for one model in any folder. Volatile config keys (the transformers version that saved it) are left out.
    A folder quantize.py wrote is its 16-bit source's base (the packed bytes the loader makes of that source), so it
    has the source's fingerprint: an adapter trained on either merges into the original, as QLoRA adapters are.
    """
    if (record := model_dir / QUANTIZED_FROM).is_file():
        return json.loads(record.read_text())["fingerprint"]
    h = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        h.update(json.dumps(json.loads(index.read_text())["weight_map"], sort_keys=True).encode())
    for shard in sorted({e.file for e in index_weights(model_dir).values()}):
        with shard.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")  # safetensors: u64 header size, JSON header, data
            h.update(shard.name.encode() + f.read(header_len + 2**16))
    return h.hexdigest()[:16]


def packed_weights(entries: dict[str, TensorEntry], quant: str | None) -> dict[str, list[str]]:
    """The 4-bit weights of a model folder pre-quantized to `quant` (None: 16-bit weights, none of them 4-bit):
    each weight's name -> the names of its entries, the packed bytes first (quantization.prequantized_weights).
    config.json's word against the weights' own quant_state entries: without any, the folder holds 16-bit weights
    (which would load as they are, all while 'pre-quantized'); with another type's, config.json is what is wrong."""
    if quant is not None and entries:
        states = sorted(name for name in entries if quantization.STATE_KEY in name)
        config = next(iter(entries.values())).file.parent / "config.json"
        says = f"{config} says the weights are bitsandbytes {quant}"
        if not states:
            raise ModelFolderError(f"{says}, but none of them has quant_state entries: they are 16-bit weights. "
                                   "remove quantization_config from config.json to load them as such, or download "
                                   "the pre-quantized checkpoint again")
        if not any(name.endswith(quantization.STATE_KEY + quant) for name in states):
            raise ModelFolderError(f"{says}, but their quant_state entries are of another type ({states[0]}): "
                                   "correct quantization_config.bnb_4bit_quant_type in config.json")
    try:
        return quantization.prequantized_weights(entries, quant)
    except ValueError as e:
        raise ModelFolderError(f"{e}: the file is damaged or incomplete; download it again") from e


def check_weights(entries: dict[str, TensorEntry], model: nn.Module, packed: dict[str, list[str]] | None = None,
                  sources: dict[str, dict[str, tuple[int, ...]]] | None = None) -> dict[Path, list[str]]:
    """Every tensor the model needs is present with its shape, and nothing else: fail before reading any data.
    `packed`: the 4-bit weights of a pre-quantized model folder (packed_weights), checked for the bytes their shape
    packs into; their quant_state entries go with them. A mixture-of-experts layer's experts may be stored fused, as
    the model holds them, or one per expert, as save_pretrained writes them (`sources`: weights_sources, found here
    if not given).

    Returns the tensors to load, grouped by file; harmless extras (old rotary caches, transformers' own list of
    ignorable keys) are left out.
    """
    packed = packed or {}
    owner = _owners(packed)
    sources = weights_sources(entries, model) if sources is None else sources
    expected = {name: shape for names in sources.values() for name, shape in names.items()}  # by stored name
    ignorable = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    ignorable.append(re.compile(r"rotary_emb\.inv_freq"))  # older model folders carry rotary caches; rebuilt anyway
    to_load: dict[Path, list[str]] = {}
    for name, entry in entries.items():
        weight = owner.get(name, name)  # a quant_state entry belongs to its weight
        if weight not in expected:
            if not any(p.search(name) for p in ignorable):
                raise ModelFolderError(f"unexpected tensor {name} in {entry.file.name}: the config does not "
                                       "describe it")
            continue
        if name in packed and not quantization.holds_packed(entry.shape, entry.nbytes, expected[name]):
            raise ModelFolderError(
                f"tensor {name} in {entry.file.name} holds {list(entry.shape)} {entry.dtype} of packed 4-bit codes, "
                f"but the config's {list(expected[name])} weight packs into "
                f"({quantization.packed_bytes(expected[name])}, 1) bytes: the shard does not belong to this "
                "config.json")
        if name not in owner and packed and quantization.holds_packed(entry.shape, entry.nbytes, expected[name]):
            raise ModelFolderError(  # a 4-bit weight that lost all its quant_state entries, not another model's
                f"tensor {name} in {entry.file.name} holds the packed 4-bit codes of the config's "
                f"{list(expected[name])} weight, but the checkpoint has none of its quant_state entries: the file is "
                "damaged or incomplete; download it again")
        if name not in owner and entry.shape != expected[name]:
            raise ModelFolderError(
                f"tensor {name} in {entry.file.name} has shape {list(entry.shape)}, "
                f"but the config expects {list(expected[name])}: the shard does not belong to this config.json"
            )
        to_load.setdefault(entry.file, []).append(name)
    return to_load


def weights_sources(entries: dict[str, TensorEntry], model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """Model tensor -> {stored name: shape} it is read from: itself, or the names save_pretrained gives it (a layer's
    experts one by one, Mixtral's block_sparse_moe for mlp), whichever the model folder holds. A ModelFolderError
    names what is missing: a single expert when the others of its layer are there."""
    shapes = _expected_shapes(model)
    layout = conversions.saved_layout(model, shapes)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    chosen, missing, partial = conversions.sources(layout, entries, tied)
    if partial:
        source, name = partial[0]
        raise ModelFolderError(f"{source} is missing from the checkpoint, which has the other tensors that fuse into "
                               f"{name} ({len(partial)} missing in all): the checkpoint is incomplete or damaged; "
                               "download it again")
    if missing:
        raise ModelFolderError(f"{len(missing)} tensors are missing from the checkpoint, first: {missing[:5]}")
    return {name: ({name: shapes[name]} if names == [name] else {n: layout[name][n] for n in names})
            for name, names in chosen.items()}


def _owners(packed: dict[str, list[str]]) -> dict[str, str]:
    """Every entry of a pre-quantized 4-bit weight (its packed bytes too) -> the weight's name."""
    return {part: weight for weight, parts in packed.items() for part in parts}


def _expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, module in model.named_modules():  # Linear4bit shells: the folder holds the dense (out, in) weight
        if quantization.is_4bit(module):
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
        if isinstance(module, quantization.Packed4bit):  # an MoE layer's experts: their dense 3-D tensor
            del shapes[f"{name}.weight"]
            shapes[quantization.dense_name(name)] = module.shape
    return shapes


# ----------------------------------------------------------------------------------------------------------------------
# The model


def decoder_layer_class(model: nn.Module) -> type[nn.Module]:
    """The class FSDP wraps as one unit: transformers names it in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if len(classes) != 1:
        raise ModelFolderError(
            f"{type(model).__name__} does not name exactly one decoder-layer class in _no_split_modules "
            f"(found {sorted(c.__name__ for c in classes)}); this architecture cannot be wrapped layer by layer"
        )
    return classes.pop()


def moe_routers(model: nn.Module) -> set[str]:
    """The linears of a mixture-of-experts block that route rather than compute: those beside its `experts`, not in
    them (PhiMoE's and Llama 4's router, Qwen2-MoE's shared_expert_gate). They stay bf16 (a 4-bit router would
    reroute tokens) and out of "all-linear". Found by where they sit, because nothing else is common to them: their
    names (gate, router, shared_expert_gate) and widths (the number of experts, or 1) differ, and most routers of
    transformers 5 are no nn.Linear at all (a bare weight, never quantized). A shared expert is a module of its own:
    its linears are quantized and adapted."""
    blocks = {name for name, module in model.named_modules() if isinstance(getattr(module, "experts", None), nn.Module)}
    return {name for name, module in model.named_modules()
            if hasattr(module, "in_features") and name.rpartition(".")[0] in blocks}


def build_skeleton(config: PretrainedConfig, quant: str, attn_implementation: str | None = None,
                   only: set[str] | None = None) -> nn.Module:
    """The model on the meta device, with every nn.Linear inside the decoder layers but the MoE routers replaced by a
    Linear4bit shell, and the MoE experts' 3-D weights by Packed4bit ones; with `only` (the 4-bit weights of a
    pre-quantized model folder, a linear's without ".weight"), what it names: what the folder keeps in 16 bits
    (llm_int8_skip_modules, and the experts as transformers saves them) stays so, as transformers builds it. Experts
    that quantize.py --quantize_experts wrote in 4 bits are named by their 3-D tensors
    (`...mlp.experts.gate_up_proj`)."""
    with torch.device("meta"):  # `config` from read_config, which refuses what AutoModelForCausalLM cannot build
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn_implementation)
    layer_cls = decoder_layer_class(model)
    if quant != "none":
        routers = moe_routers(model)
        for prefix, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, layer_cls)]:
            for name, module in list(layer.named_modules()):
                path = f"{prefix}.{name}"
                if type(module) is nn.Linear and (path in only if only is not None else path not in routers):
                    layer.set_submodule(name, quantization.linear4bit_shell(module, quant))
                elif only is None or _packed_in_weights(module, path, only):  # MoE experts' 3-D weights
                    quantization.pack_experts(module, quant)
    return model


def _packed_in_weights(module: nn.Module, path: str, only: set[str]) -> bool:
    """Whether pre-quantized weights store this module's 3-D (experts) tensors in 4 bits. transformers' own
    bitsandbytes model folders store them in 16 bits, and so does quantize.py unless --quantize_experts; pack_experts
    packs all of a module's, so one stored in 4 bits and another in 16 would be quantized at load."""
    return any(f"{path}.{name}" in only for name, p in module.named_parameters(recurse=False) if p.dim() == 3)


def quantized_weights(model: nn.Module) -> set[str]:
    """The names of the weights that are 4-bit in `model`: those of its Linear4bit modules, and the experts' 3-D
    tensors (Packed4bit), by the names the model gives them."""
    linears = {f"{name}.weight" for name, module in model.named_modules() if quantization.is_4bit(module)}
    return linears | quantization.packed_shells(model).keys()


@dataclass
class LoadPlan:
    """What load_model will build and read, known from config.json and the safetensors headers alone."""
    model: nn.Module  # the skeleton, on meta
    entries: dict[str, TensorEntry]
    by_file: dict[Path, list[str]]  # the tensors to read, file by file (check_weights)
    packed: dict[str, list[str]]  # a pre-quantized folder's 4-bit weights -> their entries (packed_weights)
    # model tensors read from other names -> those names (weights_sources): experts one per expert, renamed blocks
    sources: dict[str, list[str]]


def plan_load(model_dir: Path, quant: str, attn_implementation: str | None = None) -> LoadPlan:
    """The skeleton for `quant` (resolve_quant), checked against the safetensors headers; no tensor data is read."""
    config = read_config(model_dir)
    quant, stored = resolve_quant(config, quant), weights_quant(config)
    entries = index_weights(model_dir)
    packed = packed_weights(entries, stored)
    only = None if stored is None else {weight.removesuffix(".weight") for weight in packed}
    model = build_skeleton(config, quant, attn_implementation, only)
    sources = weights_sources(entries, model)
    by_file = check_weights(entries, model, packed, sources)
    renamed = {name: list(names) for name, names in sources.items() if [*names] != [name]}
    return LoadPlan(model, entries, by_file, packed, renamed)


def fused_into(plan: LoadPlan) -> dict[str, str]:
    """Every stored tensor read under another name (LoadPlan.sources) -> the model tensor it goes into."""
    return {source: name for name, sources in plan.sources.items() for source in sources}


def host_bytes(plan: LoadPlan) -> int:
    """Bytes of the model load_model builds, estimated from the headers: 4-bit weights as quantized (or as stored),
    everything else in bf16. What --cpu_offload keeps in host memory, summed over the ranks of a node."""
    shells = quantized_weights(plan.model)
    shapes, owner = _expected_shapes(plan.model), _owners(plan.packed)
    target_of = fused_into(plan)
    total = 0
    for name in (name for names in plan.by_file.values() for name in names):
        weight, shape = owner.get(name, name), plan.entries[name].shape  # checked: a 16-bit tensor's shape is its own
        if weight in plan.packed and weight not in shells:  # dequantized to bf16, its quant_state dropped
            total += 2 * math.prod(shapes[weight]) if name == weight else 0
        elif weight in plan.packed:
            total += plan.entries[name].nbytes
        elif target_of.get(name, name) in shells:  # an expert stored alone counts as its share of the fused tensor
            total += quantization.quantized_bytes(shape)
        else:
            total += 2 * math.prod(shape)
    return total


def load_model(model_dir: Path, quant: str = quantization.AUTO, device: torch.device | str = "cpu",
               progress: bool = True, attn_implementation: str | None = None,
               keep_on: torch.device | str | None = None) -> nn.Module:
    """Build the model from `model_dir`, streaming one tensor at a time onto `device`; all parameters frozen.

    quant: nf4, fp4, none, or auto (resolve_quant). Pre-quantized 4-bit weights are not quantized again: their
    stored bytes and quant_state go into the Linear4bit as they are.
    attn_implementation: transformers' name ("sdpa", "flash_attention_2", ...); None lets transformers choose.
    keep_on: where the quantized tensors then wait (default: `device`). "cpu" keeps a model larger than one GPU off
    it: FSDP moves one unit at a time to the GPU as it wraps it, keeping only this rank's shard there.
    """
    device = torch.device(device)
    keep_on = torch.device(keep_on) if keep_on is not None else device
    plan = plan_load(model_dir, quant, attn_implementation)
    model, owner = plan.model, _owners(plan.packed)
    _init_nonpersistent_buffers(model, keep_on)

    # A tensor goes to `device` when there is work to do on it there: a 16-bit weight to quantize, or a pre-quantized
    # one to dequantize (a linear the model keeps in bf16). The rest, pre-quantized weights for a shell included, goes
    # straight where it waits.
    quantized, where = quantized_weights(model), {}
    target_of = fused_into(plan)
    for name in (name for names in plan.by_file.values() for name in names):
        weight = owner.get(name, target_of.get(name, name))  # an expert is quantized with the others of its layer
        to_quantize = weight in quantized and weight not in plan.packed
        to_dequantize = weight in plan.packed and weight not in quantized
        where[name] = device if to_quantize or to_dequantize else keep_on
    bar = tqdm(total=len(where), desc="loading", unit="tensor", disable=not progress)
    tensors = conversions.fuse(shard_reader.read_ahead(plan.by_file, where, error=ModelFolderError), plan.sources,
                               model)
    for name, tensor, stored in _assemble(tensors, plan.packed):
        read_as = plan.sources.get(name, [name])
        _put(model, name, tensor, stored, device, keep_on, plan.entries[read_as[0]].file)
        bar.update(len(stored) if stored else len(read_as))
    bar.close()
    model.tie_weights()  # tied lm_head (Gemma, small Qwen/Llama) points at the loaded embedding again
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ModelFolderError(f"these tensors were never loaded: {leftover[:5]}")
    model.requires_grad_(False)
    model.config.use_cache = False  # training: no KV cache
    return model


def _assemble(tensors, packed: dict[str, list[str]]):
    """(name, tensor, None) for each tensor, but (weight, packed bytes, {stored name: tensor} of all its entries) for
    a pre-quantized weight, once all its entries have arrived (they are neighbours in the files, so few wait at a
    time)."""
    owner, waiting = _owners(packed), {}
    for name, tensor in tensors:
        if name not in owner:
            yield name, tensor, None
            continue
        weight = owner[name]
        parts = waiting.setdefault(weight, {})
        parts[name] = tensor
        if len(parts) == len(packed[weight]):
            del waiting[weight]
            yield weight, parts[weight], parts


def unpack_4bit(name: str, stored: dict[str, torch.Tensor], shape: tuple[int, ...], file: Path,
                module: nn.Module | None = None):
    """The pre-quantized weight `name` from its stored entries (by their names, the packed bytes under `name`) as a
    Params4bit, on the device its tensors are on (quantization.from_prequantized), or a ModelFolderError naming it."""
    try:
        return quantization.from_prequantized(name, stored, shape, stored[name].device, module)
    except ValueError as e:
        raise ModelFolderError(f"the 4-bit weight {name} in {file.name} cannot be used: {e}. The checkpoint is "
                               "damaged or was not written by bitsandbytes; download it again") from e


def _put(model: nn.Module, name: str, tensor: torch.Tensor, stored: dict[str, torch.Tensor] | None,
         device: torch.device, keep_on: torch.device, file: Path) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    packed = getattr(module, "packed", None)
    experts = packed[attr] if isinstance(packed, nn.ModuleDict) and attr in packed else None  # a Packed4bit
    if stored is not None:  # pre-quantized: the packed bytes and quant_state as stored, read onto keep_on for a shell
        if experts is not None:
            shell, shape = experts, experts.shape
        elif quantization.is_4bit(module):
            shell, shape = module, (module.out_features, module.in_features)
        else:  # a weight the model keeps in bf16: the shape of its tensor on meta
            shell, shape = None, tuple(getattr(module, attr).shape)
        weight = unpack_4bit(name, stored, shape, file, shell)
        if shell is not None:
            shell.weight = weight
            return
        tensor = quantization.dequantize(weight)  # a weight the model keeps in bf16 (lm_head; all with --quant none)
    if quantization.is_4bit(module) and attr == "weight":  # quantized on `device`; .to moves quant_state along
        module.weight = quantization.quantize(tensor.to(device), module.weight.quant_type, device, module).to(keep_on)
        return
    if experts is not None:  # an MoE layer's experts, all of them at once
        experts.weight = quantization.quantize(tensor.to(device), experts.quant_type, device, experts).to(keep_on)
        return
    tensor = tensor.to(device=keep_on, dtype=torch.bfloat16)  # the rest goes where it waits, with no round trip
    if attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def _init_nonpersistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers not in the model folder (rotary inv_freq, Gemma's embed_scale) are recomputed by transformers' own init.

    Runs while the parameters are still on meta, so the init that transformers also applies to them is a no-op.
    inv_freq stays fp32 as transformers creates it: rounding it to bf16 shifts every rotary angle (logits moved by
    ~6e-3).
    """
    for owner in model.modules():
        names = [n for n in owner._non_persistent_buffers_set if owner._buffers.get(n) is not None]
        for attr in names:
            owner._buffers[attr] = torch.empty_like(owner._buffers[attr], device=device)
        if names:
            model._init_weights(owner)
