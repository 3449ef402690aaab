"""The names train.py's flags take, and its data flags: what its Config is built from, importable without torch,
transformers or bitsandbytes (seconds to import), so that `--help` and a mistyped flag are answered before they load.

Each name belongs to the module in its comment, which imports it from here; nothing here imports another module of
the project.
"""
from dataclasses import dataclass, field
from pathlib import Path

BUILTIN_MODEL = "tiny"  # builtin.py: --model's default, a tiny random Llama built locally
# builtin.py: the built-in model's own settings (a random model learns its task at a rate a real one would not take),
# the defaults of every run on it, below --config and the flags
BUILTIN_CONFIG = Path(__file__).resolve().parent / "configs" / "builtin.yaml"
BUILTIN_DATASET = "builtin"  # data.py
FORMATS = ("auto", "alpaca", "chat", "prompt_completion", "text")  # data.py: --dataset_format
PROMPT_FORMATS = ("auto", "chat", "alpaca")  # data.py: --prompt_format
ALL_LINEAR = "all-linear"  # lora.py: --lora_targets' default, PEFT's keyword: every linear of every decoder layer
# lora.py: --lora_targets' keyword for the MoE experts' 3-D tensors, alone or beside the linears ("all-linear,experts").
# Not part of "all-linear", which takes linears only (PEFT 0.21's own "all-linear" also takes the experts and routers
# of Mixtral, Qwen3-MoE and OLMoE, linears in transformers 4). The saved adapter names the linears and the experts'
# tensors (target_parameters), never "all-linear", so PEFT loads exactly what was trained.
EXPERTS = "experts"
QUANT_TYPES = ("nf4", "fp4", "none")  # quantization.py; none: the base stays bf16 (plain LoRA)
DEFAULT_QUANT = "nf4"  # quantization.py: the QLoRA paper's choice, quantiles of a normal distribution, as weights are
AUTO = "auto"  # quantization.py: a pre-quantized checkpoint's own type, else DEFAULT_QUANT; model_loading.resolve_quant
SHARDING = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")  # fsdp_wrap.py: FSDP's ShardingStrategy
CHECKPOINTING = ("non_reentrant", "reentrant", "none")  # fsdp_wrap.py: activation checkpointing of decoder layers


@dataclass
class DataConfig:
    """The data settings, as train.py's flags (train.Config extends this): each written once, with its help.

    "rows": the setting shapes the tokenized training rows, so a resumed run names it when their fingerprint differs.
    """
    dataset: str = field(default=BUILTIN_DATASET, metadata={
        "rows": True, "path": True,
        "help": "Hub dataset id, local file or folder (.jsonl .json .parquet .csv .txt), or 'builtin'"})
    dataset_config: str = field(default="", metadata={"rows": True, "help": "Hub dataset configuration name"})
    dataset_split: str = field(default="train", metadata={"rows": True, "help": "Hub dataset split to train on"})
    dataset_format: str = field(default="auto", metadata={
        "rows": True, "choices": FORMATS, "help": "how examples are rendered; auto: from the columns"})
    field_map: str = field(default="", metadata={
        "rows": True, "help": "rename columns, ours=theirs: 'instruction=question,output=answer'"})
    chat_template: str = field(default="", metadata={
        "rows": True,
        "help": "'chatml', a Jinja template, or a file holding one: the chat template, for tokenizers without one or "
                "instead of theirs"})
    prompt_format: str = field(default="auto", metadata={
        "rows": True, "choices": PROMPT_FORMATS,
        "help": "how alpaca and prompt_completion rows are rendered: chat (user and assistant turns of the chat "
                "template, the loss on the assistant's), alpaca ('### Instruction:' ... '### Response:'; "
                "prompt_completion rows as they are); auto: chat where the tokenizer has a chat template (or "
                "--chat_template), else alpaca. Chat rows always take the chat template"})
    system_prompt: str = field(default="", metadata={
        "rows": True,
        "help": "a system turn before each alpaca and prompt_completion row (in the alpaca format, its first "
                "paragraph); chat rows keep their own"})
    seq_len: int = field(default=512, metadata={
        "rows": True, "help": "longest row in tokens; longer prompts are cut first"})
    train_on_prompt: bool = field(default=False, metadata={"rows": True, "help": "also train on prompt tokens"})
    packing: bool = field(default=False, metadata={
        "rows": True, "help": "fill rows with whole examples, none attending to another"})
    group_by_length: bool = field(default=False, metadata={
        "help": "batch similar lengths together (without --packing)"})
    eval_split: str = field(default="", metadata={
        "path": True, "may_change": "what is evaluated, not what is trained",
        "help": "eval data: a split of --dataset, or a file"})
    eval_fraction: float = field(default=0.0, metadata={
        "rows": True, "help": "or carve this fraction out of the training data"})
    seed: int = field(default=0, metadata={"help": "data order, the eval carve-out and LoRA init"})
