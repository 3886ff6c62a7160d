"""Write the embedded default model: a small, seeded Qwen-architecture checkpoint that runs in seconds on a CPU.

    python -m qwen_model.create_tiny OUT_DIR [--seed 0] [--layers 2]
"""
import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .chat_files import write_chat_files
from .checkpoint import replace_dir_atomically, write_remote_code
from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel
from .tokenization_qwen import QWenTokenizer

logger = logging.getLogger(__name__)

TINY_CONFIG = dict(
    vocab_size=151936, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
    intermediate_size=256, seq_length=64, max_position_embeddings=8192, rotary_emb_base=10000,
    layer_norm_epsilon=1e-6, initializer_range=0.2, fp32=True, use_flash_attn=False,
)
TINY_GENERATION_CONFIG = dict(chat_format="chatml", eos_token_id=151643, pad_token_id=151643, max_new_tokens=16,
                              do_sample=False, max_window_size=6144)


def create_tiny(out_dir, seed: int = 0, num_layers: int = 2, overwrite: bool = False) -> Path:
    """Build, seed and save the tiny model, its tokenizer and our model code; returns the checkpoint directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty (pass overwrite=True / --overwrite to replace it)")
    torch.manual_seed(seed)
    config = QWenConfig(**{**TINY_CONFIG, "num_hidden_layers": num_layers})
    model = QWenLMHeadModel(config).eval()
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**TINY_GENERATION_CONFIG)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-" + out_dir.name + "-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        QWenTokenizer().save_pretrained(tmp)
        write_remote_code(tmp)
        write_chat_files(tmp)
        replace_dir_atomically(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote tiny Qwen model (%d layers, seed %d) to %s", num_layers, seed, out_dir)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write (must be empty or absent unless --overwrite)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    parser.add_argument("--layers", type=int, default=2, help="number of decoder blocks")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        create_tiny(args.out_dir, seed=args.seed, num_layers=args.layers, overwrite=args.overwrite)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
