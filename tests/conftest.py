"""Tiny random checkpoints of real architectures, written once per test session as save_pretrained writes them."""
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_loading import write_random_checkpoint  # noqa: E402

# One small shape for all; head_dim 16, every linear's size a multiple of the 4-bit block size (64).
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128)


def tiny_config(arch: str):
    import transformers

    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "gemma": "GemmaConfig"}[arch]
    return getattr(transformers, cls)(**SHAPE)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma"]
# The same tests prove the CUDA path (bnb's GPU kernels, NCCL) when run on a machine with a GPU.
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch -> {"sharded": dir, "single": dir}, with the built-in tokenizer beside the weights."""
    from data import builtin_tokenizer

    made = {}

    def get(arch: str, layout: str = "sharded") -> Path:
        key = (arch, layout)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{arch}-{layout}")
            # 40KB shards split the ~0.5 MB model into many files; "1GB" keeps it in one model.safetensors
            write_random_checkpoint(tiny_config(arch), out, "40KB" if layout == "sharded" else "1GB",
                                    seed=1, tokenizer=builtin_tokenizer())
            made[key] = out
        return made[key]

    return get


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
