"""A transformers ``Cache`` that stores keys and values quantized (uint8 or packed uint4) as they arrive.

Two key layouts (``key_layout``):

* ``"token"`` (8 bits, and 4 bits on request): keys after the rotary, one scale and zero point per position, as the
  values always are. Each layer keeps ``q_key, key_scale, key_zero, q_value, value_scale, value_zero`` (layout of
  ``kvcache.quantize_cache``) and ``update`` returns ``((q_key, key_scale, key_zero), (q_value, value_scale,
  value_zero))``.
* ``"channel_groups"`` (the 4-bit default): keys before the rotary, quantized per channel over groups of
  ``KEY_GROUP_SIZE`` positions (``quantize_key_groups``); positions that do not yet fill a group stay in a float
  residual and are quantized when it completes (KIVI). The layer also keeps every slot's rotary position (the
  reader rotates the dequantized keys with them), and ``update`` returns ``(GroupedKeys(...), (q_value, value_scale,
  value_zero))``. ``update`` then takes ``cache_kwargs={"positions": [b, new] ints}`` (-1 marks padding, which is
  left out of the group ranges); without it, slots are numbered 0, 1, 2, ...

``kvcache.quantized_attention`` consumes both. Scales and zero points (and the key residual) have the dtype of the
incoming states, unless ``storage_dtype`` (float16 or bfloat16) is given: then states are cast to it before
quantization, so a float32 model can keep 2-byte scales and zero points (int8: 68 instead of 72 bytes per 64-value
row) while the stored values still round-trip within half a step.
"""
from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvcache.cpu_kernels import load_cpu_kernels, quantize_append_cpu, quantize_token_cpu
from kvcache.reserved import append
from kvcache.quantize_cache import (GRANULARITIES, KEY_GROUP_SIZE, NOT_A_TENSOR, GroupedKeys, quantize_cache_v,
                                    quantize_key_groups)

_STATE_NAMES = ("q_key", "key_scale", "key_zero", "q_value", "value_scale", "value_zero")
_GROUP_STATE_NAMES = _STATE_NAMES + ("key_residual", "key_positions")

STORAGE_DTYPES = (None, torch.float16, torch.bfloat16)
KEY_LAYOUTS = ("token", "channel_groups")


def default_key_layout(bits: int, granularity: str = "token") -> str:
    """``"channel_groups"`` for 4 bits (token granularity), ``"token"`` otherwise."""
    return "channel_groups" if bits == 4 and granularity == "token" else "token"


def _validate(bits: int, granularity: str, storage_dtype=None, key_layout: str = "token") -> None:
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be None, torch.float16 or torch.bfloat16, got {storage_dtype!r}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "chunk" and bits != 8:
        raise ValueError("granularity='chunk' reproduces the original 8-bit arithmetic and supports bits=8 only")
    if key_layout not in KEY_LAYOUTS:
        raise ValueError(f"key_layout must be one of {KEY_LAYOUTS}, got {key_layout!r}")
    if key_layout == "channel_groups" and (bits != 4 or granularity != "token"):
        raise ValueError("key_layout='channel_groups' is a 4-bit layout (bits=4, granularity='token')")


class QuantizedStates(tuple):
    """``(q_key, key_scale, key_zero)`` as ``QuantizedKVLayer.update`` returns it, with ``fresh``: the float
    ``(key, value)`` of that update, for the attention call that follows (a chunk attends to itself in full
    precision). The layer keeps no float copy; this one lives as long as the caller holds the return value."""

    fresh = None
    shape = NOT_A_TENSOR


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's quantized cache, grown along the sequence axis (in place into ``capacity`` positions
    when given: ``kvcache.reserved``)."""

    def __init__(self, bits: int = 8, granularity: str = "token", storage_dtype=None, key_layout=None,
                 capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        key_layout = default_key_layout(bits, granularity) if key_layout is None else key_layout
        _validate(bits, granularity, storage_dtype, key_layout)
        self.bits = bits
        self.granularity = granularity
        self.storage_dtype = storage_dtype
        self.key_layout = key_layout
        self.qmax = 2**bits - 1
        self.qmin = 0
        # Token granularity quantizes every position on its own, so dropping positions restores an earlier state
        # exactly; a chunk's scale depends on all of its tokens, and a key group's on all of its positions, so a
        # partial crop cannot.
        self.is_croppable = granularity == "token" and key_layout == "token"
        self._names = _GROUP_STATE_NAMES if key_layout == "channel_groups" else _STATE_NAMES
        self._clear()

    def _clear(self) -> None:
        self._buffers, self._views = {}, {}
        for name in self._names:
            setattr(self, name, None)

    def _append(self, name: str, new: torch.Tensor, dim: int = -2, capacity=None) -> None:
        capacity = self.capacity if capacity is None else capacity
        self._buffers[name], view = append(self._buffers.get(name), getattr(self, name), new, dim, capacity)
        setattr(self, name, view)
        self._views[name] = view

    def _quantize_into(self, names, *states: torch.Tensor):
        """Per-token quantization of float32 CPU ``states`` (one tensor per three ``names``: codes, scale, zero)
        written by one kernel call each straight into the reserved buffers of ``names``, past the views this layer
        last set there, when those are still its states and there is room: a decode step's quantize and appends
        without their ~30 us of tensor ops per tensor. Returns the grown views for ``_set_views`` (nothing is committed
        before), or None where it does not apply (the caller quantizes and appends). The codes are ``_quantize``'s
        bit for bit."""
        if (self.granularity != "token" or self.storage_dtype is not None or states[0].device.type != "cpu"
                or any(s.dtype != torch.float32 for s in states)):
            return None
        views = [getattr(self, name) for name in names]
        if any(view is None or view is not self._views.get(name) for name, view in zip(names, views)):
            return None
        buffers = [self._buffers[name] for name in names]
        old, new = views[0].shape[-2], states[0].shape[-2]
        if old + new > buffers[0].shape[-2] or buffers[0].shape[:2] != states[0].shape[:2]:
            return None
        kernels = load_cpu_kernels()
        if kernels is None:
            return None
        grown = []
        for i, part in enumerate(states):
            grown += quantize_append_cpu(kernels, part, *buffers[3 * i:3 * i + 3], old, self.bits, self.qmin,
                                         self.qmax)
        return grown

    def _set_views(self, names, views) -> None:
        for name, view in zip(names, views):
            setattr(self, name, view)
            self._views[name] = view

    def _states(self):
        return [getattr(self, name) for name in self._names]

    def _set_states(self, tensors) -> None:
        for name, tensor in zip(self._names, tensors):
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
        if states.device.type == "cpu" and states.dtype == torch.float32:
            kernels = load_cpu_kernels()
            if kernels is not None:
                return quantize_token_cpu(kernels, states, self.bits, self.qmin, self.qmax)
        return quantize_cache_v(states, self.bits, self.qmax, self.qmin, granularity=self.granularity)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs=None, *args, **kwargs):
        """Quantizes the new [b, heads, new_seq, head_dim] states, appends them, returns the whole layer.

        With the ``"channel_groups"`` key layout, ``key_states`` are pre-RoPE and ``cache_kwargs`` may carry their
        ``"positions"`` (see the module docstring)."""
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise ValueError(
                f"key/value states must both be [batch, heads, seq, head_dim], got {tuple(key_states.shape)} "
                f"and {tuple(value_states.shape)}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.key_layout == "channel_groups":
            return self._update_grouped(key_states, value_states, (cache_kwargs or {}).get("positions"))
        views = self._quantize_into(self._names, key_states, value_states)
        if views is not None:  # both written: commit together (a non-finite value raised before this)
            self._set_views(self._names, views)
        else:
            for name, new in zip(self._names, (*self._quantize(key_states), *self._quantize(value_states))):
                self._append(name, new)
        keys = QuantizedStates((self.q_key, self.key_scale, self.key_zero))
        keys.fresh = (key_states, value_states) if self.granularity == "token" else None
        return keys, (self.q_value, self.value_scale, self.value_zero)

    def _update_grouped(self, key_states, value_states, positions):
        """Appends to the key residual, quantizes the groups it completes, and the values per token."""
        b, heads, n, d = key_states.shape
        past = self.get_seq_length()
        if positions is None:
            positions = torch.arange(past, past + n, device=key_states.device).expand(b, n)
        if tuple(positions.shape) != (b, n):
            raise ValueError(f"positions must be [batch, new_seq] = {(b, n)}, got {tuple(positions.shape)}")
        positions = positions.to(device=key_states.device, dtype=torch.int32)
        if self.storage_dtype is not None:
            key_states = key_states.to(self.storage_dtype)
        value_names = ("q_value", "value_scale", "value_zero")
        value_views = self._quantize_into(value_names, value_states)
        values = self._quantize(value_states) if value_views is None else None
        if self.q_key is None:
            empty = key_states.new_zeros(b, heads, 0, d)
            self.q_key = torch.zeros(b, heads, 0, d // 2, dtype=torch.uint8, device=key_states.device)
            self.key_scale, self.key_zero, self.key_residual = empty, empty, empty
            self.key_positions = positions[:, :0]
        if value_views is not None:
            self._set_views(value_names, value_views)
        else:
            for name, new in zip(value_names, values):
                self._append(name, new)
        self._append("key_positions", positions, dim=-1)
        pending = torch.cat((self.key_residual, key_states), dim=-2)
        full = pending.shape[-2] // KEY_GROUP_SIZE * KEY_GROUP_SIZE
        if full:
            start = self.q_key.shape[-2]
            valid = self.key_positions[:, start:start + full] >= 0
            q_key, key_scale, key_zero = quantize_key_groups(pending[..., :full, :], KEY_GROUP_SIZE, valid)
            groups = -(-self.capacity // KEY_GROUP_SIZE)
            self._append("q_key", q_key)
            self._append("key_scale", key_scale, capacity=groups)
            self._append("key_zero", key_zero, capacity=groups)
        self.key_residual = pending[..., full:, :].clone() if full else pending
        keys = GroupedKeys(self.q_key, self.key_scale, self.key_zero, self.key_residual, self.key_positions)
        return keys, (self.q_value, self.value_scale, self.value_zero)

    def get_seq_length(self) -> int:
        return 0 if self.q_value is None else self.q_value.shape[-2]

    def room(self, filled: int):
        """The reserved buffers of (q_key, key_scale, key_zero, q_value, value_scale, value_zero), [b, h, capacity, .],
        when this is an 8-bit token-layout layer (float32 scales and zeros) holding ``filled`` positions as the
        prefix views it last set, with at least one slot after them: for a caller that quantizes the next position
        into them itself (the fused decode step, qwen_model/cpu_decode_step.py) and then calls ``commit``; None
        otherwise (append through ``update``)."""
        if (self.bits != 8 or self.key_layout != "token" or self.granularity != "token"
                or self.storage_dtype is not None or not self.is_initialized):
            return None
        buffers = []
        for name in self._names:
            view, buffer = getattr(self, name), self._buffers.get(name)
            if (buffer is None or view is None or view is not self._views.get(name) or view.shape[-2] != filled
                    or buffer.shape[-2] <= filled or view.data_ptr() != buffer.data_ptr()):
                return None
            buffers.append(buffer)
        if buffers[0].dtype != torch.uint8 or buffers[1].dtype != torch.float32:
            return None
        return buffers

    def commit(self, filled: int) -> None:
        """Takes the first ``filled`` positions of the buffers (the caller wrote the last after ``room``) as filled."""
        self._set_views(self._names, [self._buffers[name].narrow(-2, 0, filled) for name in self._names])

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
        if self.key_layout == "channel_groups":
            quantized = self.q_key.shape[-2]
            if keep < quantized:
                raise ValueError(f"cannot crop to {keep} positions: the first {quantized} keys are quantized in "
                                 f"groups of {KEY_GROUP_SIZE}, which a crop cannot split")
            self.key_residual = self.key_residual[..., :keep - quantized, :]
            self.key_positions = self.key_positions[:, :keep]
            self.q_value, self.value_scale, self.value_zero = (
                t[..., :keep, :] for t in (self.q_value, self.value_scale, self.value_zero))
            return
        self._set_states(t[..., :keep, :] for t in self._states())

    def _map_batch(self, fn) -> None:
        if self.q_key is not None:
            self._set_states(fn(t) for t in self._states())

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search's reorder; an int8 token-layout layer with room left (see ``room``) writes it back into its
        reserved buffers, so its states stay their prefix views and the fused decode step keeps taking them."""
        filled = self.get_seq_length()
        if filled and self.room(filled) is not None:
            for name in self._names:
                view = getattr(self, name)
                view.copy_(view.index_select(0, beam_idx.to(view.device)))
            return
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
    """Cache of ``QuantizedKVLayer``; layers are created lazily, or up front from ``config.num_hidden_layers``.

    ``key_layout`` None picks ``default_key_layout(bits, granularity)``; ``capacity`` positions are reserved per
    layer at its first update (``kvcache.reserved``)."""

    def __init__(self, bits: int = 8, granularity: str = "token", config=None, storage_dtype=None, key_layout=None,
                 capacity: int = 0):
        key_layout = default_key_layout(bits, granularity) if key_layout is None else key_layout
        _validate(bits, granularity, storage_dtype, key_layout)
        make_layer = partial(QuantizedKVLayer, bits=bits, granularity=granularity, storage_dtype=storage_dtype,
                             key_layout=key_layout, capacity=capacity)
        self.bits = bits
        self.granularity = granularity
        self.storage_dtype = storage_dtype
        self.key_layout = key_layout
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
