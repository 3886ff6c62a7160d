"""KV-cache tensors grown in place along the sequence axis, into capacity reserved for a whole ``generate()`` call.

transformers' ``DynamicCache`` appends with ``torch.cat``: every decoded token copies each layer's whole cache into
a freshly allocated tensor, and on CPU that copy (with the page faults of the new allocation) costs more than the
layer's matmuls once the context is ~1k tokens (SmolLM2-135M, Int4 weights: ~85% of a decode step). A layer given a
``capacity`` allocates that many positions once and writes each step after the filled ones; the states it returns
are prefix views of the buffer. Without a reservation, or past it, a tensor grows to exactly the length it needs, as
``torch.cat`` would, so ``cache_nbytes`` of an unreserved cache is what it always was; a reserved cache holds (and
reports) its whole capacity from the first update.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvcache.cpu_kernels import load_cpu_kernels


def append(buffer: torch.Tensor | None, filled: torch.Tensor | None, new: torch.Tensor, dim: int,
           capacity: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Appends ``new`` after ``filled`` along ``dim``; returns ``(buffer, view of the filled part)``.

    Writes in place when ``filled`` is a prefix view of ``buffer`` and the buffer has room; otherwise allocates
    ``max(capacity, needed)`` positions and copies ``filled`` over. ``filled`` may be any tensor (or None / empty):
    one that is not a view of ``buffer`` (e.g. after ``reorder_cache``) is simply copied. On CPU the in-place case is
    one call of the CPU kernels' ``append_in_place`` (these same checks and copy) when they are built."""
    dim = dim % new.dim()
    if buffer is not None and filled is not None and new.device.type == "cpu":
        kernels = load_cpu_kernels()
        view = None if kernels is None else kernels.append_in_place(buffer, filled, new, dim)
        if view is not None:
            return buffer, view
    old = 0 if filled is None or filled.numel() == 0 else filled.shape[dim]
    needed = old + new.shape[dim]
    in_place = (buffer is not None and old > 0 and filled.data_ptr() == buffer.data_ptr()
                and filled.stride() == buffer.stride() and buffer.shape[dim] >= needed
                and buffer.dtype == new.dtype == filled.dtype and buffer.device == new.device
                and buffer.shape[:dim] == new.shape[:dim] == filled.shape[:dim]
                and buffer.shape[dim + 1:] == new.shape[dim + 1:] == filled.shape[dim + 1:])
    if not in_place:
        size = list(new.shape)
        size[dim] = max(capacity, needed)
        grown = new.new_empty(size)
        if old:
            grown.narrow(dim, 0, old).copy_(filled)
        buffer = grown
    buffer.narrow(dim, old, new.shape[dim]).copy_(new)
    return buffer, buffer.narrow(dim, 0, needed)


class ReservedLayer(DynamicLayer):
    """``DynamicLayer`` whose keys/values grow in place into ``capacity`` positions (see the module docstring)."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        self._buffers = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._buffers["keys"], self.keys = append(self._buffers.get("keys"), self.keys, key_states, -2,
                                                  self.capacity)
        self._buffers["values"], self.values = append(self._buffers.get("values"), self.values, value_states, -2,
                                                      self.capacity)
        return self.keys, self.values

    def room(self, filled: int):
        """(key buffer, value buffer) [b, h, capacity, d] when this layer holds ``filled`` positions as prefix views of
        them and at least one slot follows, for a caller that writes the next position there itself (the fused
        decode step, qwen_model/cpu_decode_step.py) and then calls ``commit``; None otherwise (append through
        ``update``)."""
        keys, values = self._buffers.get("keys"), self._buffers.get("values")
        if keys is None or values is None or not self.is_initialized:
            return None
        view_k, view_v = self.keys, self.values
        if (view_k.shape[-2] != filled or view_v.shape[-2] != filled or keys.shape[-2] <= filled
                or values.shape[-2] <= filled or view_k.data_ptr() != keys.data_ptr()
                or view_v.data_ptr() != values.data_ptr() or view_k.shape[:-2] != keys.shape[:-2]
                or view_v.shape[:-2] != values.shape[:-2]):
            return None
        return keys, values

    def commit(self, filled: int) -> None:
        """Takes the first ``filled`` positions of the buffers (the caller wrote the last after ``room``) as filled."""
        self.keys = self._buffers["keys"].narrow(-2, 0, filled)
        self.values = self._buffers["values"].narrow(-2, 0, filled)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search's reorder written back into the reserved buffers, so the filled states stay their prefix views
        (and the next position is appended in place, or by the fused decode step) rather than becoming new tensors."""
        filled = self.get_seq_length()
        if filled == 0 or self.room(filled) is None:
            return super().reorder_cache(beam_idx)
        for view in (self.keys, self.values):
            view.copy_(view.index_select(0, beam_idx.to(view.device)))

    def reset(self) -> None:
        self._buffers = {}
        super().reset()


class ReservedCache(Cache):
    """The float cache ``QWenLMHeadModel.generate()`` uses: ``ReservedLayer``s of ``capacity`` positions."""

    def __init__(self, capacity: int = 0, config=None):
        num_layers = getattr(config, "num_hidden_layers", None) if config is not None else None
        if num_layers is not None:
            super().__init__(layers=[ReservedLayer(capacity) for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=lambda: ReservedLayer(capacity))
