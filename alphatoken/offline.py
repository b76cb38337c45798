"""Offline mode: value a tokenized dataset once at θ₀, save the values and masks beside it, train from static masks.

    from alphatoken.offline import score_dataset, apply_masks
    scored = score_dataset(model, dataset, at.AlphaTokenConfig(keep_ratio=0.6), fisher=fisher, batch_size=16)
    scored.save_to_disk("data/scored")                  # a datasets.Dataset: datasets.load_from_disk reads it back
    train_ds = apply_masks(scored)                      # labels with the dropped tokens set to -100
    AlphaTokenTrainer is not needed: any Trainer / SFTTrainer trains on train_ds with its own loss.

The input is a `datasets.Dataset` (or a list of dicts) with `input_ids` and `labels` (-100 outside the response),
one example per row, unpadded. Added columns, one entry per token, aligned with `input_ids`:
`alphatoken_keep` (0/1), `alphatoken_total`, `alphatoken_adaptation`, `alphatoken_stability` (0 off the response).

Selection: `scope="dataset"` (default) ranks over the whole dataset — the top `keep_ratio` of all its response tokens
for selection="batch", the top of each sequence for "sequence", `total > threshold` for "threshold", with
`min_keep_per_sequence` — exactly `select_tokens` on the dataset as one batch; `scope="batch"` keeps the masks the
engine chose per scoring batch (as online training would).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import AlphaTokenConfig
from .losses import IGNORE_INDEX

COLUMNS = ("alphatoken_keep", "alphatoken_total", "alphatoken_adaptation", "alphatoken_stability")


def _rows(dataset):
    if hasattr(dataset, "column_names"):
        for key in ("input_ids", "labels"):
            if key not in dataset.column_names:
                raise ValueError(f"the dataset has no {key!r} column (it has {dataset.column_names}); score a "
                                 "tokenized dataset with input_ids and labels (-100 outside the response)")
        return dataset["input_ids"], dataset["labels"]
    ids, labels = [], []
    for i, ex in enumerate(dataset):
        if "input_ids" not in ex or "labels" not in ex:
            raise ValueError(f"example {i} has no input_ids/labels (keys: {sorted(ex)})")
        ids.append(ex["input_ids"]), labels.append(ex["labels"])
    return ids, labels


def score_dataset(model, dataset, cfg: Optional[AlphaTokenConfig] = None, *, fisher=None, reference=None,
                  validation=None, batch_size: int = 8, pad_token_id: int = 0, scope: str = "dataset",
                  valuer=None):
    """Value every response token of `dataset` at the model's current weights (θ₀); returns a datasets.Dataset.

    Raises ValueError naming the first example without response tokens, or whose labels and input_ids differ
    in length. Never changes the model's weights or `.grad`.
    """
    import datasets

    if scope not in ("dataset", "batch"):
        raise ValueError(f"scope must be 'dataset' or 'batch', got {scope!r}")
    cfg = cfg or AlphaTokenConfig()
    all_ids, all_labels = _rows(dataset)
    for i, (ids, labels) in enumerate(zip(all_ids, all_labels)):
        if len(ids) != len(labels):
            raise ValueError(f"example {i}: {len(labels)} labels for {len(ids)} input_ids; they must align")
        if not any(int(x) != IGNORE_INDEX for x in list(labels)[1:]):
            raise ValueError(f"example {i} has no response tokens (every label is -100); drop it or give it a "
                             "response")
    own = valuer is None
    if own:
        from .engine import AlphaToken

        valuer = AlphaToken(model, cfg, fisher=fisher, reference=reference, validation=validation)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {k: [] for k in COLUMNS}
    try:
        for start in range(0, len(all_ids), batch_size):
            ids_b, labels_b = all_ids[start:start + batch_size], all_labels[start:start + batch_size]
            T = max(len(x) for x in ids_b)
            B = len(ids_b)
            input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
            labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
            attention = torch.zeros((B, T), dtype=torch.long)
            for r, (x, y) in enumerate(zip(ids_b, labels_b)):
                input_ids[r, :len(x)] = torch.as_tensor(x)
                labels[r, :len(x)] = torch.as_tensor(y)
                attention[r, :len(x)] = 1
            tv = valuer.value({"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
                               "labels": labels.to(device)}).detach_cpu()
            for r, x in enumerate(ids_b):
                L = len(x)
                out["alphatoken_keep"].append(tv.mask[r, :L].int().tolist())
                out["alphatoken_total"].append(tv.total[r, :L].tolist())
                out["alphatoken_adaptation"].append(tv.adaptation[r, :L].tolist())
                out["alphatoken_stability"].append(tv.stability[r, :L].tolist())
    finally:
        model.train(was_training)
        if own:
            valuer.close()
    if scope == "dataset":
        out["alphatoken_keep"] = _select_over_dataset(out["alphatoken_total"], all_labels, cfg)
    if hasattr(dataset, "column_names"):
        base = dataset.remove_columns([c for c in COLUMNS if c in dataset.column_names])
    else:
        base = datasets.Dataset.from_list([dict(ex) for ex in dataset])
    for key in COLUMNS:
        base = base.add_column(key, out[key])
    return base


def _select_over_dataset(totals, labels, cfg: AlphaTokenConfig):
    from .losses import response_mask
    from .select import select_local

    T = max(len(x) for x in totals)
    total = torch.zeros(len(totals), T)
    lab = torch.full((len(totals), T), IGNORE_INDEX, dtype=torch.long)
    for r, (v, y) in enumerate(zip(totals, labels)):
        total[r, :len(v)] = torch.as_tensor(v)
        lab[r, :len(y)] = torch.as_tensor(y)
    mask = select_local(total, response_mask(lab), cfg)
    return [mask[r, :len(v)].int().tolist() for r, v in enumerate(totals)]


def masked_labels(labels, keep) -> list:
    """One example's labels with the tokens not kept set to -100."""
    if len(labels) != len(keep):
        raise ValueError(f"{len(labels)} labels but {len(keep)} stored mask entries; score this dataset again")
    return [int(y) if k else IGNORE_INDEX for y, k in zip(labels, keep)]


def apply_masks(scored, keep_column: str = "alphatoken_keep", drop_value_columns: bool = True):
    """The scored dataset with `labels` masked by the stored keep column, ready for any trainer.

    The original labels stay in `alphatoken_response_labels`; the value columns are dropped unless asked to keep.
    """
    if keep_column not in scored.column_names:
        raise ValueError(f"the dataset has no {keep_column!r} column; run alphatoken.offline.score_dataset first")

    def fn(example, idx):
        try:
            return {"labels": masked_labels(example["labels"], example[keep_column]),
                    "alphatoken_response_labels": example["labels"]}
        except ValueError as err:
            raise ValueError(f"example {idx}: {err}") from None

    out = scored.map(fn, with_indices=True)
    if drop_value_columns:
        out = out.remove_columns([c for c in COLUMNS if c in out.column_names])
    return out


class StaticMaskCollator:
    """Wrap a collator: after it pads, set the labels of tokens not kept in `alphatoken_keep` to -100.

    The stored mask of each example is placed on its real (attention_mask == 1) positions, so left or right padding
    both work; packing / truncation in the collator is not supported (a length mismatch raises naming the example).
    Train with `remove_unused_columns=False` so the column reaches the collator, or use `apply_masks` instead.
    """

    def __init__(self, collator, keep_column: str = "alphatoken_keep"):
        self.collator, self.keep_column = collator, keep_column

    def __call__(self, features):
        keeps = []
        for f in features:
            if self.keep_column not in f:
                raise ValueError(f"a feature has no {self.keep_column!r}; score the dataset with score_dataset and "
                                 "train with remove_unused_columns=False")
            keeps.append(f[self.keep_column])
        stripped = [{k: v for k, v in f.items() if k not in COLUMNS and k != "alphatoken_response_labels"}
                    for f in features]
        batch = self.collator(stripped)
        labels, att = batch["labels"], batch.get("attention_mask")
        for r, keep in enumerate(keeps):
            pos = att[r].nonzero().flatten() if att is not None else torch.arange(len(keep))
            if pos.numel() != len(keep):
                raise ValueError(f"example {r} of the batch: {pos.numel()} tokens after collation but {len(keep)} "
                                 "stored mask entries (the collator truncated or packed)")
            drop = pos[torch.as_tensor(keep, dtype=torch.bool).logical_not()]
            labels[r, drop] = IGNORE_INDEX
        return batch
