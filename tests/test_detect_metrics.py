"""The token-detection benchmark's metrics (benchmarks/quality/detect.py) against brute force."""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))

from detect import auroc  # noqa: E402


def test_auroc_equals_the_pairwise_count_with_ties_half():
    g = torch.Generator().manual_seed(11)
    checked = 0
    for _ in range(100):
        scores = torch.randint(0, 5, (30,), generator=g).double()  # many ties
        positive = torch.rand(30, generator=g) < 0.4
        pos, neg = scores[positive], scores[~positive]
        if not len(pos) or not len(neg):
            continue
        pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
        assert abs(auroc(scores, positive) - pairs.mean().item()) < 1e-12
        checked += 1
    assert checked > 50
    assert auroc(torch.arange(4.0), torch.tensor([False, False, True, True])) == 1.0
    assert math.isnan(auroc(torch.ones(3), torch.tensor([True, True, True])))  # no negatives


def test_every_detect_valuation_computes_the_parts_its_rules_weigh():
    """The tuned target's "auto" defaults (every layer, direct path, λ 0) must not reach the benchmark's valuers:
    a head-only row would copy the "_all" one and the causal-path and stability rows would read zeros."""
    from detect import VALUERS, alphatoken_rules, valuer_configs
    from alphatoken.targets import resolve_auto

    configs = valuer_configs("all")
    assert set(configs) == set(VALUERS)
    assert {rule["target"] for rule in alphatoken_rules().values()} <= set(configs)
    for name, cfg in configs.items():
        settled = resolve_auto(cfg, validation={"input_ids": None}, fisher=None)
        assert settled.paths == "full" and settled.stability_weight == 0.5, name
        assert settled.direct_layers == ("all" if name.endswith("_all") else "head"), name
