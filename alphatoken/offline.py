"""Offline mode: value a tokenized dataset once at θ₀, save the values and masks beside it, train from static masks.

SFT:

    from alphatoken.offline import score_dataset, apply_masks
    scored = score_dataset(model, dataset, at.AlphaTokenConfig(keep_ratio=0.6), fisher=fisher, batch_size=16)
    scored.save_to_disk("data/scored")                  # a datasets.Dataset: datasets.load_from_disk reads it back
    train_ds = apply_masks(scored)                      # labels with the dropped tokens set to -100
    AlphaTokenTrainer is not needed: any Trainer / SFTTrainer trains on train_ds with its own loss.

DPO (preference pairs; DESIGN §4: log-ratios summed over the kept tokens only, chosen and rejected alike):

    pairs = DPOTrainer(model, ref_model=ref, args=cfg, train_dataset=text_pairs, processing_class=tok).train_dataset
    scored = score_dataset(model, pairs, at.AlphaTokenConfig(keep_ratio=0.6), ref_model=ref, beta=0.1)
    scored.save_to_disk("data/scored_pairs")
    args = DPOConfig(..., remove_unused_columns=False)  # the mask columns must reach the collator
    DPOTrainer(model, ref_model=ref, args=args, train_dataset=apply_masks(scored),
               data_collator=PreferenceMaskCollator(DataCollatorForPreference(pad_token_id=tok.pad_token_id)),
               processing_class=tok).train()

TRL's DPOTrainer builds its `completion_mask` from the token ids, so the static masks reach it through the
collator: `PreferenceMaskCollator` sets `completion_mask` to 0 on the dropped completion tokens, and TRL's own loss
then sums the policy and reference log-probs over the kept tokens only — the masked DPO loss. The dropped tokens
stay in the input as context.

Inputs (a `datasets.Dataset` or a list of dicts, one example per row, unpadded):
  * SFT: `input_ids` and `labels` (-100 outside the response). Added columns, one entry per token, aligned with
    `input_ids`: `alphatoken_keep` (0/1), `alphatoken_total`, `alphatoken_adaptation`, `alphatoken_stability`
    (0 off the response).
  * pairs, TRL's tokenized layout: `prompt_ids`, `chosen_ids`, `rejected_ids` (each side's sequence is prompt then
    completion, as TRL's collator builds it); or `alphatoken score`'s layout: `chosen_input_ids`, `chosen_labels`,
    `rejected_input_ids`, `rejected_labels`. Added per side, aligned with that side's whole sequence (prompt +
    completion): `chosen_alphatoken_keep`, `chosen_alphatoken_total`, … and the same for `rejected_` (the column
    names `alphatoken score` writes, so its values.jsonl goes through `apply_masks` too).

Pair values are the DPO loss's own credits (`alphatoken.dpo.dpo_token_weights`), per pair — β σ(−β h_b) on the
chosen tokens, −β σ(−β h_b) on the rejected — with reference log-probs from `ref_model` (default: the model itself
at θ₀, TRL's usual reference, where every log-ratio is 0).

Selection: `scope="dataset"` (default) ranks over the whole dataset (all chosen and rejected rows together for pairs)
— the top `keep_ratio` of all its response tokens for selection="batch", the top of each sequence for "sequence",
`total > threshold` for "threshold", with `min_keep_per_sequence` and `always_keep_token_ids` — exactly
`select_tokens` on the dataset as one batch; `scope="batch"` keeps the masks the engine chose per scoring batch
(as online training would).
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import AlphaTokenConfig
from .batch import IGNORE_INDEX, model_inputs, response_mask
from .tokens import reference_logprobs

COLUMNS = ("alphatoken_keep", "alphatoken_total", "alphatoken_adaptation", "alphatoken_stability")
SIDES = ("chosen", "rejected")
PAIR_COLUMNS = tuple(f"{side}_{c}" for side in SIDES for c in COLUMNS)
_CLI_VALUE_COLUMNS = ("alphatoken_direct", "alphatoken_causal")  # written by `alphatoken score`, dropped with the rest
_SCORE_HINT = (
    "score it first with alphatoken.offline.score_dataset(model, dataset, cfg) — SFT rows need input_ids and labels "
    "(-100 outside the response); preference pairs need prompt_ids/chosen_ids/rejected_ids (TRL's tokenized layout, "
    "e.g. DPOTrainer(...).train_dataset) or chosen_input_ids/chosen_labels/rejected_input_ids/rejected_labels — or "
    "with `alphatoken score data.jsonl`, whose values.jsonl apply_masks reads"
)


def _columns(dataset) -> list:
    if hasattr(dataset, "column_names"):
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return sorted(first) if isinstance(first, dict) else []


def _column(dataset, key: str) -> list:
    if hasattr(dataset, "column_names"):
        return dataset[key]
    return [ex[key] for ex in dataset]


def pair_layout(columns) -> Optional[str]:
    """"trl" (prompt_ids/chosen_ids/rejected_ids), "cli" (chosen_input_ids/chosen_labels/...), or None (not pairs)."""
    cols = set(columns)
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= cols:
        return "trl"
    if {f"{s}_{k}" for s in SIDES for k in ("input_ids", "labels")} <= cols:
        return "cli"
    return None


def _rows(dataset):
    cols = _columns(dataset)
    for key in ("input_ids", "labels"):
        if key not in cols:
            if {"prompt", "chosen", "rejected"} <= set(cols):
                raise ValueError(
                    "the dataset holds text preference pairs; tokenize them first (TRL's layout: prompt_ids, "
                    "chosen_ids, rejected_ids — DPOTrainer(...).train_dataset has them) and score those")
            raise ValueError(f"the dataset has no {key!r} column (it has {cols}); score a tokenized dataset with "
                             "input_ids and labels (-100 outside the response), or preference pairs with "
                             "prompt_ids/chosen_ids/rejected_ids")
    if hasattr(dataset, "column_names"):
        return dataset["input_ids"], dataset["labels"]
    ids, labels = [], []
    for i, ex in enumerate(dataset):
        if "input_ids" not in ex or "labels" not in ex:
            raise ValueError(f"example {i} has no input_ids/labels (keys: {sorted(ex)})")
        ids.append(ex["input_ids"]), labels.append(ex["labels"])
    return ids, labels


def _pair_rows(dataset, layout: str):
    """Per side: the whole sequences and their labels (-100 on the prompt), one per pair."""
    out = {}
    for side in SIDES:
        if layout == "trl":
            prompts, completions = _column(dataset, "prompt_ids"), _column(dataset, f"{side}_ids")
            out[side] = ([list(p) + list(c) for p, c in zip(prompts, completions)],
                         [[IGNORE_INDEX] * len(p) + list(c) for p, c in zip(prompts, completions)])
        else:
            out[side] = (_column(dataset, f"{side}_input_ids"), _column(dataset, f"{side}_labels"))
    return out


def _check_rows(all_ids, all_labels, what: str = "example") -> None:
    for i, (ids, labels) in enumerate(zip(all_ids, all_labels)):
        if len(ids) != len(labels):
            raise ValueError(f"{what} {i}: {len(labels)} labels for {len(ids)} input_ids; they must align")
        if not any(int(x) != IGNORE_INDEX for x in list(labels)[1:]):
            raise ValueError(f"{what} {i} has no response tokens (every label is -100); drop it or give it a "
                             "response")


def _pad(ids_b, labels_b, pad_token_id: int, device) -> dict:
    T = max(len(x) for x in ids_b)
    B = len(ids_b)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    for r, (x, y) in enumerate(zip(ids_b, labels_b)):
        input_ids[r, :len(x)] = torch.as_tensor(x)
        labels[r, :len(x)] = torch.as_tensor(y)
        attention[r, :len(x)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device)}


VALUE_FIELDS = ("adaptation", "stability", "direct", "causal", "total", "mask", "response")


def value_rows(valuer, sides: dict, *, batch_size: int, pad_token_id: int, device, ref_model=None,
               beta: float = 0.1, credit: str = "pair", show: Optional[bool] = False):
    """Value the rows of `sides` in batches of `batch_size` and yield `(side, i, row)` for every row, batch by batch.

    The one scoring loop of the package: `score_dataset` and `alphatoken score` both run it.

    sides: {None: (input_ids rows, labels rows)} for SFT, or {"chosen": (...), "rejected": (...)} for preference
        pairs (row i of each side is pair i); rows are unpadded lists.
    ref_model: the DPO reference for pairs (its log-probs give the credits). beta: DPO's β.
    credit: "pair" values each pair under its own DPO credit (β σ(−β h_b)); "batch" under the credit of the batch's
        mean loss (β/B σ(−β h_b), what `alphatoken score` writes).
    show: the progress bar ("scoring"), as `alphatoken.progress.progress` takes it.
    row: {field: 1-D CPU tensor of the row's length} for the fields of `VALUE_FIELDS`.
    Neither puts the model in eval mode nor checks the rows: the callers do.
    """
    from .progress import progress

    if credit not in ("pair", "batch"):
        raise ValueError(f"credit must be 'pair' or 'batch', got {credit!r}")
    names = list(sides)
    n_rows = len(sides[names[0]][0])
    starts = list(range(0, n_rows, batch_size))
    for start in progress(starts, "scoring", total=len(starts), enabled=show):
        stop = min(start + batch_size, n_rows)
        ids_b = [x for side in names for x in sides[side][0][start:stop]]
        labels_b = [y for side in names for y in sides[side][1][start:stop]]
        batch = _pad(ids_b, labels_b, pad_token_id, device)
        weights = None
        if names != [None]:
            weights = _pair_credits(ref_model, batch, beta, stop - start if credit == "pair" else 1)
        tv = valuer.value(batch, token_weights=weights).detach_cpu()
        for r, x in enumerate(ids_b):
            side, i = names[r // (stop - start)], start + r % (stop - start)
            yield side, i, {f: getattr(tv, f)[r, :len(x)].clone() for f in VALUE_FIELDS}


def _pair_credits(ref_model, batch: dict, beta: float, scale: int):
    """The engine's `token_weights` for a (2B, T) pair batch: the DPO credits under `ref_model`, times `scale`."""
    from .dpo import dpo_token_weights

    per_batch = dpo_token_weights(reference_logprobs(ref_model, batch), beta, response_mask(batch["labels"]))
    if scale == 1:
        return per_batch
    return lambda logps: per_batch(logps) * scale


def score_dataset(model, dataset, cfg: Optional[AlphaTokenConfig] = None, *, fisher=None, reference=None,
                  validation=None, batch_size: int = 8, pad_token_id: int = 0, scope: str = "dataset",
                  valuer=None, ref_model=None, beta: float = 0.1):
    """Value every response token of `dataset` at the model's current weights (θ₀); returns a datasets.Dataset.

    SFT rows or preference pairs (see the module docstring). For pairs, `ref_model` gives the reference log-probs
    (default: `model` itself) and `beta` is DPO's β. Raises ValueError naming the first example without response
    tokens, or whose labels and input_ids differ in length. Never changes the model's weights or `.grad`.
    """
    import datasets

    from .dpo import check_beta

    if scope not in ("dataset", "batch"):
        raise ValueError(f"scope must be 'dataset' or 'batch', got {scope!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    cfg = cfg or AlphaTokenConfig()
    layout = pair_layout(_columns(dataset))
    if layout is not None:
        beta = check_beta(beta)
        sides = _pair_rows(dataset, layout)
        for side in SIDES:
            _check_rows(*sides[side], what=f"pair ({side})")
    else:
        sides = {None: _rows(dataset)}
        _check_rows(*sides[None])
    own = valuer is None
    if own:
        from .engine import AlphaToken

        valuer = AlphaToken(model, cfg, fisher=fisher, reference=reference, validation=validation)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {side: {k: [] for k in COLUMNS} for side in sides}
    n_rows = len(next(iter(sides.values()))[0])
    try:
        rows = value_rows(valuer, sides, batch_size=batch_size, pad_token_id=pad_token_id, device=device,
                          ref_model=ref_model if ref_model is not None else model, beta=beta)
        for side, _, row in rows:
            out[side]["alphatoken_keep"].append(row["mask"].int().tolist())
            for key in COLUMNS[1:]:
                out[side][key].append(row[key[len("alphatoken_"):]].tolist())
    finally:
        model.train(was_training)
        if own:
            valuer.close()
    if scope == "dataset":
        totals = [v for side in sides for v in out[side]["alphatoken_total"]]
        labels = [y for side in sides for y in sides[side][1]]
        keeps = select_over_dataset(totals, labels, cfg)
        for i, side in enumerate(sides):
            out[side]["alphatoken_keep"] = keeps[i * n_rows:(i + 1) * n_rows]
    names = {(side, k): k if side is None else f"{side}_{k}" for side in sides for k in COLUMNS}
    if hasattr(dataset, "column_names"):
        base = dataset.remove_columns([c for c in names.values() if c in dataset.column_names])
    else:
        base = datasets.Dataset.from_list([dict(ex) for ex in dataset])
    for (side, key), name in names.items():
        base = base.add_column(name, out[side][key])
    return base


def select_over_dataset(totals, labels, cfg: AlphaTokenConfig) -> list:
    """One selection over every row at once (`select_tokens` on the dataset as one batch): the keep mask (0/1 list)
    of each row, from the rows' values `totals` (lists or 1-D tensors) and their `labels`, in the given row order."""
    from .select import protected_tokens, select_local

    T = max(len(x) for x in totals)
    total = torch.zeros(len(totals), T)
    lab = torch.full((len(totals), T), IGNORE_INDEX, dtype=torch.long)
    for r, (v, y) in enumerate(zip(totals, labels)):
        total[r, :len(v)] = torch.as_tensor(v)
        lab[r, :len(y)] = torch.as_tensor(y)
    response = response_mask(lab)
    mask = select_local(total, response, cfg, protected_tokens(lab, response, cfg))
    return [mask[r, :len(v)].int().tolist() for r, v in enumerate(totals)]


def masked_labels(labels, keep) -> list:
    """One example's labels with the tokens not kept set to -100."""
    if len(labels) != len(keep):
        raise ValueError(f"{len(labels)} labels but {len(keep)} stored mask entries; score this dataset again")
    return [int(y) if k else IGNORE_INDEX for y, k in zip(labels, keep)]


def apply_masks(scored, keep_column: str = "alphatoken_keep", drop_value_columns: bool = True):
    """The scored dataset ready for any trainer.

    SFT: `labels` masked by the stored keep column (the original labels stay in `alphatoken_response_labels`).
    Pairs: the keep columns `chosen_alphatoken_keep` / `rejected_alphatoken_keep` are checked against the sequences
    and kept (`PreferenceMaskCollator` reads them); `chosen_labels` / `rejected_labels`, when present (the
    `alphatoken score` layout), are masked the same way (originals in `<side>_alphatoken_response_labels`).
    The value columns are dropped unless asked to keep.
    """
    cols = list(scored.column_names)
    pair_keys = [f"{side}_{keep_column}" for side in SIDES]
    if keep_column not in cols and all(k in cols for k in pair_keys):
        return _apply_pair_masks(scored, keep_column, drop_value_columns)
    if keep_column not in cols:
        raise ValueError(f"the dataset has no {keep_column!r} column (SFT) nor {pair_keys[0]!r}/{pair_keys[1]!r} "
                         f"(preference pairs); it has {cols}. {_SCORE_HINT[0].upper()}{_SCORE_HINT[1:]}")

    def fn(example, idx):
        try:
            return {"labels": masked_labels(example["labels"], example[keep_column]),
                    "alphatoken_response_labels": example["labels"]}
        except ValueError as err:
            raise ValueError(f"example {idx}: {err}") from None

    out = scored.map(fn, with_indices=True)
    if drop_value_columns:
        out = out.remove_columns([c for c in COLUMNS + _CLI_VALUE_COLUMNS if c in out.column_names])
    return out


def _apply_pair_masks(scored, keep_column: str, drop_value_columns: bool):
    layout = pair_layout(scored.column_names)
    if layout is None:
        raise ValueError("the pairs have keep columns but no sequences: they need prompt_ids/chosen_ids/rejected_ids "
                         "or chosen_input_ids/chosen_labels/rejected_input_ids/rejected_labels")

    def fn(example, idx):
        update = {}
        for side in SIDES:
            keep = example[f"{side}_{keep_column}"]
            n = (len(example["prompt_ids"]) + len(example[f"{side}_ids"]) if layout == "trl"
                 else len(example[f"{side}_input_ids"]))
            if len(keep) != n:
                raise ValueError(f"example {idx}: the {side} sequence has {n} tokens but {len(keep)} stored mask "
                                 "entries; score this dataset again")
            if layout == "cli":
                update[f"{side}_labels"] = masked_labels(example[f"{side}_labels"], keep)
                update[f"{side}_alphatoken_response_labels"] = example[f"{side}_labels"]
        return update

    out = scored.map(fn, with_indices=True)
    if drop_value_columns:
        drop = [f"{side}_{c}" for side in SIDES for c in COLUMNS[1:] + _CLI_VALUE_COLUMNS]
        out = out.remove_columns([c for c in drop if c in out.column_names])
    return out


def _place(keep, positions: torch.Tensor, truncation: str, where: str) -> torch.Tensor:
    """The stored mask of one sequence on its collated positions (truncated like the collator truncated)."""
    keep = torch.as_tensor(keep, dtype=torch.bool)
    n = positions.numel()
    if n > keep.numel():
        raise ValueError(f"{where}: {n} tokens after collation but {keep.numel()} stored mask entries (the "
                         "collator packed or the dataset changed since it was scored)")
    if n < keep.numel():  # the collator truncated the sequence
        keep = keep[-n:] if truncation == "keep_end" else keep[:n]
    return keep


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


class PreferenceMaskCollator:
    """Wrap TRL's `DataCollatorForPreference` (or any collator returning input_ids, attention_mask and a
    `completion_mask`, B chosen rows then B rejected): set `completion_mask` to 0 on the completion tokens the stored
    masks `chosen_alphatoken_keep` / `rejected_alphatoken_keep` drop, so the DPO loss sums over the kept tokens only.

    Each stored mask covers its side's whole sequence (prompt + completion, as the collator concatenates them) and is
    placed on the row's real (attention_mask == 1) positions, truncated as the collator truncates (`truncation_mode`
    "keep_start" or "keep_end"). Train with `remove_unused_columns=False` so the columns reach the collator.
    """

    def __init__(self, collator, keep_column: str = "alphatoken_keep"):
        self.collator, self.keep_column = collator, keep_column

    def __call__(self, features):
        keys = [f"{side}_{self.keep_column}" for side in SIDES]
        keeps = {k: [] for k in keys}
        for f in features:
            missing = [k for k in keys if k not in f]
            if missing:
                raise ValueError(f"a preference example has no {missing[0]!r}; {_SCORE_HINT}, and train with "
                                 "remove_unused_columns=False so the column reaches the collator")
            for k in keys:
                keeps[k].append(f[k])
        drop = set(PAIR_COLUMNS) | {f"{s}_{c}" for s in SIDES for c in _CLI_VALUE_COLUMNS}
        batch = self.collator([{k: v for k, v in f.items() if k not in drop} for f in features])
        if "completion_mask" not in batch:
            raise ValueError(f"the wrapped collator returned no 'completion_mask' (keys: {sorted(batch)}); wrap TRL's "
                             "DataCollatorForPreference")
        att, completion = batch["attention_mask"], batch["completion_mask"]
        truncation = getattr(self.collator, "truncation_mode", "keep_start")
        rows = keeps[keys[0]] + keeps[keys[1]]
        for r, keep in enumerate(rows):
            pos = att[r].nonzero().flatten()
            side = SIDES[r // len(features)]
            placed = _place(keep, pos, truncation, f"pair {r % len(features)} of the batch ({side})")
            completion[r, pos[~placed]] = 0
        return batch
