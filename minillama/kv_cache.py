"""The one cache type: preallocated K and V plus the fill length of each row.

``seq_lens`` (on the device, read by kernels) and ``seq_lens_cpu`` (its host copy, used for
capacity checks without a device sync) change together, in this class only: :meth:`KVCache.advance`
after a forward, and the row operations (:meth:`set_lengths`, :meth:`reset_row`) that cut or free
rows. Nothing infers the fill from a tensor's shape: ``max_len`` is the capacity, and
:meth:`grow` raises it keeping the contents.

Layers see one layer's view (:class:`LayerCache`): that layer's K and V and the shared lengths.
"""
from dataclasses import dataclass
from typing import List, Sequence, Union

import torch

from minillama.config import LlamaConfig


@dataclass
class LayerCache:
    """One layer's view of a :class:`KVCache`, as flashcore takes it."""

    k: torch.Tensor  # (B, max_len, H_kv, D)
    v: torch.Tensor  # (B, max_len, H_kv, D)
    seq_lens: torch.Tensor  # (B,) int32 on the device
    seq_lens_cpu: List[int]  # host copy of seq_lens


@dataclass
class KVCache:
    k: torch.Tensor  # (n_layers, B, max_len, H_kv, D)
    v: torch.Tensor  # (n_layers, B, max_len, H_kv, D)
    seq_lens: torch.Tensor  # (B,) int32 on the device: tokens cached per row
    seq_lens_cpu: List[int]  # host copy of seq_lens

    @classmethod
    def allocate(cls, config: LlamaConfig, batch: int, max_len: int, device, dtype,
                 n_kv_heads: int = None) -> "KVCache":
        """An empty cache of ``batch`` rows holding ``max_len`` tokens each.

        n_kv_heads: the heads this process keeps (default all of the config's).
        """
        heads = n_kv_heads or config.num_key_value_heads
        shape = (config.num_hidden_layers, batch, max_len, heads, config.head_dim)
        return cls(
            k=torch.empty(shape, dtype=dtype, device=device),
            v=torch.empty(shape, dtype=dtype, device=device),
            seq_lens=torch.zeros(batch, dtype=torch.int32, device=device),
            seq_lens_cpu=[0] * batch,
        )

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self.k[i], self.v[i], self.seq_lens, self.seq_lens_cpu)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows [start, stop) (e.g. the first rows for a bucketed decode step, or one row
        to prefill one request): same storage, so the forward's writes land in this cache. Its
        host lengths are a copy: advance this cache, not the view."""
        if (start, stop) == (0, self.batch):
            return self
        return KVCache(self.k[:, start:stop], self.v[:, start:stop], self.seq_lens[start:stop],
                       self.seq_lens_cpu[start:stop])

    def advance(self, n: Union[int, Sequence[int]]) -> None:
        """Mark n more tokens (one count for all rows, or one per row) as cached, after a forward."""
        if isinstance(n, int):
            self.seq_lens_cpu = [a + n for a in self.seq_lens_cpu]
            self.seq_lens += n
        else:
            self.set_lengths([a + int(b) for a, b in zip(self.seq_lens_cpu, n, strict=True)])

    def set_lengths(self, lengths: Sequence[int]) -> None:
        """Set the fill of each row (e.g. to drop tokens at the end when a conversation is cut)."""
        lengths = [int(x) for x in lengths]
        if len(lengths) != self.batch or any(not 0 <= n <= self.max_len for n in lengths):
            raise ValueError(f"lengths {lengths} must be {self.batch} fills in [0, {self.max_len}]")
        self.seq_lens_cpu = lengths
        host = torch.tensor(lengths, dtype=torch.int32)
        if self.seq_lens.is_cuda:  # from pinned memory the copy is queued: the host does not wait for the device
            host = host.pin_memory()
        self.seq_lens.copy_(host, non_blocking=True)

    def reset_row(self, row: int) -> None:
        """Empty one row (fill 0), keeping the others: the row is free for a new sequence."""
        lengths = list(self.seq_lens_cpu)
        lengths[row] = 0
        self.set_lengths(lengths)

    def grow(self, max_len: int) -> None:
        """Raise the capacity to ``max_len`` tokens per row, keeping every row's cached tokens."""
        if max_len <= self.max_len:
            return
        fill = max(self.seq_lens_cpu, default=0)
        shape = (*self.k.shape[:2], max_len, *self.k.shape[3:])
        k = torch.empty(shape, dtype=self.k.dtype, device=self.k.device)
        v = torch.empty(shape, dtype=self.v.dtype, device=self.v.device)
        k[:, :, :fill] = self.k[:, :, :fill]  # (n_layers, B, fill, H_kv, D)
        v[:, :, :fill] = self.v[:, :, :fill]
        self.k, self.v = k, v
