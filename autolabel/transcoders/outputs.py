"""The tokens a feature's decoder row promotes and suppresses: its direct effect on the logits through the
final norm's gain and the unembedding. The labeler is shown them and the feature pages list them, so both
read this one function and always agree."""

from __future__ import annotations

import torch

from autolabel.models import SubjectModel
from autolabel.transcoders.transcoder import TranscoderSet

CANDIDATES = 4  # bfloat16 candidates per output token asked for, re-ranked in float32
OUTPUT_CHUNK = 256  # features per unembedding product: [256, vocab] floats at a time


@torch.inference_mode()
def output_token_ids(
    subject: SubjectModel, tset: TranscoderSet, layer: int, features: list[int], n: int
) -> dict[int, tuple[list[int], list[int]]]:
    """Feature -> ids of the n tokens it promotes and suppresses most. Ids, not text, so a caller that shows
    thousands of features decodes each distinct token once.

    The product with the whole vocabulary is a report's largest cost, so it runs in bfloat16 (about 3x
    faster on CPU) to pick CANDIDATES x n candidates per end, whose logits are then recomputed in float32
    and ranked exactly. A chunk of features at a time bounds the [chunk, vocab] logits."""
    if not features or n == 0:
        return {feature: ([], []) for feature in features}
    unembed = subject.model.get_output_embeddings().weight.float()  # [vocab, d_model]
    unembed_fast = unembed.bfloat16()
    directions = tset[layer].decoder_rows() * subject.final_norm_gain()  # [d_feat, d_model]
    k = min(CANDIDATES * n, unembed.shape[0])
    result = {}
    for start in range(0, len(features), OUTPUT_CHUNK):
        chunk = features[start : start + OUTPUT_CHUNK]
        rows = directions[chunk]  # [chunk, d_model]
        rough = rows.bfloat16() @ unembed_fast.T  # [chunk, vocab]
        ends = []
        for largest in (True, False):
            candidates = rough.topk(k, dim=1, largest=largest).indices  # [chunk, k]
            exact = torch.einsum("cd,ckd->ck", rows, unembed[candidates])
            order = exact.topk(n, dim=1, largest=largest).indices  # [chunk, n]
            ends.append(candidates.gather(1, order).tolist())
        result.update({feature: (ends[0][i], ends[1][i]) for i, feature in enumerate(chunk)})
    return result
