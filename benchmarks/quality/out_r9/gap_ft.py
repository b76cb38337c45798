"""Prototype: the defaults' first-order value fused with the tuned copy's exact loss gap, in the real fine-tune."""
import sys, dataclasses, torch
from pathlib import Path
import alphatoken as at
QUAL = Path(at.__file__).resolve().parent.parent / "benchmarks" / "quality"
sys.path.insert(0, str(QUAL))
import real_finetune as RF
from alphatoken.combine import percentile_rank
from alphatoken.tokens import token_losses

RULE = {"rule": "fmin_soft"}

class Gap:
    def __init__(self, model, valuer, reference, cfg):
        self.model, self.valuer, self.reference, self.cfg = model, valuer, reference, cfg
        self.last_values = None
    def close(self):
        self.valuer.close()
    def value_and_loss(self, batch):
        from alphatoken.select import protected_tokens, select_tokens
        tv = self.valuer.value(batch)
        resp = tv.response
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        with torch.no_grad():
            was = self.model.training; self.model.eval()
            l0 = token_losses(self.model(**inputs).logits, batch["labels"]).double()
            self.model.train(was)
            l1 = token_losses(self.reference(**inputs).logits, batch["labels"]).double()
        ra = percentile_rank(tv.total[resp].double()); rg = percentile_rank((l0 - l1)[resp])
        rule = RULE["rule"]
        v = {"fmin_soft": torch.minimum(ra, rg + 0.1), "fuse0.3": ra + 0.3 * rg, "fuse": ra + rg,
             "fmin": torch.minimum(ra, rg)}[rule]
        total = torch.zeros(resp.shape, dtype=torch.float32); total[resp] = v.float()
        mask = select_tokens(total, resp, self.cfg, protected_tokens(batch["labels"], resp, self.cfg))
        self.last_values = dataclasses.replace(tv, mask=mask)
        return self.model(**{**batch, "labels": self.last_values.apply(batch["labels"])}).loss

_build = RF.build
def build(method, model, tokenizer, data, args, seed, device):
    if method != "alphatoken_gap":
        return _build(method, model, tokenizer, data, args, seed, device)
    valuer = _build("alphatoken_tuned", model, tokenizer, data, args, seed, device)
    ref = RF.tuned_reference(model, tokenizer, data, args, seed, device)
    for p in ref.parameters():
        p.requires_grad_(False)
    eot = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    cfg = at.AlphaTokenConfig(keep_ratio=args.keep_ratio, always_keep_token_ids=(eot,), tracked_layers=args.train_blocks)
    return Gap(model, valuer, ref.eval(), cfg)
RF.build = build
RF.EXTRA_METHODS = RF.EXTRA_METHODS + ("alphatoken_gap",)
if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--rule" in argv:
        i = argv.index("--rule"); RULE["rule"] = argv[i + 1]; del argv[i:i + 2]
    RF.main(argv)
