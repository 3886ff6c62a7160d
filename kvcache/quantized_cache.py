"""A transformers ``Cache`` that stores keys and values quantized (uint8 or packed uint4) as they arrive.

Each layer keeps ``q_key, key_scale, key_zero, q_value, value_scale, value_zero`` (layout of
``kvcache.quantize_cache``); ``update`` quantizes only the new tokens and appends them along the sequence axis, and
returns the whole quantized layer as ``((q_key, key_scale, key_zero), (q_value, value_scale, value_zero))``, which is
what ``kvcache.quantized_attention`` consumes.

Scales and zero points have the dtype of the incoming states, unless ``storage_dtype`` (float16 or bfloat16) is
given: then states are cast to it before quantization, so a float32 model can keep 2-byte scales and zero points
(int8: 68 instead of 72 bytes per 64-value row) while the stored values still round-trip within half a step.
"""
from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvcache.quantize_cache import GRANULARITIES, quantize_cache_v

_STATE_NAMES = ("q_key", "key_scale", "key_zero", "q_value", "value_scale", "value_zero")


STORAGE_DTYPES = (None, torch.float16, torch.bfloat16)


def _validate(bits: int, granularity: str, storage_dtype=None) -> None:
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be None, torch.float16 or torch.bfloat16, got {storage_dtype!r}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "chunk" and bits != 8:
        raise ValueError("granularity='chunk' reproduces the original 8-bit arithmetic and supports bits=8 only")


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's quantized cache, grown by concatenation along the sequence axis."""

    def __init__(self, bits: int = 8, granularity: str = "token", storage_dtype=None):
        super().__init__()
        _validate(bits, granularity, storage_dtype)
        self.bits = bits
        self.granularity = granularity
        self.storage_dtype = storage_dtype
        self.qmax = 2**bits - 1
        self.qmin = 0
        # Token granularity quantizes every position on its own, so dropping positions restores an earlier state
        # exactly; a chunk's scale depends on all of its tokens, so a partial crop cannot.
        self.is_croppable = granularity == "token"
        self._clear()

    def _clear(self) -> None:
        for name in _STATE_NAMES:
            setattr(self, name, None)

    def _states(self):
        return [getattr(self, name) for name in _STATE_NAMES]

    def _set_states(self, tensors) -> None:
        for name, tensor in zip(_STATE_NAMES, tensors):
            setattr(self, name, tensor)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def _quantize(self, states: torch.Tensor):
        if self.storage_dtype is not None:
            states = states.to(self.storage_dtype)
        if self.granularity == "chunk":
            qmax = torch.tensor(self.qmax, dtype=torch.float32, device=states.device)
            qmin = torch.tensor(self.qmin, dtype=torch.float32, device=states.device)
            return quantize_cache_v(states, self.bits, qmax, qmin, granularity="chunk")
        return quantize_cache_v(states, self.bits, self.qmax, self.qmin, granularity=self.granularity)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Quantizes the new [b, heads, new_seq, head_dim] states, appends them, returns the whole layer."""
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise ValueError(
                f"key/value states must both be [batch, heads, seq, head_dim], got {tuple(key_states.shape)} "
                f"and {tuple(value_states.shape)}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = (*self._quantize(key_states), *self._quantize(value_states))
        if self.q_key is None:
            self._set_states(new)
        else:
            self._set_states(torch.cat((old, fresh), dim=-2) for old, fresh in zip(self._states(), new))
        return (self.q_key, self.key_scale, self.key_zero), (self.q_value, self.value_scale, self.value_zero)

    def get_seq_length(self) -> int:
        return 0 if self.q_key is None else self.q_key.shape[-2]

    def reset(self) -> None:
        self._clear()
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` positions (transformers' negative-count convention)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or self.q_key is None:
            return
        keep = max(self.get_seq_length() + tokens_to_remove, 0)
        self._set_states(t[..., :keep, :] for t in self._states())

    def _map_batch(self, fn) -> None:
        if self.q_key is not None:
            self._set_states(fn(t) for t in self._states())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.q_key is not None and self.q_key.device != self.device:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))


class QuantizedKVCache(Cache):
    """Cache of ``QuantizedKVLayer``; layers are created lazily, or up front from ``config.num_hidden_layers``."""

    def __init__(self, bits: int = 8, granularity: str = "token", config=None, storage_dtype=None):
        _validate(bits, granularity, storage_dtype)
        make_layer = partial(QuantizedKVLayer, bits=bits, granularity=granularity, storage_dtype=storage_dtype)
        self.bits = bits
        self.granularity = granularity
        self.storage_dtype = storage_dtype
        num_layers = getattr(config, "num_hidden_layers", None) if config is not None else None
        if num_layers is not None:
            super().__init__(layers=[make_layer() for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=make_layer)


def _tensors_in(obj):
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (item for item in value if isinstance(item, torch.Tensor))


def cache_nbytes(cache: Cache) -> int:
    """Bytes of every distinct tensor storage held by the cache's layers (any ``Cache``, e.g. ``DynamicCache``).

    Storages are counted once each and in full, so a cropped view reports the buffer it still keeps alive.
    """
    seen = set()
    total = 0
    for layer in cache.layers:
        for tensor in _tensors_in(layer):
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), tensor.device)
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total
