"""Packing (causal LM's `task.packing`): several tokenized documents per row of at most max_length tokens, each
document attending only to itself, so no step is spent on padding and no document sees another.

    documents [a a a] [b b] [c c c c]  ->  input_ids    [a a a b b] [c c c c]
                                           position_ids [0 1 2 0 1] [0 1 2 3]
                                           labels       [- a a - b] [- c c c]   (- : -100, not scored)

The isolation is transformers' own (masking_utils, 5.x): given `position_ids` that restart and no attention mask,
`create_causal_mask` finds the documents (`find_packed_sequence_indices`) and builds a block-diagonal causal mask
for eager and sdpa attention (and for the attention functions peftkit registers with a mask function: the fast
dropout's, prefix tuning's), and the position embeddings (RoPE, GPT-2's learned ones) restart per document. It
does so only when the forward has no cache either, so a packed batch carries `use_cache: False`: a model left
at its config's `use_cache: true` builds an empty cache even in training, and then silently attends across
documents. The first label of every document is -100: the model's shifted loss would predict it from the
previous document's last token. A packed batch's loss is then the token-weighted mean of its documents'
losses computed one by one (tests/test_causal_lm.py checks it to 1e-5).

Two ways to fill rows: `chunk` (plain text) cuts the stream of documents at every max_length, so every row is
full and no token is lost, a document cut in two continuing as a new one at position 0 in the next row;
`whole` (conversations, prompt/response pairs) keeps each document whole and places them first-fit by
decreasing length (documents longer than max_length were truncated before).
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

IGNORE = -100


def pack(input_ids: Sequence[list[int]], labels: Sequence[list[int]], max_length: int, chunk: bool) -> dict:
    """Rows of packed documents: {input_ids, labels, position_ids}, each row at most `max_length` long. Rows
    with fewer than 2 tokens (nothing to predict) are left out."""
    if chunk:
        rows, row, room = [], [], max_length
        for ids, lab in zip(input_ids, labels):
            while ids:  # the part that fits this row; the rest continues the next row as a document of its own
                row.append((ids[:room], lab[:room]))
                ids, lab, room = ids[room:], lab[room:], room - len(ids[:room])
                if room == 0:
                    rows.append(row)
                    row, room = [], max_length
        if row:
            rows.append(row)
    else:
        order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
        bins: list[list[int]] = []  # document indices per row
        used: list[int] = []
        for i in order:
            size = min(len(input_ids[i]), max_length)
            at = next((b for b, u in enumerate(used) if u + size <= max_length), None)
            if at is None:
                at = len(bins)
                bins.append([])
                used.append(0)
            bins[at].append(i)
            used[at] += size
        rows = [[(input_ids[i][:max_length], labels[i][:max_length]) for i in sorted(b)] for b in bins]
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for row in rows:
        ids = [t for doc, _ in row for t in doc]
        if len(ids) < 2:
            continue
        out["input_ids"].append(ids)
        out["labels"].append([label for _, lab in row for label in [IGNORE, *lab[1:]]])
        out["position_ids"].append([p for doc, _ in row for p in range(len(doc))])
    return out


def collate(features: list[dict[str, Any]], pad_id: int, left: bool = False) -> "dict[str, torch.Tensor | bool]":
    """A batch of packed rows: input_ids padded with `pad_id`, labels with -100, position_ids with 0 (each pad
    token then counts as a document of its own, so no real token attends to one, on either side), no attention
    mask (its absence is what makes transformers read the documents from position_ids), and no cache."""
    import torch

    width = max(len(f["input_ids"]) for f in features)

    def padded(key: str, value: int) -> torch.Tensor:
        rows = []
        for f in features:
            pad = [value] * (width - len(f[key]))
            rows.append(pad + list(f[key]) if left else list(f[key]) + pad)
        return torch.tensor(rows, dtype=torch.long)

    return {
        "input_ids": padded("input_ids", pad_id),
        "labels": padded("labels", IGNORE),
        "position_ids": padded("position_ids", 0),
        "use_cache": False,
    }
