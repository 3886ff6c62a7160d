"""Quantizing block by block: peak memory must not grow with the number of decoder blocks.

CI-sized version of benchmarks/gptq_memory.py: a random float32 checkpoint whose blocks are ~52 MB each (hidden
1024, intermediate 5632; tiny vocabulary, pre-tokenized calibration ids below it), quantized by the int4 CLI with
GPTQ in one fresh process for its first 2 blocks and one for all 8, memory watched from outside. Holding every block
(or every block's activations) would add 6 x 52 MB to the 8-block run; the bound allows 2 blocks plus a margin for
sampling and allocator noise.
"""
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "gptq_memory.py"
_spec = importlib.util.spec_from_file_location("gptq_memory", _PATH)
gptq_memory = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gptq_memory", gptq_memory)  # dataclasses resolve their module through sys.modules
_spec.loader.exec_module(gptq_memory)

DIMS = dict(hidden_size=1024, num_attention_heads=8, kv_channels=128, intermediate_size=5632, vocab_size=1024)
FEW, MANY = 2, 8
BLOCK = gptq_memory.block_bytes(DIMS["hidden_size"], DIMS["intermediate_size"], torch.float32)
MARGIN = 48 << 20
ALLOWED = 2 * BLOCK + MARGIN


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """RunMemory of quantizing the first FEW and all MANY blocks of one random checkpoint."""
    work = tmp_path_factory.mktemp("gptq_memory")
    full = gptq_memory.write_random_checkpoint(work / "full", MANY, dtype="fp32", **DIMS)
    rng = random.Random(0)
    calib = work / "ids.json"
    calib.write_text(json.dumps([[rng.randrange(DIMS["vocab_size"]) for _ in range(128)] for _ in range(8)]))
    out = {}
    for n in (FEW, MANY):
        view = gptq_memory.first_blocks_view(full, work / f"view-{n}", n)
        cmd = gptq_memory.quantize_command(view, work / f"out-{n}", nsamples=8, seqlen=128, calib=calib)
        out[n] = gptq_memory.run_measured(cmd, work / f"log-{n}.txt", env=gptq_memory.child_env(threads=1))
        assert (work / f"out-{n}" / "model.safetensors.index.json").is_file()
    return out


def test_view_holds_only_the_first_blocks(tmp_path):
    dims = dict(DIMS, hidden_size=64, num_attention_heads=4, kv_channels=16, intermediate_size=128)
    full = gptq_memory.write_random_checkpoint(tmp_path / "full", 3, dtype="bf16", **dims)
    view = gptq_memory.first_blocks_view(full, tmp_path / "view", 2)
    from qwen_model.checkpoint import LazyCheckpoint

    a, b = LazyCheckpoint(full), LazyCheckpoint(view)
    assert sorted(b.keys()) == sorted(k for k in a.keys() if not k.startswith("transformer.h.2."))
    for key in b.keys():
        assert torch.equal(a.get(key), b.get(key))
    assert gptq_memory.checkpoint_bytes(view) == sum(b.get(k).numel() * 2 for k in b.keys())
    assert gptq_memory.checkpoint_bytes(full) - gptq_memory.checkpoint_bytes(view) == \
        gptq_memory.block_bytes(64, 128, torch.bfloat16)
    assert json.loads((view / "config.json").read_text())["num_hidden_layers"] == 2


def test_sampling_sees_the_block_being_quantized(runs):
    for n in (FEW, MANY):
        assert runs[n].peak_anon > BLOCK, f"{n} blocks: peak anonymous RSS {runs[n].peak_anon} < one block {BLOCK}"
        assert runs[n].peak_rss >= runs[n].peak_anon


def test_peak_anonymous_memory_does_not_grow_with_blocks(runs):
    growth = runs[MANY].peak_anon - runs[FEW].peak_anon
    assert growth < ALLOWED, (f"peak anonymous RSS grew by {growth / BLOCK:.2f} blocks from {FEW} to {MANY} blocks "
                              f"({runs[FEW].peak_anon >> 20} -> {runs[MANY].peak_anon >> 20} MiB)")


def test_peak_rss_does_not_grow_with_blocks(runs):
    growth = runs[MANY].peak_rss - runs[FEW].peak_rss
    assert growth < ALLOWED, (f"peak RSS grew by {growth / BLOCK:.2f} blocks from {FEW} to {MANY} blocks "
                              f"({runs[FEW].peak_rss >> 20} -> {runs[MANY].peak_rss >> 20} MiB)")
