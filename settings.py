"""train.py's flags, each written once with its default and help (Config; DataConfig for the data), and the names
they take: importable without torch, transformers or bitsandbytes (seconds to import), so that `--help` and a
mistyped flag are answered before they load.

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
    """The data settings, as train.py's flags (Config extends this): each written once, with its help.

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
                "paragraph); refused with chat rows, which carry theirs in their messages"})
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


# Why a setting may change on resume (Config's metadata); the rest must match, or must for the reason given.
SAME_MATH = "where tensors live, what is recomputed, which kernels: the same math, up to rounding"
BOOKKEEPING = "how the run is launched, logged and saved, not what it trains"
SCHEDULE = ("the LR schedule is laid over the planned steps, so another count makes the LR jump; to train longer, "
            "start a new run in another --output_dir")


@dataclass
class Config(DataConfig):
    """Every flag of train.py (the data flags come from DataConfig), each written once with its default and
    help. A run on the built-in model takes its own defaults from BUILTIN_CONFIG (parse_config).

    On resume, a setting must be as it was in the checkpoint's run unless its metadata says "may_change", with why
    that is safe (checkpointing.check_resumable). "path": the value may name a file or folder, where ~ is the home.
    """
    # what to train
    model: str = field(default=BUILTIN_MODEL, metadata={
        "path": True,
        "help": "local folder, Hub repo id, or 'tiny' (the built-in model, whose runs take configs/builtin.yaml's "
                "settings as their defaults)",
        "may_change": "compared by the base's fingerprint instead: a moved folder, or a Hub id of the same files, "
                      "is fine"})
    output_dir: str = field(default="out", metadata={
        "path": True, "help": "adapters, metrics.jsonl and checkpoints go here",
        "may_change": "the run folder may have moved"})
    eval_every: int = field(default=0, metadata={
        "help": "steps between eval losses; 0: only at the end, if there is eval data",
        "may_change": "what is evaluated, not what is trained"})
    show: int = field(default=0, metadata={
        "help": "print this many tokenized rows, trained spans marked, and the data's statistics; then exit without "
                "training",
        "may_change": "it trains nothing"})
    # batch and length of training
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch per rank"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=0, metadata={
        "help": "optimizer steps; 0 means run --epochs", "must_match": SCHEDULE})
    epochs: int = field(default=1, metadata={
        "help": "passes over the data, when --max_steps is 0", "must_match": SCHEDULE})
    # optimization
    lr: float = field(default=2e-4, metadata={
        "help": "peak learning rate of AdamW on the LoRA weights; 2e-4, the QLoRA paper's for 7B and 13B models "
                "(1e-4 for 33B and 65B)"})
    lr_schedule: str = field(default="cosine", metadata={
        "choices": ["cosine", "linear", "constant"], "help": "decay after warmup"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup: step k <= N trains at lr * k / (N + 1)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global grad norm; 0 disables"})
    # LoRA
    lora_rank: int = field(default=64, metadata={
        "help": "rank r of each update; 64, the QLoRA paper's (Dettmers et al. 2023) for every model size with LoRA "
                "on all linears, where it found r matters little (PEFT's LoraConfig defaults to 8); vLLM serves it "
                "with --max-lora-rank 64"})
    lora_alpha: float = field(default=16.0, metadata={
        "help": "the update is scaled by alpha / r; 16, the QLoRA paper's with r=64, and PEFT's FSDP-QLoRA example's"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    lora_targets: str = field(default=ALL_LINEAR, metadata={
        "help": "comma-separated module names or regexes of decoder-layer linears, or 'all-linear': all of them but "
                "MoE routers; add 'experts' for LoRA on the MoE experts' tensors too (PEFT's target_parameters; needs "
                "--lora_dropout 0)",
        "must_match": "compared by the linears each selects in this model: pass the checkpoint's value to resume"})
    use_dora: bool = field(default=False, metadata={
        "help": "DoRA (Liu et al. 2024; PEFT's use_dora): also learn each output feature's magnitude apart from its "
                "direction; on linears, not on MoE experts. vLLM does not serve DoRA adapters: merge.py makes a "
                "checkpoint it serves"})
    # memory and sharding
    quant: str = field(default=AUTO, metadata={
        "choices": [AUTO, *QUANT_TYPES],
        "help": f"4-bit type of the base, or none (plain LoRA); {AUTO}: a pre-quantized checkpoint's own "
                f"type, else {DEFAULT_QUANT}"})
    sharding: str = field(default="full_shard", metadata={
        "choices": SHARDING, "help": "FSDP strategy; hybrid_shard for several nodes", "may_change": SAME_MATH})
    cpu_offload: bool = field(default=False, metadata={
        "help": "keep parameter shards in CPU memory (GPU only)", "may_change": SAME_MATH})
    grad_checkpointing: str = field(default="non_reentrant", metadata={
        "choices": CHECKPOINTING, "help": "activation checkpointing of decoder layers",
        "may_change": SAME_MATH})
    offload_activations: bool = field(default=False, metadata={
        "help": "keep each checkpointed decoder layer's input in pinned CPU memory between forward and backward, "
                "copied on side streams (long sequences; 70B)",
        "may_change": SAME_MATH})
    tiled_mlp: int = field(default=0, metadata={
        "help": "run each decoder layer's MLP over tiles of this many tokens, each recomputed in backward, so that "
                "no (tokens x intermediate size) tensor of the whole batch exists (long sequences, e.g. 8192); 0: "
                "untiled",
        "may_change": SAME_MATH})
    compile: bool = field(default=True, metadata={
        "help": "torch.compile the norms, rotary embedding and MLP activation of each decoder layer, and the loss "
                "(GPU only)",
        "may_change": SAME_MATH})
    # bookkeeping
    log_every: int = field(default=1, metadata={
        "help": "steps between progress-line updates", "may_change": BOOKKEEPING})
    save_every: int = field(default=0, metadata={
        "help": "save a checkpoint to output_dir/checkpoint-N every N steps; 0: only the final adapter",
        "may_change": BOOKKEEPING})
    keep_last: int = field(default=0, metadata={
        "help": "keep only the newest K checkpoints; 0 keeps all", "may_change": BOOKKEEPING})
    resume: str = field(default="", metadata={
        "path": True,
        "help": "'auto': continue from the newest checkpoint in output_dir (if any); or a checkpoint folder",
        "may_change": BOOKKEEPING})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the run in output_dir (its checkpoints, adapter and metrics) instead of refusing to start",
        "may_change": BOOKKEEPING})
    max_bad_steps: int = field(default=10, metadata={
        "help": "stop after this many consecutive skipped steps (non-finite loss or grad norm); 0: never",
        "may_change": BOOKKEEPING})
    dist_timeout: int = field(default=900, metadata={
        "help": "seconds a rank waits for the others before failing", "may_change": BOOKKEEPING})
    sample_prompts: str = field(default="", metadata={
        "path": True,
        "help": "text file, one prompt per line, sampled greedily at each save into output_dir/samples.jsonl; '' = "
                "built-in prompts with --dataset builtin",
        "may_change": "samples only read the model"})
    sample_tokens: int = field(default=64, metadata={
        "help": "longest sample, in new tokens", "may_change": "samples only read the model"})
    report_to: str = field(default="none", metadata={
        "help": "where the per-step metrics and samples also go: tensorboard (into output_dir/tensorboard), wandb, "
                "both comma-separated, or none",
        "may_change": BOOKKEEPING})
    wandb_project: str = field(default="", metadata={
        "help": "W&B project; '': $WANDB_PROJECT, else W&B's default", "may_change": BOOKKEEPING})
    wandb_name: str = field(default="", metadata={
        "help": "W&B run name; '': $WANDB_NAME, else one W&B makes up", "may_change": BOOKKEEPING})
    config: str = field(default="", metadata={
        "path": True,
        "help": "YAML file whose keys are flag names (configs/ has examples); flags given as well override it",
        "may_change": "the settings it resolves to are compared, not the file"})
