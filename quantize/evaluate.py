"""Perplexity of a causal LM on a token stream, with the conventions the benchmarks compare against.

Plain protocol (``perplexity``): non-overlapping windows of ``ctx`` tokens from the start of the stream, the first
``n_windows`` of them, each scored on its ``ctx - 1`` next-token predictions; NLL summed in float64 and
``ppl = exp(total_nll / total_predictions)``.

KV-cache protocol (``chunked_perplexity``): each window is fed through a fresh cache in chunks, so every chunk
attends to the cached keys/values of the earlier chunks; the first token of a chunk is scored from the previous
chunk's last logits, so a window still yields ``ctx - 1`` predictions.

CLI: ``python -m quantize.evaluate --model DIR --data FILE [--ctx 512] [--windows 8] [--device cpu]``.
"""
import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import DynamicCache

logger = logging.getLogger(__name__)


def _token_stream(input_ids) -> torch.Tensor:
    """The ids as a 1-D int64 tensor; accepts a list, a 1-D tensor or a ``[1, N]`` tensor."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be one token stream (1-D or [1, N]), got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {ids.dtype}")
    return ids.long()


def _window_count(n_tokens: int, ctx: int, n_windows: int) -> int:
    """How many full windows to score: ``n_windows``, or fewer (with a warning) when the stream is short."""
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise ValueError(f"ctx must be an integer >= 2, got {ctx!r}")
    if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be a positive integer, got {n_windows!r}")
    available = n_tokens // ctx
    if available == 0:
        raise ValueError(f"text has {n_tokens} tokens, fewer than one window of ctx={ctx}")
    if available < n_windows:
        logger.warning("only %d full windows of %d tokens available, fewer than the %d asked for",
                       available, ctx, n_windows)
    return min(available, n_windows)


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``targets`` (``[B, T]``) under ``logits`` (``[B, T, V]``), in float64."""
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return losses.double().sum().item()


def _model_device(model, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def perplexity(model, input_ids, ctx: int = 512, n_windows: int = 8, device=None, progress: bool = True) -> float:
    """Perplexity over the first ``n_windows`` non-overlapping ``ctx``-token windows of ``input_ids``.

    ``model`` is any causal LM whose ``model(ids).logits`` is ``[1, T, V]``; it runs in eval mode (its previous
    mode is restored). ``device`` defaults to the device of the model's parameters.
    """
    ids = _token_stream(input_ids)
    count = _window_count(ids.numel(), ctx, n_windows)
    device = _model_device(model, device)
    total_nll, predictions = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for index in tqdm(range(count), desc="perplexity", disable=not progress):
                window = ids[index * ctx:(index + 1) * ctx].unsqueeze(0).to(device)
                logits = model(window).logits
                total_nll += _nll_sum(logits[:, :-1], window[:, 1:])
                predictions += ctx - 1
    finally:
        model.train(was_training)
    return math.exp(total_nll / predictions)


def chunked_perplexity(model, input_ids, ctx: int = 1024, chunk: int = 128, n_windows: int = 4,
                       make_cache: Callable[[], object] = DynamicCache, device=None, progress: bool = True) -> float:
    """Perplexity with each window fed through a KV cache in chunks of ``chunk`` tokens.

    ``make_cache()`` returns a fresh transformers ``Cache`` per window (e.g. a quantized one), which the model
    receives as ``cache=`` (the transformers 5 name) and fills in place. With an exact float cache this equals
    ``perplexity(..., ctx=ctx)`` up to rounding, so any difference measures what the cache loses.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    ids = _token_stream(input_ids)
    count = _window_count(ids.numel(), ctx, n_windows)
    device = _model_device(model, device)
    total_nll, predictions = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for index in tqdm(range(count), desc="chunked perplexity", disable=not progress):
                window = ids[index * ctx:(index + 1) * ctx].unsqueeze(0).to(device)
                cache = make_cache()
                previous_last = None
                for start in range(0, ctx, chunk):
                    piece = window[:, start:start + chunk]
                    output = model(piece, cache=cache, use_cache=True)
                    logits = output.logits
                    if previous_last is not None:
                        total_nll += _nll_sum(previous_last, piece[:, :1])
                    total_nll += _nll_sum(logits[:, :-1], piece[:, 1:])
                    previous_last = logits[:, -1:]
                predictions += ctx - 1
    finally:
        model.train(was_training)
    return math.exp(total_nll / predictions)


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m quantize.evaluate",
                                     description="Perplexity of a checkpoint (Qwen v1, Qwen2, Qwen3, Llama; float or "
                                                 "GPTQ) on a raw text file.")
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json, weights, tokenizer)")
    parser.add_argument("--data", required=True, help="raw text file, e.g. wiki.test.raw; scored as one text")
    parser.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--windows", type=int, default=8, help="number of windows from the start (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"python -m quantize.evaluate: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (2 for bad input, with one error line on stderr)."""
    args = _parse_args(argv)
    model_dir, data_file = Path(args.model), Path(args.data)
    if not model_dir.is_dir():
        return _fail(f"model directory not found: {model_dir}")
    if not data_file.is_file():
        return _fail(f"data file not found: {data_file}")
    if args.ctx < 2:
        return _fail(f"--ctx must be >= 2, got {args.ctx}")
    if args.windows < 1:
        return _fail(f"--windows must be >= 1, got {args.windows}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    from calib_data.tokenization import encode_text
    from qwen_model import load_tokenizer
    from quantize.native_checkpoint import load_model

    try:
        text = data_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        return _fail(f"{data_file} is not UTF-8 text: {error}")
    try:
        tokenizer = load_tokenizer(str(model_dir))
        model = load_model(model_dir, device)
    except (OSError, ValueError) as error:
        return _fail(f"cannot load model from {model_dir}: {error}")
    ids = encode_text(tokenizer, text)
    try:
        ppl = perplexity(model, ids, ctx=args.ctx, n_windows=args.windows, device=device)
    except ValueError as error:
        return _fail(str(error))
    windows = min(args.windows, len(ids) // args.ctx)
    print(f"perplexity: {ppl:.4f} (ctx {args.ctx}, {windows} windows, {data_file.name})")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
