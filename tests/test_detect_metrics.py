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


def test_the_defaults_rule_is_the_librarys_defaults_valued_at_each_keep_ratio():
    """The benchmark's defaults row (`at_dispval_all_copy0_floor2cap_order1_direct`) must be what the library's
    resolved defaults give at every keep ratio it reports: the floor's cap and the order's drop budget both follow
    keep_ratio, so the precision / recall at keep 0.6 is read from values at 0.6, not from keep 0.8's."""
    from types import SimpleNamespace

    from detect import KEEP_RATIOS, _rms, alphatoken_rules, apply_rule, keep_dependent
    from alphatoken.combine import combine_paths
    from alphatoken.config import AlphaTokenConfig
    from alphatoken.targets import resolve_auto

    rule = alphatoken_rules()["at_dispval_all_copy0_floor2cap_order1_direct"]
    assert keep_dependent(rule) and not keep_dependent(alphatoken_rules()["at_dispval_all_gap_direct"])
    g = torch.Generator().manual_seed(7)
    shape = (4, 12)
    response = torch.rand(shape, generator=g) < 0.85
    parts = {"adaptation_direct": torch.randn(shape, generator=g, dtype=torch.float64),
             "stability_direct": torch.randn(shape, generator=g, dtype=torch.float64),
             "credit_norm_direct": torch.rand(shape, generator=g, dtype=torch.float64) + 0.1,
             "loss_gap": 3 * torch.randn(shape, generator=g, dtype=torch.float64),  # a share below the floor, −2
             "copy_loss": 4 * torch.rand(shape, generator=g, dtype=torch.float64)}
    for path in ("adaptation", "stability", "credit_norm"):  # the direct path only, as paths="direct" values
        parts[f"{path}_causal"] = torch.zeros(shape, dtype=torch.float64)
    tv = SimpleNamespace(response=response, parts=parts)
    values = {}
    for keep in KEEP_RATIOS:
        library = resolve_auto(AlphaTokenConfig(keep_ratio=keep), validation={"input_ids": None}, fisher=None)
        expected = combine_paths({k: v[response] for k, v in parts.items()}, library, _rms)["total"]
        values[keep] = apply_rule(tv, rule, keep)
        assert torch.allclose(values[keep][response], expected.double(), atol=1e-12), keep
    assert not torch.equal(values[KEEP_RATIOS[0]], values[KEEP_RATIOS[1]])


def test_the_benchmarks_grad_norm_row_is_the_librarys_grad_norm_scorer():
    """detect.py's grad_norm_low reads |C_t| from a valuer's parts: under the benchmark's tuned config over every
    layer (and the head-only one) that is the library's GraNd scorer, −‖∇_{W_head} ℓ_t‖, on every response token."""
    import warnings

    from detect import valuer_configs
    from models import moved_copy
    from test_scorers import random_batch, tiny_model

    import alphatoken as at
    from alphatoken.scorers import make_scorer

    model = tiny_model(5).double()
    batch = random_batch(12)
    tuned = moved_copy(model, 5)
    expected = make_scorer("grad_norm_low", model).value(batch)
    configs = valuer_configs("all")
    for name in ("disp_val_all", "disp_val"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with at.AlphaToken(model, configs[name], validation=batch, tuned=tuned) as valuer:
                tv = valuer.value(batch)
        response = tv.response
        assert torch.equal(response, expected.response)
        torch.testing.assert_close(-tv.parts["credit_norm_direct"][response].double(),
                                   expected.total[response].double(), rtol=1e-5, atol=1e-6)


def test_the_benchmarks_reference_grad_norm_rows_are_the_librarys_scorer_on_that_reference():
    """detect.py's ref_grad_norm_<ref> and its factor rows read one forward with a head pre-hook
    (`logits_and_feature_norms`): the feature norm is ‖h_{t−1}‖ of the final hidden state (brute force from
    output_hidden_states), and EL2N times it is the library's GraNd scorer run on that reference."""
    from detect import logits_and_feature_norms
    from models import moved_copy
    from test_scorers import random_batch, tiny_model

    from alphatoken.layers import find_head
    from alphatoken.scorers import make_scorer, token_error_norms

    model = tiny_model(7).double()
    reference = moved_copy(model, 8)
    batch = random_batch(13)
    for net in (model, reference):
        logits, feature_norm = logits_and_feature_norms(net, batch)
        with torch.no_grad():
            out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        torch.testing.assert_close(logits, out.logits)
        hidden = out.hidden_states[-1].double()  # the head's input (Llama applies its final norm there)
        expected_norm = torch.zeros_like(feature_norm)
        expected_norm[:, 1:] = hidden[:, :-1].norm(dim=-1)
        torch.testing.assert_close(feature_norm, expected_norm)
        assert len(find_head(net)[1]._forward_pre_hooks) == 0  # the hook is gone
        library = make_scorer("grad_norm_low", net).value(batch)
        row = -token_error_norms(logits, batch["labels"]).double() * feature_norm
        response = library.response
        assert response.sum() > 10
        torch.testing.assert_close(row[response], library.total[response].double(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits_and_feature_norms(model, batch)[1], feature_norm)  # the copy moved
