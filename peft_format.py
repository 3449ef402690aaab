"""The PEFT adapter folder: adapter_model.safetensors, with keys "base_model.model.<path>.lora_A.weight", and
adapter_config.json. Saving, loading, reading the config, applying an adapter for inference, and vLLM's rank rules.

PEFT loads such a folder as it is (tests/test_lora.py), and vLLM serves it (no modules_to_save, no DoRA) at a rank up
to its --max-lora-rank. The file's metadata also records the base's fingerprint, where neither looks.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dora
import lora
import model_loading
import moe_lora
import out_folder
from lora import AdapterError
from settings import EXPERTS

PEFT_PREFIX = "base_model.model."  # PEFT names every key after the path of the LoRA layer inside its wrapper


def peft_key(key: str) -> str:
    """"<path>.lora_A.weight" as PEFT's adapter file names it: after the path of the model inside PEFT's wrappers.
    DoRA's magnitude, a parameter of PEFT's layer and not a module's weight, is "<path>.lora_magnitude_vector"."""
    return PEFT_PREFIX + (key.removesuffix(".weight") if key.endswith(f".{dora.MAGNITUDE}.weight") else key)


def peft_keys(keys) -> dict[str, str]:
    """lora.adapter_weights' keys (in its order) -> the adapter file's.

    PEFT adapts a parameter by wrapping its module in a ParamWrapper; a second parameter of the same module wraps
    that wrapper again, in the order the module declares its parameters (tuners_utils' _inject_parameters walks
    named_parameters). So the LAST declared tensor's factors sit at "<experts>.lora_A.weight", the one before it at
    "<experts>.base_layer.lora_A.weight", and so on: gate_up_proj, then down_proj, gives down_proj the outer one.
    """
    keys, renamed = list(keys), {}
    tensors = {}  # "<experts>" -> its adapted tensors in order
    for key in keys:
        if ".lora_experts." in key:
            experts, _, rest = key.partition(".lora_experts.")
            names = tensors.setdefault(experts, [])
            if rest.split(".")[0] not in names:
                names.append(rest.split(".")[0])
    for key in keys:
        if ".lora_experts." not in key:
            renamed[key] = peft_key(key)
            continue
        experts, _, rest = key.partition(".lora_experts.")
        name, _, factor = rest.partition(".")
        depth = len(tensors[experts]) - 1 - tensors[experts].index(name)
        renamed[key] = peft_key(f"{experts}.{'base_layer.' * depth}{factor}")
    return renamed


def expert_peft_keys(tensors: list[str]) -> dict[str, tuple[str, str]]:
    """Experts tensors, "<experts path>.<tensor>" as expert_tensors names them (in its order) -> the adapter file's
    keys of their lora_A and lora_B (peft_keys), for a reader of the file that has no model to inject (merge.py)."""
    factors = {t: [f"{t.rpartition('.')[0]}.lora_experts.{t.rpartition('.')[2]}.{ab}.weight" for ab in lora.FACTORS]
               for t in tensors}
    renamed = peft_keys(key for pair in factors.values() for key in pair)
    return {t: (renamed[a], renamed[b]) for t, (a, b) in factors.items()}


def expert_targets(keys) -> list[str]:
    """target_parameters for adapter_config.json: "experts.<tensor>" for each adapted experts tensor, which PEFT
    matches as a suffix of "<experts path>.<tensor>"."""
    tensors = {k.partition(".lora_experts.")[2].split(".")[0] for k in keys if ".lora_experts." in k}
    return sorted(f"{EXPERTS}.{name}" for name in tensors)


# The values vLLM's --max-lora-rank takes (vllm/config/lora.py; later releases also take 1). vLLM sizes every
# adapter slot at that rank and copies a smaller adapter into the slot's first rows, zeros after them.
VLLM_MAX_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
BASE_FINGERPRINT = "base_fingerprint"  # the adapter file's metadata key for its base (save_adapter)


def vllm_max_lora_rank(r: int) -> int | None:
    """The --max-lora-rank vLLM serves an adapter of rank r with: the smallest it takes that holds r; None above all."""
    return next((v for v in VLLM_MAX_RANKS if v >= r), None)


def vllm_rank_warning(r: int) -> str | None:
    """Why vLLM will not serve an adapter of rank r as one of its own ranks, or None when it will."""
    up = vllm_max_lora_rank(r)
    if up == r:
        return None
    if up is None:
        return (f"--lora_rank {r} is above {VLLM_MAX_RANKS[-1]}, the largest rank vLLM serves: serve this adapter "
                "merged into its base (merge.py) instead")
    return (f"--lora_rank {r} is not a rank vLLM's --max-lora-rank takes ({', '.join(map(str, VLLM_MAX_RANKS))}): "
            f"vLLM serves this adapter with --max-lora-rank {up}, in slots of that rank (zeros after row {r})")


def save_adapter(state: dict[str, torch.Tensor], out_dir: Path, r: int, alpha: float, dropout: float,
                 base_model: str, base_fingerprint: str | None = None) -> None:
    """`state` maps "<path>.lora_A.weight" / "<path>.lora_B.weight" (and DoRA's "<path>.lora_magnitude_vector.weight")
    to full (unsharded) tensors, lora.adapter_weights' keys. The base's
    model_loading.fingerprint goes into the weights file's metadata (BASE_FINGERPRINT), where PEFT and vLLM do not
    look and from which it never parts: merge.py and generate.py compare it with the base they are given."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = peft_keys(state)
    tensors = {names[k]: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    base = {BASE_FINGERPRINT: base_fingerprint} if base_fingerprint else {}
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt", **base})
    out_folder.readable(out_dir / "adapter_model.safetensors")
    linears = [k for k in state if ".lora_experts." not in k]
    # the layers adapted, never "all-linear": PEFT and vLLM read it
    targets = lora.kinds(k.split(".lora_")[0] for k in linears)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": any(k.endswith(f".{dora.MAGNITUDE}.weight") for k in state),
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    if expert_targets(state):  # MoE experts' tensors (ExpertsLoRA), loaded by PEFT 0.21's ParamWrapper
        config["target_modules"] = targets or None  # PEFT takes an empty list as "no match", None as "none asked"
        config["target_parameters"] = expert_targets(state)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def trained_fingerprint(adapter_dir: Path) -> str | None:
    """The fingerprint of the base the adapter was trained on, as save_adapter records it; None from other tools."""
    with safe_open(str(Path(adapter_dir) / "adapter_model.safetensors"), framework="pt") as f:
        return (f.metadata() or {}).get(BASE_FINGERPRINT)


def load_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Copy a PEFT-format adapter into the LoRALinear modules of an unwrapped model (before FSDP)."""
    tensors = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    weights = lora.adapter_weights(lora.lora_modules(model))
    names = peft_keys(weights)
    wanted = {names[k]: weight for k, weight in weights.items()}
    if set(tensors) != set(wanted):
        missing, unexpected = sorted(wanted.keys() - tensors.keys()), sorted(tensors.keys() - wanted.keys())
        raise AdapterError(f"adapter in {adapter_dir} does not fit this model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]} (different base model, rank or targets?): "
                           f"{_another_base(adapter_dir)}")
    with torch.no_grad():
        for key, dst in wanted.items():
            if tensors[key].shape != dst.shape:
                raise AdapterError(f"{key} has shape {list(tensors[key].shape)} in the adapter in {adapter_dir}, "
                                   f"{list(dst.shape)} here: {_another_base(adapter_dir)}")
            dst.copy_(tensors[key])


def _another_base(adapter_dir: Path) -> str:
    """What a refusal of an adapter that does not fit the model says to do: apply it to the base it names."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return f"it was trained on another base ({config.get('base_model_name_or_path')!r}); apply it to that one"


def read_adapter_config(adapter_dir: Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter we can apply, or an error that says what is missing or unsupported."""
    adapter_dir = Path(adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise AdapterError(f"no {name} in {adapter_dir}: pass --adapter the output_dir of a training run "
                               "(or one of its checkpoint-N folders)")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{adapter_dir / 'adapter_config.json'} is a {config.get('peft_type')} adapter: only LoRA "
                           "and DoRA adapters are supported; merge it into its base with PEFT's merge_and_unload")
    if _unapplied(config):
        field, why = _unapplied(config)[0]
        raise AdapterError(f"{adapter_dir / 'adapter_config.json'} sets {field}: {config[field]!r}, {why}, which "
                           "this loader does not apply (it would compute other logits than PEFT): use the adapter with "
                           "PEFT itself, or merge it into its base with PEFT's merge_and_unload and use that model")
    _check_targets(adapter_dir, config)
    _check_rank(adapter_dir, config)
    _check_dora(adapter_dir, config)
    return config


# adapter_config.json fields that change what a PEFT LoRA adapter computes, beyond what apply_adapter and merge.py
# implement (r, lora_alpha, use_rslora, use_dora, target_modules, target_parameters), with what each does. Refused,
# not ignored: an ignored one gives other logits than PEFT's, at times silently. Off is PEFT's default (None, False,
# {}, [] or "none").
UNAPPLIED = {
    "fan_in_fan_out": "the factors stored transposed (GPT-2's Conv1D)",
    "modules_to_save": "whole modules trained and saved beside the factors",
    "rank_pattern": "another rank for some layers", "alpha_pattern": "another alpha for some layers",
    "bias": "the base layers' biases trained and saved", "lora_bias": "a bias on lora_B",
    "layers_to_transform": "only some decoder layers adapted", "layers_pattern": "only some decoder layers adapted",
    "exclude_modules": "some matching layers left out", "trainable_token_indices": "trained embedding rows",
    "alora_invocation_tokens": "the adapter active only after its invocation tokens (aLoRA)",
    "use_qalora": "A applied to pooled inputs (QA-LoRA)", "layer_replication": "decoder layers repeated",
    "megatron_config": "Megatron's parallel linears", "arrow_config": "routing among adapters (Arrow)",
    "kasa_config": "a learned diagonal between A and B (KaSA)", "monteclora_config": "sampled factors (MonteCLoRA)",
    "use_bdlora": "block-diagonal factors (BD-LoRA)",
}
# init_lora_weights values with which PEFT subtracts the initial adapter from the base weights (PiSSA, OLoRA, CorDA,
# LoftQ, LoRA-GA): the adapter holds the rest, and PEFT redoes that at load, so on the plain base it computes another
# model. PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) converts one to a plain LoRA.
REWRITES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _unapplied(config: dict) -> list[tuple[str, str]]:
    """The fields of adapter_config.json, with what each does, that are on and not applied here (UNAPPLIED)."""
    found = [(field, why) for field, why in UNAPPLIED.items() if config.get(field) not in (None, False, {}, [], "none")]
    if config.get("use_dora") and config.get("target_parameters"):
        found.append(("use_dora", "DoRA on MoE experts' tensors"))
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(REWRITES_BASE):
        found.append(("init_lora_weights", "an adapter for the base PEFT rewrote at init, not for the base itself"))
    return found


def _check_dora(adapter_dir: Path, config: dict) -> None:
    """use_dora in adapter_config.json says whether the file holds DoRA's magnitudes: a config beside another
    adapter's weights is named as such from the header, before a model loads."""
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        holds = any(key.endswith(f".{dora.MAGNITUDE}") for key in f.keys())
    if holds != bool(config.get("use_dora")):
        raise AdapterError(f"{adapter_dir / 'adapter_config.json'} says use_dora: {bool(config.get('use_dora'))}, "
                           f"but the adapter's tensors hold {'' if holds else 'no '}{dora.MAGNITUDE}: the config "
                           "belongs to another adapter. Put the adapter's own config beside it, or write use_dora: "
                           f"{str(holds).lower()} in it")


def _check_targets(adapter_dir: Path, config: dict) -> None:
    """The file holds LoRA factors (and DoRA's magnitudes) only, and every linear it holds them of is one
    adapter_config.json's target_modules selects, from the header: else PEFT loads the adapter without that layer's
    factors, and a config beside another adapter's weights is named as such before a model loads. (Targets the file
    holds nothing for need the model: load_adapter names those.)"""
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)  # PEFT allows one regex string
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            path, _, factor = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
            if not path or factor not in ("A.weight", "B.weight", dora.MAGNITUDE.removeprefix("lora_")):
                raise AdapterError(f"the adapter in {adapter_dir} holds {key}, which is not a linear layer's LoRA "
                                   "factor (PEFT saves an adapted embedding's factors, and the base weight beside an "
                                   "adapted embedding or lm_head): only adapters of linears are supported; use it with "
                                   "PEFT itself, or merge it into its base with PEFT's merge_and_unload")
            path = path.replace(".base_layer", "")  # PEFT nests a module's second adapted tensor (peft_keys)
            if _adapts_experts(path, config) or any(lora.matches(t, path) for t in targets):
                continue
            raise AdapterError(f"{adapter_dir / 'adapter_config.json'} says target_modules {targets}, but the "
                               f"adapter's tensors adapt {path} too ({key}): the config belongs to another adapter. "
                               f"Put the adapter's own config beside it, or add {path.rpartition('.')[2]!r} to its "
                               "target_modules")


def _adapts_experts(path: str, config: dict) -> bool:
    """Whether the module at `path` in the adapter file is one whose tensors target_parameters adapt, as PEFT matches
    them: "experts.gate_up_proj" names the module ("experts", or a suffix of its path after a dot); a tensor named
    alone ("gate_up_proj", as PEFT writes them for all-linear) any module's, so any that target_modules leaves out."""
    modules = [t.rpartition(".")[0] for t in config.get("target_parameters") or []]
    if "" in modules:
        targets = config.get("target_modules") or []
        return not any(lora.matches(t, path) for t in ([targets] if isinstance(targets, str) else targets))
    return any(path == m or path.endswith(f".{m}") for m in modules)


def _check_rank(adapter_dir: Path, config: dict) -> None:
    """Every linear's lora_A has adapter_config.json's r rows, from the file's header: a config beside another
    adapter's weights is named as such, before a model loads. (An experts tensor's A has r rows per expert, a count
    only the base knows: merge.py and load_adapter check those shapes.)"""
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            path, _, factor = key.rpartition(".lora_")
            path = path.replace(".base_layer", "")  # PEFT nests a module's second adapted tensor (peft_keys)
            if factor != "A.weight" or _adapts_experts(path, config):
                continue
            shape = f.get_slice(key).get_shape()
            if shape[0] != config["r"]:
                raise AdapterError(f"{adapter_dir / 'adapter_config.json'} says r={config['r']}, but the adapter's "
                                   f"tensors have rank {shape[0]} ({key} is {shape}): the config belongs to another "
                                   f"adapter. Put the adapter's own config beside it, or write r={shape[0]} in it")


def adapter_scaling(config: dict) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA (PEFT's use_rslora)."""
    return config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])


def _check_fits(model: nn.Module, layer_cls: type[nn.Module], targets: list[str], adapter_dir: Path,
                config: dict) -> None:
    """The adapter's targets are in this model: else it was trained on another base, which the refusal says, rather
    than inject_lora's words about a --lora_targets nobody gave."""
    another = _another_base(adapter_dir)
    if config.get("target_parameters") and not moe_lora.expert_tensors(model, layer_cls):
        raise AdapterError(f"the adapter in {adapter_dir} adapts MoE experts (target_parameters "
                           f"{config['target_parameters']}), and this model has none: {another}")
    kinds = {name for _, name, _ in moe_lora.expert_tensors(model, layer_cls).values()}
    named = {t.rpartition(".")[2] for t in config.get("target_parameters") or []}
    if named and kinds - named:  # inject_experts_lora adapts all of them, as train.py does
        raise AdapterError(f"the adapter in {adapter_dir} adapts the MoE experts' {sorted(named & kinds)} only "
                           f"(target_parameters), not {sorted(kinds - named)}, which this loader does not do: use it "
                           "with PEFT itself, or merge it into its base with PEFT's merge_and_unload")
    if targets and not lora.matching_modules(model, targets, layer_cls):
        raise AdapterError(f"the adapter in {adapter_dir} adapts {targets} (target_modules), which match no linear "
                           f"layer of this model: {another}")


def apply_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """The model as trained: LoRA injected into the (4-bit) base with the adapter's own r, alpha and targets, then
    its weights loaded. The inverse of save_adapter; for inference (dropout is off in eval mode)."""
    config = read_adapter_config(adapter_dir)
    targets = config.get("target_modules") or []  # None when only experts' tensors are adapted
    targets = [targets] if isinstance(targets, str) else list(targets)  # PEFT allows one regex string
    layer_cls = model_loading.decoder_layer_class(model)
    _check_fits(model, layer_cls, targets, adapter_dir, config)
    device, dropout = next(model.parameters()).device, config.get("lora_dropout", 0.0)
    adapter = dora.DoRALinear if config.get("use_dora") else lora.LoRALinear
    if targets:
        lora.inject_lora(model, targets, layer_cls, config["r"], config["lora_alpha"], dropout, device, adapter,
                         warn=False)
    if config.get("target_parameters"):  # every experts tensor, as train.py adapts them; load_adapter checks the keys
        moe_lora.inject_experts_lora(model, layer_cls, config["r"], config["lora_alpha"], dropout, device)
    for module in lora.lora_modules(model).values():
        module.scaling = adapter_scaling(config)
        module.train(model.training)  # new modules train; in an eval-mode model they must not drop out
    load_adapter(model, adapter_dir)
