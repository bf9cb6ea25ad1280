"""The streaming state of collection for one layer: everything kept per feature, updated batch by batch.

Memory is features x examples kept, never corpus length: counts per (category,
role), histograms, the top-k contexts, reservoir samples per activation bin and
non-activating contexts. Every update is a tensor operation over all features at
once; the only Python loop runs over the windows of a batch.

The keys, priorities, orders and histogram bins it uses are defined in orders.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autolabel.collect.orders import (
    EMPTY_KEY,
    N_ROLES,
    UNSET,
    LogBins,
    feature_salts,
    mix32,
    priorities,
    repeated_hashes,
    value_key_order,
)
from autolabel.collect.tensors import CONTEXT_DTYPE, LayerTensors
from autolabel.config import CollectConfig


@dataclass
class Batch:
    """Per-token facts about a batch of windows [B, S], aligned with the activations."""

    valid: torch.Tensor  # [B, S] bool: a real token and not the window's first (an attention sink)
    roles: torch.Tensor  # [B, S] int64 role codes
    turn_keys: torch.Tensor  # [B, S] int64: doc_ordinal << POS_BITS | turn << 3 | role
    keys: torch.Tensor  # [B, S] int64 token keys
    tokens: torch.Tensor  # [B, S] int64 token ids
    categories: torch.Tensor  # [B] int64 category index
    lengths: torch.Tensor  # [B] int64 window length (with the first token)


@dataclass
class Peaks:
    """Each window's peak per feature and its context, all [B, F]."""

    value: torch.Tensor  # the window's largest activation (0 when silent)
    key: torch.Tensor  # its token key
    first: torch.Tensor  # first position of its context in the window
    length: torch.Tensor  # context length
    hash: torch.Tensor  # of the context's tokens up to the peak
    ctx_key: torch.Tensor  # token key of the context's first token


class LayerState:
    """What collection keeps for one layer's `d_feat` features."""

    def __init__(self, d_feat: int, n_categories: int, config: CollectConfig):
        self.config = config
        self.bins = LogBins(config.bins_per_octave, config.octaves)
        F, G, K, P, T = d_feat, self.bins.n, config.top_k, config.per_bin, config.example_tokens
        n_groups = n_categories * N_ROLES  # (category, role) pairs, category-major
        self.d_feat, self.n_groups = F, n_groups
        self.salts = feature_salts(F, config.seed)
        self.tensors = LayerTensors.empty(F, n_groups, G, K, P, T, config.random_examples)
        self._close_turns()

    # -- one batch ------------------------------------------------------------

    def update(self, acts: torch.Tensor, batch: Batch) -> None:
        """acts [B, S, F] dense feature activations of one batch of windows (zeroed in place where not valid).

        Everything but the per-group sums reads only the positive activations, listed once here (a
        TopK transcoder fires on k of F features a token). Activations are never negative (ReLU, TopK
        after its ReLU, JumpReLU above a positive threshold), so the zeros left out are all there is.
        """
        acts.mul_(batch.valid.unsqueeze(-1))
        valid = batch.valid.reshape(-1)
        rows = valid.nonzero().squeeze(1)  # [N] valid tokens, stream order
        if len(rows) == 0:
            return
        fired = Fired.of(acts)
        peaks = self._peaks(acts, fired, batch)
        self._raise_ceilings(peaks.value.amax(0))
        groups = (batch.categories[:, None] * N_ROLES + batch.roles).reshape(-1)  # [B * S]
        tokens = acts.reshape(-1, self.d_feat).index_select(0, rows)  # [N, F]
        self._token_stats(tokens, groups[rows], batch.roles.reshape(-1), fired, groups)
        self._turn_stats(fired, batch.turn_keys.reshape(-1), rows, groups)
        fired_windows, fired_features = (peaks.value > 0).nonzero(as_tuple=True)
        self._add_histogram("hist_peaks", peaks.value[fired_windows, fired_features], fired_features)
        self._top_k(fired, peaks)
        self._reservoirs(fired, peaks)
        if self.config.random_examples:
            self._negatives(fired, batch)

    def _raise_ceilings(self, batch_max: torch.Tensor) -> None:
        fired = batch_max > 0
        needed = self.bins.exponent_of(batch_max.clamp_min(1e-30))
        unset = fired & (self.tensors.exponent == UNSET)
        self.tensors.exponent[unset] = needed[unset]
        grow = fired & ~unset & (needed > self.tensors.exponent)
        if grow.any():
            cols = grow.nonzero().squeeze(1)
            self._shift_bins(cols, self.bins.per_octave * (needed[cols] - self.tensors.exponent[cols]))
            self.tensors.exponent[cols] = needed[cols]

    def _shift_bins(self, cols: torch.Tensor, shift: torch.Tensor) -> None:
        """Move features `cols` down by `shift` bins; bins pushed below 0 merge into bin 0."""
        G, P = self.bins.n, self.config.per_bin
        dest = (torch.arange(G)[:, None] - shift[None, :]).clamp_min(0)  # [G, n]
        for name in ("hist_tokens", "hist_peaks"):
            counts = getattr(self.tensors, name)
            counts[:, cols] = torch.zeros(G, len(cols), dtype=torch.long).scatter_add_(0, dest, counts[:, cols])
        # Reservoirs: bin 0 keeps the P smallest priorities of everything merging into it;
        # bin g >= 1 takes old bin g + shift whole. Index G * P is an empty slot.
        prio = self.tensors.res_prio[:, :, cols]  # [G, P, n]
        merging = torch.where((dest == 0)[:, None, :], prio, EMPTY_KEY).reshape(G * P, -1)
        smallest, bottom = merging.topk(P, dim=0, largest=False)  # [P, n]
        bottom = torch.where(smallest == EMPTY_KEY, G * P, bottom)  # fewer than P merged: empty slots
        source_bin = torch.arange(1, G)[:, None] + shift[None, :]  # [G - 1, n]
        moved = source_bin[:, None, :] * P + torch.arange(P)[None, :, None]  # [G - 1, P, n]
        moved = torch.where(source_bin[:, None, :] < G, moved, G * P).reshape((G - 1) * P, -1)
        source = torch.cat([bottom, moved])  # [G * P, n]
        for name in ("res_prio", "res_value", "res_key", "res_ctx", "res_len", "res_acts"):
            target = getattr(self.tensors, name)
            old = target[:, :, cols]  # [G, P, n, ...]
            flat = old.reshape(G * P, *old.shape[2:])
            empty = torch.full_like(flat[:1], EMPTY_KEY if name == "res_prio" else 0)
            index = source.reshape(*source.shape, *([1] * (flat.dim() - 2))).expand(-1, -1, *flat.shape[2:])
            target[:, :, cols] = torch.cat([flat, empty]).gather(0, index).reshape(old.shape)

    def _add_histogram(self, name: str, values: torch.Tensor, features: torch.Tensor) -> None:
        """Counts positive values [n] of features [n] in their feature's bins."""
        bins = self.bins.bin_of(values, self.tensors.exponent[features])
        counts = torch.bincount(bins * self.d_feat + features, minlength=self.bins.n * self.d_feat)
        getattr(self.tensors, name).add_(counts.view(self.bins.n, self.d_feat))

    def _token_stats(
        self, tokens: torch.Tensor, token_groups: torch.Tensor, roles: torch.Tensor, fired: Fired, groups: torch.Tensor
    ) -> None:
        """tokens [N, F] and token_groups [N] of the valid tokens; roles and groups [B * S] of every position."""
        one_hot = torch.nn.functional.one_hot(token_groups, self.n_groups).float()  # [N, n_groups]
        self.tensors.group_tokens.add_(torch.bincount(token_groups, minlength=self.n_groups))
        self.tensors.group_active.view(-1).add_(
            torch.bincount(groups[fired.token] * self.d_feat + fired.feature, minlength=self.n_groups * self.d_feat)
        )
        self.tensors.group_sum.add_((one_hot.T @ tokens).double())
        self.tensors.role_max.view(-1).scatter_reduce_(
            0, roles[fired.token] * self.d_feat + fired.feature, fired.value, "amax"
        )
        self._add_histogram("hist_tokens", fired.value, fired.feature)

    def _turn_stats(self, fired: Fired, turn_keys: torch.Tensor, rows: torch.Tensor, groups: torch.Tensor) -> None:
        """A turn (its tokens of one role) is active for a feature if the feature fires on any of them.

        turn_keys and groups [B * S] of every position, rows [N] the valid ones. A turn's tokens
        need not be contiguous (a chat's closing marker follows the last message's content) and
        may span windows and batches, so turns stay open until the end of the shard (which ends
        at a document boundary); the windows of a shard may then come in any order.
        """
        unique, inverse = torch.unique(turn_keys[rows], return_inverse=True)
        turn_of = torch.zeros_like(turn_keys).index_put_((rows,), inverse)  # [B * S] -> index into unique
        seg_active = torch.zeros(len(unique), self.d_feat, dtype=torch.bool)
        seg_active[turn_of[fired.token], fired.feature] = True
        seg_groups = torch.zeros(len(unique), dtype=torch.long).scatter_(0, inverse, groups[rows])
        known = torch.isin(unique, self.open_turn_keys)
        self.open_turn_active[torch.searchsorted(self.open_turn_keys, unique[known])] |= seg_active[known]
        if (~known).any():
            keys = torch.cat([self.open_turn_keys, unique[~known]])
            order = keys.argsort()
            self.open_turn_keys = keys[order]
            self.open_turn_groups = torch.cat([self.open_turn_groups, seg_groups[~known]])[order]
            self.open_turn_active = torch.cat([self.open_turn_active, seg_active[~known]])[order]

    def flush_turns(self) -> None:
        """Count the open turns: at the end of a shard, which always ends at a document boundary."""
        self._count_turns(self.open_turn_groups, self.open_turn_active)
        self._close_turns()

    def _close_turns(self) -> None:
        self.open_turn_keys = torch.zeros(0, dtype=torch.long)  # sorted
        self.open_turn_groups = torch.zeros(0, dtype=torch.long)
        self.open_turn_active = torch.zeros(0, self.d_feat, dtype=torch.bool)

    def _count_turns(self, groups: torch.Tensor, seg_active: torch.Tensor) -> None:
        self.tensors.group_turns.add_(torch.bincount(groups, minlength=self.n_groups))
        self.tensors.group_turns_active.index_add_(0, groups, seg_active.long())

    def _peaks(self, acts: torch.Tensor, fired: Fired, batch: Batch) -> Peaks:
        """Each window's peak per feature (its first position; position 0 when silent), with the span of its
        context and a hash of what leads up to it."""
        T = self.config.example_tokens
        B, S, F = acts.shape
        pair = fired.window * F + fired.feature
        value = torch.zeros(B * F).scatter_reduce_(0, pair, fired.value, "amax")
        at_peak = fired.value == value[pair]
        position = torch.full((B * F,), S).scatter_reduce_(0, pair[at_peak], fired.position[at_peak], "amin")
        value, position = value.view(B, F), position.masked_fill_(position == S, 0).view(B, F)
        # Context span for a peak at every position p: ~T tokens around p, inside the window, after its first token.
        p = torch.arange(acts.shape[1])[None, :]  # [1, S]
        lengths = batch.lengths[:, None]
        first = torch.minimum((p - T // 2).clamp_min(1), (lengths - T).clamp_min(1))  # [B, S]
        length = torch.minimum(lengths - first, torch.tensor(T))
        # The activation at a peak depends on nothing after it (causal attention), so contexts
        # that agree up to the peak show the same thing: hash the tokens from `first` to p.
        offsets = torch.arange(T)
        at = (first[..., None] + offsets).clamp_max(acts.shape[1] - 1)  # [B, S, T]
        tokens = batch.tokens.gather(1, at.reshape(len(at), -1)).view(at.shape)
        mixed = mix32(((tokens + 1) ^ (offsets << 17)) & 0xFFFFFFFF)
        prefix_hash = (mixed * (at <= p[..., None])).sum(-1) + (p - first)  # [B, S]
        return Peaks(
            value=value,
            key=batch.keys.gather(1, position),
            first=first.gather(1, position),
            length=length.gather(1, position),
            hash=prefix_hash.gather(1, position),
            ctx_key=batch.keys.gather(1, first.gather(1, position)),
        )

    def _context_acts(self, fired: Fired, peaks: Peaks, windows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """[n, T] activations across the contexts of n distinct (window, feature) peaks, zero past their end.

        Read from the fired list rather than gathered from the dense tensor: n x T scattered reads
        there cost a cache miss each, more than one pass over the fired list.
        """
        context = torch.zeros(len(windows), self.config.example_tokens)
        if len(windows) == 0:
            return context.to(CONTEXT_DTYPE)
        first, length = peaks.first[windows, features], peaks.length[windows, features]
        row_of = torch.full((peaks.first.numel(),), -1)  # [B * F] -> row among the n, -1 when not asked for
        row_of[windows * self.d_feat + features] = torch.arange(len(windows))
        row = row_of[fired.window * self.d_feat + fired.feature]  # [n_fired]
        offset = fired.position - first[row]
        inside = (row >= 0) & (offset >= 0) & (offset < length[row])
        context[row[inside], offset[inside]] = fired.value[inside]
        return context.to(CONTEXT_DTYPE)

    def _top_k(self, fired: Fired, peaks: Peaks) -> None:
        """Merge each window's peak into the top k by (value desc, key asc), one entry per distinct context.

        Slots are unordered: a new entry takes the slot of one that dropped out, so kept
        contexts never move (`top_order` sorts them at the end).
        """
        K = self.config.top_k
        peaked = peaks.value > 0
        candidate = torch.where(peaked, peaks.value, float("-inf"))
        # Only features where some window reaches the current k-th entry can change.
        cols = (peaked & (candidate >= self.tensors.top_value.amin(0))).any(0).nonzero().squeeze(1)
        if len(cols) == 0:
            return
        values = torch.cat([self.tensors.top_value[:, cols], candidate[:, cols]])  # [K + B, n]
        keys = torch.cat([self.tensors.top_key[:, cols], torch.where(peaked[:, cols], peaks.key[:, cols], EMPTY_KEY)])
        hashes = torch.cat([self.tensors.top_hash[:, cols], peaks.hash[:, cols]])
        # A context already ranked higher (same tokens, e.g. a repeated system prompt) is dropped.
        duplicate = repeated_hashes(value_key_order(values, keys), hashes)
        values = values.masked_fill(duplicate, float("-inf"))
        keys = keys.masked_fill(duplicate, EMPTY_KEY)
        order = value_key_order(values, keys)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order))[:, None].expand_as(order))
        freed = rank[:K] >= K  # [K, n] old slots that dropped out
        admitted = rank[K:] < K  # [B, n] windows that got in (as many as freed slots, per column)
        # The i-th admitted window of a column takes its i-th freed slot.
        free_slots = torch.full((K + 1, len(cols)), K, dtype=torch.long)
        free_slots.scatter_(
            0, torch.where(freed, freed.long().cumsum(0) - 1, K), torch.arange(K)[:, None].expand(K, len(cols))
        )
        window, col = admitted.nonzero(as_tuple=True)
        slot = free_slots[(admitted.long().cumsum(0) - 1)[window, col], col]
        feature = cols[col]
        self.tensors.top_value[slot, feature] = values[K + window, col]
        self.tensors.top_key[slot, feature] = keys[K + window, col]
        self.tensors.top_hash[slot, feature] = hashes[K + window, col]
        self.tensors.top_ctx[slot, feature] = peaks.ctx_key[window, feature]
        self.tensors.top_len[slot, feature] = peaks.length[window, feature]
        self.tensors.top_acts[slot, feature] = self._context_acts(fired, peaks, window, feature)
        # Old entries that were duplicates or fell out without a replacement become empty.
        emptied = freed & ~torch.zeros_like(freed).index_put_((slot, col), torch.ones_like(slot, dtype=torch.bool))
        empty_slot, empty_col = emptied.nonzero(as_tuple=True)
        self.tensors.top_value[empty_slot, cols[empty_col]] = float("-inf")
        self.tensors.top_key[empty_slot, cols[empty_col]] = EMPTY_KEY

    # -- merging ----------------------------------------------------------------

    def merge(self, other: LayerState) -> None:
        """Fold in the state of other documents (another corpus slice, collected elsewhere).

        The result equals one pass over both: counts add; both sides shift their bins to the
        common ceiling (exactly as one stream would have); each reservoir bin keeps the P smallest
        priorities of the two; the top k is re-selected from both, one entry per context; the
        silent contexts keep the smallest priorities. `other` is consumed.
        """
        for name in ("group_tokens", "group_active", "group_sum", "group_turns", "group_turns_active"):
            getattr(self.tensors, name).add_(getattr(other.tensors, name))
        torch.maximum(self.tensors.role_max, other.tensors.role_max, out=self.tensors.role_max)
        ceiling = torch.maximum(self.tensors.exponent, other.tensors.exponent)
        for state in (self, other):
            cols = ((state.tensors.exponent != UNSET) & (ceiling > state.tensors.exponent)).nonzero().squeeze(1)
            if len(cols):
                state._shift_bins(cols, self.bins.per_octave * (ceiling[cols] - state.tensors.exponent[cols]))
            state.tensors.exponent.copy_(ceiling)
        self.tensors.hist_tokens.add_(other.tensors.hist_tokens)
        self.tensors.hist_peaks.add_(other.tensors.hist_peaks)

        P = self.config.per_bin
        _, keep = torch.cat([self.tensors.res_prio, other.tensors.res_prio], dim=1).topk(
            P, dim=1, largest=False
        )  # [G, P, F]
        self._select(other, ("res_prio", "res_value", "res_key", "res_ctx", "res_len", "res_acts"), keep, dim=1)

        values = torch.cat([self.tensors.top_value, other.tensors.top_value])  # [2K, F]
        keys = torch.cat([self.tensors.top_key, other.tensors.top_key])
        duplicate = repeated_hashes(
            value_key_order(values, keys), torch.cat([self.tensors.top_hash, other.tensors.top_hash])
        )
        keep = value_key_order(values.masked_fill(duplicate, float("-inf")), keys.masked_fill(duplicate, EMPTY_KEY))
        keep = keep[: self.config.top_k]
        self._select(other, ("top_value", "top_key", "top_hash", "top_ctx", "top_len", "top_acts"), keep, dim=0)
        dropped = duplicate.gather(0, keep)  # fewer than k distinct contexts: the rest are empty slots
        self.tensors.top_value.masked_fill_(dropped, float("-inf"))
        self.tensors.top_key.masked_fill_(dropped, EMPTY_KEY)

        if self.config.random_examples:
            _, keep = torch.cat([self.tensors.neg_prio, other.tensors.neg_prio]).topk(
                self.config.random_examples, dim=0, largest=False
            )
            self._select(other, ("neg_prio", "neg_ctx", "neg_len"), keep, dim=0)

    def _select(self, other: LayerState, names: tuple[str, ...], index: torch.Tensor, dim: int) -> None:
        """Each named tensor becomes cat(self, other along dim) gathered at `index` (trailing dims follow along)."""
        for name in names:
            both = torch.cat([getattr(self.tensors, name), getattr(other.tensors, name)], dim=dim)
            expanded = index.reshape(*index.shape, *([1] * (both.dim() - index.dim()))).expand(
                *index.shape, *both.shape[index.dim() :]
            )
            setattr(self.tensors, name, both.gather(dim, expanded))

    def top_order(self) -> torch.Tensor:
        """[K, F] slots by (value desc, key asc)."""
        return value_key_order(self.tensors.top_value, self.tensors.top_key)

    def _reservoirs(self, fired: Fired, peaks: Peaks) -> None:
        """Offer each window's peak to the reservoir of its bin; it replaces the largest priority if smaller."""
        features = torch.arange(self.d_feat)
        peaked = peaks.value > 0  # [B, F]
        bins = self.bins.bin_of(peaks.value.clamp_min(1e-30), self.tensors.exponent)
        prio = priorities(peaks.key, self.salts)
        taken = []  # (slot id, window) of every replacement, in order
        for window in range(len(peaked)):
            worst, slot = self.tensors.res_prio[bins[window], :, features].max(dim=1)  # [F]
            take = (peaked[window] & (prio[window] < worst)).nonzero().squeeze(1)
            if len(take) == 0:
                continue
            g, s = bins[window, take], slot[take]
            self.tensors.res_prio[g, s, take] = prio[window, take]
            self.tensors.res_value[g, s, take] = peaks.value[window, take]
            self.tensors.res_key[g, s, take] = peaks.key[window, take]
            self.tensors.res_ctx[g, s, take] = peaks.ctx_key[window, take]
            self.tensors.res_len[g, s, take] = peaks.length[window, take]
            taken.append(((g * self.config.per_bin + s) * self.d_feat + take, torch.full_like(take, window)))
        if not taken:
            return
        # Contexts are gathered once, for the last window that took each slot.
        slot_ids, windows = (torch.cat(parts) for parts in zip(*taken, strict=True))
        unique, inverse = torch.unique(slot_ids, return_inverse=True)
        last = torch.full_like(unique, -1).scatter_reduce(0, inverse, torch.arange(len(slot_ids)), "amax")
        slot_ids, windows = slot_ids[last], windows[last]
        feature = slot_ids % self.d_feat
        flat = self.tensors.res_acts.view(-1, self.config.example_tokens)  # rows ordered (g, p, f)
        flat[slot_ids] = self._context_acts(fired, peaks, windows, feature)

    def _negatives(self, fired: Fired, batch: Batch) -> None:
        """Chunks of `example_tokens` tokens (from each window's second token) where a feature is silent."""
        B, F = len(batch.lengths), self.d_feat
        T, R = self.config.example_tokens, self.config.random_examples
        n_chunks = -(-(fired.seq_len - 1) // T)
        chunk_fired = torch.zeros(B * n_chunks, F, dtype=torch.bool)  # [B * C, F]
        chunk_fired[fired.window * n_chunks + (fired.position - 1) // T, fired.feature] = True  # never position 0
        first = 1 + T * torch.arange(n_chunks)  # [C]
        exists = first[None, :] + T // 2 <= batch.lengths[:, None]  # [B, C]: at least half a context
        keys = batch.keys[:, :1] + first[None, :]  # [B, C], positions in the same document
        lengths = torch.minimum(batch.lengths[:, None] - first[None, :], torch.tensor(T))
        silent = exists.reshape(-1, 1) & ~chunk_fired  # [B * C, F]
        prio = torch.where(silent, priorities(keys.reshape(-1, 1), self.salts), EMPTY_KEY)
        pool = torch.cat([self.tensors.neg_prio, prio])
        best, index = pool.topk(R, dim=0, largest=False)
        self.tensors.neg_ctx.copy_(
            torch.cat([self.tensors.neg_ctx, keys.reshape(-1, 1).expand(-1, F)]).gather(0, index)
        )
        self.tensors.neg_len.copy_(
            torch.cat([self.tensors.neg_len, lengths.reshape(-1, 1).expand(-1, F)]).gather(0, index)
        )
        self.tensors.neg_prio.copy_(best)


@dataclass
class Fired:
    """The positive activations of a batch [B, S, F], in (token, feature) order, all [n]."""

    token: torch.Tensor  # flat position b * S + s
    window: torch.Tensor  # b
    position: torch.Tensor  # s
    feature: torch.Tensor
    value: torch.Tensor
    seq_len: int  # S

    @classmethod
    def of(cls, acts: torch.Tensor) -> Fired:
        flat = (acts.reshape(-1) > 0).nonzero().squeeze(1)
        F, S = acts.shape[-1], acts.shape[1]
        token = flat // F
        return cls(
            token=token,
            window=token // S,
            position=token % S,
            feature=flat % F,
            value=acts.reshape(-1)[flat],
            seq_len=S,
        )
