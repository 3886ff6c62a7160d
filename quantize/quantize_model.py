"""Quantize a checkpoint block by block: only one decoder block's weights are ever in memory.

Calibration samples run through the embedding once; each block is then read from safetensors, its linear layers are
quantized in true-sequential order (attention inputs -> attention output -> MLP inputs -> MLP output, e.g. c_attn ->
c_proj -> w1/w2 -> mlp.c_proj for Qwen v1, each group's inputs computed with the groups before it already
quantized), its outputs become the next block's inputs, and its packed tensors go straight to disk. What differs
between model families (Qwen v1, transformers' Qwen2 / Qwen3 / Llama) is a `quantize.model_families.Family`.
"""
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from calib_data.loader import load_calibration
from qwen_model.checkpoint import LazyCheckpoint
from qwen_model.tokenization_qwen import load_tokenizer

from .ffn_padding import pad_block, padded_config, padded_width
from .gptq import accumulate_hessian, gptq_quantize
from .gptq_checkpoint import CheckpointWriter, output_config
from .model_families import Family, family_for, get_family
from .pack import checkpoint_format_for, pack_layer, quantize_config
from .quantizer import check_bits, check_group_size, rtn_quantize

logger = logging.getLogger(__name__)


@dataclass
class QuantizeSettings:
    """What to quantize to; defaults follow the original Qwen GPTQ recipe (plus group-aware column order and the
    objective-weighted range search of each group's grid)."""

    bits: int = 4
    group_size: int = 128
    damp_percent: float = 0.01
    desc_act: bool = False
    static_groups: bool = False
    sym: bool = True
    true_sequential: bool = True
    act_group_aware: bool = True
    scale_search: bool = True
    method: str = "gptq"

    def validate(self, in_features: int) -> None:
        check_bits(self.bits)
        check_group_size(self.group_size, in_features)
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"method must be 'gptq' or 'rtn', got {self.method!r}")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"damp must be in [0, 1), got {self.damp_percent}")


class _StopForward(Exception):
    """Raised by a hook once the layers of interest have seen their input, to skip the rest of the block."""


def _to(obj, device, dtype=None):
    """Move tensors nested in tuples/lists/dicts (the block's rotary (cos, sin) among them) to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype=dtype if dtype is not None and obj.is_floating_point() else None)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


def _batches(samples: list, batch_size: int) -> list[torch.Tensor]:
    """Stack equal-length samples into batches (samples of other lengths go alone)."""
    by_len = {}
    for s in samples:
        by_len.setdefault(s.shape[-1], []).append(s.reshape(1, -1))
    out = []
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            out.append(torch.cat(group[i:i + batch_size]))
    return out


def _family(config) -> Family:
    return get_family(config.model_type)


def capture_block_inputs(config, reader: LazyCheckpoint, batches, device, dtype):
    """Inputs (args, kwargs) of the first block for each batch, with only the embedding (and the rotary tables)
    materialised."""
    fam = _family(config)
    with torch.device("meta"):
        model = fam.model_class(config)
    base, blocks = fam.base_model(model)
    base.get_input_embeddings().weight = torch.nn.Parameter(reader.get(fam.embedding, device).to(dtype),
                                                            requires_grad=False)
    fam.materialise(base, config, device)
    captured = []

    def record(module, args, kwargs):
        captured.append((_to(args, "cpu"), _to(kwargs, "cpu")))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    base(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def _load_block(config, reader, index, device, dtype) -> torch.nn.Module:
    fam = _family(config)
    block = fam.new_block(config, index)
    block.load_state_dict(reader.state_dict(f"{fam.blocks}{index}.", device), strict=True, assign=True)
    return block.to(dtype).eval()


def _on(device, dtype, args, kwargs):
    """A calibration batch on the compute device: hidden states in the compute dtype, rotary tables, masks and
    scales in theirs (float32)."""
    return args[0].to(device, dtype), _to(args[1:], device), _to(kwargs, device)


def _input_of(module, run):
    """The input `module` receives while `run()` executes; the forward stops there, skipping what follows."""
    seen = []

    def hook(_, inp):
        seen.append(inp[0])
        raise _StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"calibration pass never reached {module.__class__.__name__}")
    return seen[0]


def _hessian(H, n, name, x):
    try:
        return accumulate_hessian(H, n, x)
    except ValueError as err:  # accumulate_hessian checks the input once; say which layer it was
        raise ValueError(f"non-finite activations reach {name}; the model or calibration data is broken") from err


def calibrate_block(block, inputs: list, quantize, true_sequential: bool, device, dtype, outputs: bool = True,
                    family: Family | None = None) -> None:
    """Collect each layer's Hessian group by group (Qwen v1: c_attn -> c_proj -> w1/w2 -> mlp.c_proj; `family`
    defaults to Qwen v1), call ``quantize(names, hessians)`` per group (true-sequential: before the next group's
    inputs are computed, so they see the quantized layers; otherwise once, from the float block), then (with
    `outputs`) replace each input batch by the block's output.

    Every stage starts from what the previous one stored instead of re-running the block from its input: the
    attention runs once per batch, the MLP's input linears twice (for the output linear's Hessian, then for the
    output). This mirrors the pre-norm block's forward (x + attn(norm_1(x)), then h + mlp(norm_2(h))); a test holds
    the two equal.
    """
    fam = family or get_family("qwen")
    ln_1, attn = block.get_submodule(fam.input_norm), block.get_submodule(fam.attention)
    ln_2, mlp = block.get_submodule(fam.post_norm), block.get_submodule(fam.mlp)
    attn_in, (attn_out,), mlp_in, (mlp_out,) = fam.groups
    attn_proj, mlp_proj = block.get_submodule(attn_out), block.get_submodule(mlp_out)
    pending = {}

    def stage(names, hessian):
        if true_sequential:
            quantize(names, {name: hessian for name in names})
        else:
            pending.update({name: hessian for name in names})

    with torch.no_grad():
        H, n = None, 0
        for args, kwargs in inputs:
            H, n = _hessian(H, n, attn_in[0], ln_1(args[0].to(device, dtype)))
        stage(attn_in, H)

        H, n, mid = None, 0, []
        for args, kwargs in inputs:
            x, rest, kw = _on(device, dtype, args, kwargs)
            context = _input_of(attn_proj, lambda: attn(ln_1(x), *rest, **kw))
            H, n = _hessian(H, n, attn_out, context)
            mid.append(context.to(args[0].device, args[0].dtype))
        stage((attn_out,), H)

        H, n = None, 0
        for j, (args, kwargs) in enumerate(inputs):
            h = args[0].to(device, dtype) + attn_proj(mid[j].to(device, dtype))
            H, n = _hessian(H, n, mlp_in[0], ln_2(h))
            mid[j] = h.to(args[0].device, args[0].dtype)
        stage(mlp_in, H)

        H, n = None, 0
        for j in range(len(inputs)):
            h = mid[j].to(device, dtype)
            H, n = _hessian(H, n, mlp_out, _input_of(mlp_proj, lambda: mlp(ln_2(h))))
        stage((mlp_out,), H)

        if not true_sequential:
            quantize(tuple(pending), pending)
        for j, (args, kwargs) in enumerate(inputs if outputs else []):
            if true_sequential:
                h = mid[j].to(device, dtype)
                out = h + mlp(ln_2(h))
            else:
                x, rest, kw = _on(device, dtype, args, kwargs)
                out = block(x, *rest, **kw)
            mid[j] = None
            inputs[j] = ((out.to(args[0].device, args[0].dtype),) + tuple(args[1:]), kwargs)


def _quantize_layer(linear, H, s: QuantizeSettings):
    W = linear.weight.data.float()
    if s.method == "rtn":
        return rtn_quantize(W, s.bits, s.group_size, s.sym, fp16_scales=True)
    return gptq_quantize(W, H, s.bits, s.group_size, sym=s.sym, damp_percent=s.damp_percent,
                         desc_act=s.desc_act, static_groups=s.static_groups, act_group_aware=s.act_group_aware,
                         scale_search=s.scale_search)


def _quantize_layers(block, names, hessians, settings: QuantizeSettings, fmt, prefix, device, dtype) -> dict:
    """Quantize the named linears of `block` in place (later stages then see them) and return their packed tensors."""
    packed_all = {}
    for name in names:
        t0 = time.time()
        linear = block.get_submodule(name)
        result = _quantize_layer(linear, hessians.get(name), settings)
        linear.weight.data = result.weight.to(device, dtype)
        packed = pack_layer(result.codes, result.scales, result.zeros, result.g_idx, settings.bits, fmt)
        if linear.bias is not None:
            packed["bias"] = linear.bias.data.to(torch.float16)
        packed_all.update({f"{prefix}{name}.{k}": v for k, v in packed.items()})
        logger.info("%s%-12s %5.2fs  loss %s", prefix, name, time.time() - t0,
                    "-" if result.loss is None else f"{result.loss:.4g}")
    return packed_all


def quantize_checkpoint(model_dir, out_dir, settings: QuantizeSettings, calib=None, nsamples: int = 128,
                        seqlen: int = 8192, seed: int = 0, device=None, batch_size: int | None = None,
                        overwrite: bool = False, model_name: str | None = None,
                        ffn_multiple: int | None = None) -> Path:
    """Quantize the checkpoint in `model_dir` (Qwen v1, or transformers' Qwen2 / Qwen3 / Llama: config.json
    `model_type` decides) and write a GPTQ checkpoint to `out_dir` (atomically).

    `ffn_multiple` (Qwen v1) pads the FFN width of the written checkpoint up to a multiple of it with exact zeros
    (`ffn_padding`), e.g. 1024 so that vLLM can shard Qwen-7B/14B at tensor-parallel 1/2/4/8."""
    model_dir = Path(model_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fam = family_for(model_dir)
    config = fam.load_config(model_dir)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{model_dir} is already quantized; start from a float checkpoint")
    block_config = fam.calibration_config(config)
    probe = fam.new_block(block_config, 0)
    for name in fam.linears:
        settings.validate(probe.get_submodule(name).in_features)
    reader = LazyCheckpoint(model_dir)
    dtype = fam.compute_dtype(config, device)
    fmt = checkpoint_format_for(settings.sym)
    if ffn_multiple and fam.name != "qwen":
        raise ValueError(f"--ffn-multiple pads Qwen v1 checkpoints only, not {fam.name!r} ones")
    ffn = config.intermediate_size // 2
    new_ffn = padded_width(ffn, ffn_multiple, settings.group_size) if ffn_multiple else ffn
    layout = {"bits": settings.bits, "group_size": settings.group_size, "checkpoint_format": fmt}
    writer = CheckpointWriter(out_dir, num_shards=config.num_hidden_layers + 1, overwrite=overwrite)
    try:
        inputs = []
        if settings.method == "gptq":
            tokenizer = load_tokenizer(model_dir)
            samples = load_calibration(calib, tokenizer, nsamples=nsamples, seqlen=seqlen, seed=seed)
            bs = batch_size or max(1, 4096 // max(s.shape[-1] for s in samples))
            logger.info("calibrating on %d samples (%d tokens), batch size %d, %s on %s", len(samples),
                        sum(s.numel() for s in samples), bs, dtype, device)
            inputs = capture_block_inputs(block_config, reader, _batches(samples, bs), device, dtype)
        start = time.time()
        quantized = {f"{name}.{part}" for name in fam.linears for part in ("weight", "bias")}
        for i in tqdm(range(config.num_hidden_layers), desc="blocks", unit="block"):
            block = _load_block(block_config, reader, i, device, dtype)
            prefix = f"{fam.blocks}{i}."
            shard = {prefix + k: v for k, v in block.state_dict().items() if k not in quantized}

            def quantize(names, hessians):
                shard.update(_quantize_layers(block, names, hessians, settings, fmt, prefix, device, dtype))

            if inputs:
                calibrate_block(block, inputs, quantize, settings.true_sequential, device, dtype,
                                outputs=i + 1 < config.num_hidden_layers, family=fam)
            else:
                quantize(fam.linears, {})
            writer.write_shard(pad_block(shard, prefix, ffn, new_ffn, layout))
            del block
        writer.write_shard(reader.read_all(k for k in reader.keys() if not k.startswith(fam.blocks)))
        qcfg = quantize_config(settings.bits, settings.group_size, settings.damp_percent, settings.desc_act,
                               settings.static_groups, settings.sym, settings.true_sequential,
                               model_name_or_path=model_name or str(model_dir), model_file_base_name="model",
                               checkpoint_format=fmt)
        qcfg["act_group_aware"] = settings.act_group_aware and not settings.desc_act
        qcfg["scale_search"] = settings.scale_search and settings.method == "gptq"
        qcfg["solver"] = settings.method  # not "method": GPTQModel reads that key and refuses "rtn"
        logger.info("quantized %d blocks in %.1fs; settings %s", config.num_hidden_layers, time.time() - start,
                    asdict(settings))
        out_config = padded_config(output_config(config, qcfg), ffn, new_ffn)
        return writer.finish(model_dir, out_config, out_config["quantization_config"], remote_code=fam.remote_code)
    except BaseException:
        writer.abort()
        raise
