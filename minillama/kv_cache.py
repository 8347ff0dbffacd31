"""The one cache type: preallocated K and V plus the fill length of each row.

``seq_lens`` (on the device, read by kernels) and ``lengths`` (its host copy, used for capacity
checks without a device sync) change together in :meth:`KVCache.advance`, the only place where
the fill moves. Nothing infers the fill from a tensor's shape: ``max_len`` is the capacity.
"""
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from minillama.config import LlamaConfig


@dataclass
class KVCache:
    k: torch.Tensor  # (n_layers, B, max_len, H_kv, D)
    v: torch.Tensor  # (n_layers, B, max_len, H_kv, D)
    seq_lens: torch.Tensor  # (B,) int32 on the device: tokens cached per row
    lengths: list  # host copy of seq_lens

    @classmethod
    def allocate(cls, config: LlamaConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        return cls(
            k=torch.empty(shape, dtype=dtype, device=device),
            v=torch.empty(shape, dtype=dtype, device=device),
            seq_lens=torch.zeros(batch, dtype=torch.int32, device=device),
            lengths=[0] * batch,
        )

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def advance(self, n: Union[int, Sequence[int]]) -> None:
        """Mark n more tokens (one count for all rows, or one per row) as cached, after a forward."""
        counts = [n] * self.batch if isinstance(n, int) else [int(x) for x in n]
        self.lengths = [a + b for a, b in zip(self.lengths, counts)]
        if isinstance(n, int):
            self.seq_lens += n
        else:
            self.seq_lens.copy_(torch.tensor(self.lengths, dtype=torch.int32))

    def reset(self, lengths: Sequence[int]) -> None:
        """Set the fill of each row (e.g. to drop tokens at the end when a conversation is cut)."""
        self.lengths = [int(x) for x in lengths]
        self.seq_lens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
