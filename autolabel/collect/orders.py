"""The definitions every choice of collection rests on: token keys, hashed priorities,
total orders, and the log-spaced histogram bins.

Every choice is a pure function of the activations, not of the order they
arrive in: ties in the top-k break by token position, and reservoir sampling
keeps the smallest priorities, where a priority is a hash of (token position,
feature). So a resumed run keeps exactly the same examples, and a dense
brute-force reference can reproduce them.

Histograms are log-spaced: `bins_per_octave` bins per factor of 2 below a
per-feature ceiling 2^e (the smallest power of two at or above the feature's
max so far), plus one bin for everything further down. When a feature's max
grows past its ceiling, its bins shift down by whole octaves and the lowest
ones merge, which needs no second pass over the data. Quantile bins (equal
counts of per-window peaks) are unions of these bins, so sampling within each
quantile bin stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autolabel.config import ROLES

N_ROLES = len(ROLES)
POS_BITS = 20  # a token key is doc_ordinal << POS_BITS | position in the document
MAX_DOC_TOKENS = 1 << POS_BITS
EMPTY_KEY = torch.iinfo(torch.int64).max  # sorts after every real key and priority
UNSET = -1000  # exponent of a feature that has not fired yet


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values stay below 2^59, so int64 never overflows)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def feature_salts(n_features: int, seed: int) -> torch.Tensor:
    return mix32((torch.arange(n_features) * 0x9E37 + seed) & 0xFFFFFFFF)


def priorities(keys: torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
    """Uniform-looking 62-bit priorities of (token key, feature) pairs, broadcast; int64.

    The high 31 bits mix the key with the feature's salt; the low 31 bits depend on the
    key alone and only break ties, so there is one full hash per pair, not three.
    """
    key_hash = mix32((keys & 0xFFFFFFFF) ^ mix32((keys >> 32) + 0x5BD1E995))
    return ((mix32(key_hash ^ salts) >> 1) << 31) | (mix32(key_hash ^ 0x27D4EB2F) >> 1)


def value_key_order(values: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per column, the row order by (value desc, key asc); sorts run along contiguous rows (2x faster)."""
    values, keys = values.T.contiguous(), keys.T.contiguous()
    order = keys.argsort(dim=1, stable=True)
    return order.gather(1, (-values.gather(1, order)).argsort(dim=1, stable=True)).T


def repeated_hashes(order: torch.Tensor, hashes: torch.Tensor) -> torch.Tensor:
    """[M, n] bool: rows whose hash already occurred higher up in `order` (per column)."""
    ranked = hashes.gather(0, order).T.contiguous()  # [n, M]
    by_hash = ranked.argsort(dim=1, stable=True)
    grouped = ranked.gather(1, by_hash)
    repeat = torch.zeros_like(grouped, dtype=torch.bool)
    repeat[:, 1:] = grouped[:, 1:] == grouped[:, :-1]
    return torch.zeros_like(repeat).scatter_(1, order.T.gather(1, by_hash), repeat).T


@dataclass(frozen=True)
class LogBins:
    """Log-spaced histogram bins below a per-feature power-of-two ceiling."""

    per_octave: int
    octaves: int

    @property
    def n(self) -> int:
        return self.per_octave * self.octaves + 1

    def exponent_of(self, max_values: torch.Tensor) -> torch.Tensor:
        """Smallest e with 2^e >= max; values must be > 0."""
        return torch.ceil(torch.log2(max_values)).long()

    def bin_of(self, values: torch.Tensor, exponents: torch.Tensor) -> torch.Tensor:
        """Bin index in [0, n) of positive values under ceilings 2^exponents (broadcast)."""
        fine = torch.ceil(self.per_octave * torch.log2(values)).long()
        return (fine - self.per_octave * exponents + self.n - 1).clamp(0, self.n - 1)

    def edges(self, exponents: torch.Tensor) -> torch.Tensor:
        """[n + 1, F] bin edges; bin g holds values in (edges[g], edges[g + 1]]."""
        steps = torch.arange(self.n, dtype=torch.float64)[:, None] - (self.n - 1)  # [n, 1], top bin 0
        upper = torch.exp2(exponents.double()[None, :] + steps / self.per_octave)  # [n, F]
        return torch.cat([torch.zeros_like(upper[:1]), upper], dim=0)


def quantile_bins(hist_peaks: torch.Tensor, n_bins: int) -> torch.Tensor:
    """[G, F] -> quantile bin of each histogram bin: equal counts of window peaks, at histogram edges.

    A histogram bin goes to the quantile its first peak falls in, so a quantile bin is a
    union of consecutive histogram bins (and may be empty when one histogram bin is heavy).
    """
    total = hist_peaks.sum(0).clamp_min(1)
    before = hist_peaks.cumsum(0) - hist_peaks
    return (n_bins * before // total).clamp_max(n_bins - 1)
