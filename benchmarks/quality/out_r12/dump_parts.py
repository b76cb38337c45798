"""Round 12 analysis aid: the per-token parts every detection rule reads, saved for offline study.

For each world and seed (as detect.py builds them: the same references, Fisher and batches), at θ₀ and after the
short SFT, saves per scoring batch: the response and noise masks, ℓ_t(θ), the Rho-1 gaps against the validation
and clean copies, and the tuned target's parts over every layer (`disp_val_all` in detect.py; with `--copy own`,
valued with the copy the library tunes itself, as the `at_dispown_*` rules are).

    python benchmarks/quality/out_r12/dump_parts.py --worlds toy-add,toy-copy,toy-reverse --seeds 0 1 2 --out DIR
"""
import argparse
import sys
import warnings
from pathlib import Path

import torch

QUAL = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(QUAL))
import detect as D  # noqa: E402
import alphatoken as at  # noqa: E402
from alphatoken.combine import combine_paths  # noqa: E402
from alphatoken.scorers import token_losses  # noqa: E402


def read_dumps(pattern: str):
    """Per file saved by this script (sorted by path): (world, stage, batches), each batch a dict with its `record`,
    the (B, T) masks `response`, `scored` (response tokens but the first) and `noise` (scored noise tokens), and
    `parts`: the valuer's parts on the response tokens plus `gap_clean`, the gap to the oracle's clean copy, and
    `loss`, ℓ_t(θ)."""
    import glob
    for path in sorted(glob.glob(pattern)):
        world, _, stage = Path(path).stem.rsplit("_", 2)
        batches = []
        for record in torch.load(path, weights_only=False):
            resp, scored = record["response"], record["scored"]
            parts = {k: v[resp] for k, v in record["parts"].items()}
            parts["gap_clean"] = record["gap_clean"][resp]
            parts["loss"] = record["loss"][resp]
            batches.append({"record": record, "response": resp, "scored": scored, "noise": record["noise"] & scored,
                            "parts": parts})
        yield world, stage, batches


def rule_config(**fields):
    """The combine fields of the tuned rules read from these files (the direct path over every layer, λ 0, the
    cosine rule, ranks; no veto, floor or copy loss unless `fields` set them, as AlphaTokenConfig names them)."""
    return D.combine_config(**{**dict(causal_weight=0.0, stability_weight=0.0, cosine=True, normalize=False,
                                      combine="rank"), **fields})


def library_rule(**fields):
    """parts -> the library's total under `rule_config(**fields)` (`combine_paths`, as the engine combines)."""
    cfg = rule_config(**fields)
    return lambda parts: combine_paths(parts, cfg, D._rms)["total"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", default="toy-add,toy-copy,toy-reverse")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", required=True)
    ap.add_argument("--copy", choices=("val", "own"), default="val",
                    help="the valuer's tuned copy: Rho-1's validation reference (the benchmark's rows) or the copy "
                         "the library tunes itself (detect.own_copy, the at_dispown_* rules)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    dargs = D.build_parser().parse_args([])  # detect.py's default world sizes
    for name in a.worlds.split(","):
        for seed in a.seeds:
            world = D.build_world(name, seed, dargs)
            theta0, fisher, refs = D.prepare_world(world, seed)
            cfg = D.valuer_configs(world.tracked_layers)["disp_val_all"]
            for stage in ("theta0", "sft"):
                if stage == "sft":
                    world.finetune(world.model, "noisy")
                    world.model.eval()
                records = []
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    valuer = at.AlphaToken(world.model, cfg, fisher=fisher, reference=theta0, tuned=refs[a.copy])
                    try:
                        for batch in world.batches:
                            b = D._strip(batch)
                            with torch.no_grad():
                                logits = world.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                                loss = token_losses(logits, b["labels"]).double()
                                gaps = {}
                                for ref_name, ref in refs.items():
                                    rl = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                                    gaps[ref_name] = loss - token_losses(rl, b["labels"]).double()
                            tv = valuer.value(b)
                            resp = b["labels"] != -100
                            resp[:, 0] = False
                            records.append({"response": tv.response, "scored": resp, "noise": batch["noise"],
                                            "labels": b["labels"], "loss": loss, "gap_val": gaps["val"],
                                            "gap_clean": gaps["clean"],
                                            "parts": {k: v.detach().double() for k, v in tv.parts.items()}})
                    finally:
                        valuer.close()
                torch.save(records, out / f"{name}_s{seed}_{stage}.pt")
                print(f"[dump] {name} seed {seed} {stage}: {len(records)} batches", flush=True)


if __name__ == "__main__":
    main()
