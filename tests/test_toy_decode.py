"""The toy's greedy decoding raises no deprecation warning (transformers 5 renamed `past_key_values` to `cache`),
and the cached decode equals the uncached one."""
import warnings

from alphatoken import toy
from alphatoken.toy.evaluate import greedy_decode
from alphatoken.toy.tasks import retention_eval_sets


def test_greedy_decode_warns_nothing_and_cache_changes_nothing():
    model, tokenizer = toy.load_builtin()
    examples = [ex for exs in retention_eval_sets(n=6).values() for ex in exs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning / DeprecationWarning fails the test
        cached = greedy_decode(model, tokenizer, examples, max_new_tokens=12)
    assert cached == greedy_decode(model, tokenizer, examples, max_new_tokens=12, use_cache=False)
    assert sum(p == ex.answer for p, ex in zip(cached, examples)) > len(examples) // 2
