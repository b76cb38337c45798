"""The toy world: a char-level tokenizer, synthetic tasks, a tiny pre-trained Llama shipped with the package,
a fine-tuning loop and exact-match evaluation — enough to see, on CPU in minutes, what token masking does to
a target task and to forgetting.

    from alphatoken import toy
    model, tokenizer = toy.load_builtin()              # pre-trained on add / copy / reverse
    data = toy.target_data(seed=0)                     # noisy "sort" training set, clean validation / eval
    batch = toy.collate(data.train[:16], tokenizer)    # input_ids, attention_mask, labels (-100 off-response)
    stats = toy.finetune(model, tokenizer, data.train, method="full", steps=100)
    toy.exact_match(model, tokenizer, data.eval)
    result = toy.compare(steps=150)                    # every token vs AlphaToken, for the CLI demo
"""
from .data import collate, collate_prompts
from .evaluate import evaluate_tasks, exact_match, greedy_decode
from .experiment import (ALPHATOKEN_DEFAULT, DEFAULTS, MethodSpec, accuracy_before, build_method, compare,
                         run_one, score_example, summarize)
from .model import BUILTIN_DIR, build_model, load_builtin, pretrain, save_builtin, tiny_config
from .tasks import (RETENTION_TASKS, TARGET_TASK, Example, TargetData, TargetNoise, make_examples,
                    retention_eval_sets, retention_mixture, target_data)
from .tokenizer import build_tokenizer
from .train import batches, finetune

__all__ = [
    "collate", "collate_prompts", "evaluate_tasks", "exact_match", "greedy_decode", "ALPHATOKEN_DEFAULT",
    "DEFAULTS", "MethodSpec", "accuracy_before", "build_method", "compare", "run_one", "score_example",
    "summarize", "BUILTIN_DIR", "build_model", "load_builtin", "pretrain", "save_builtin", "tiny_config",
    "RETENTION_TASKS", "TARGET_TASK", "Example", "TargetData", "TargetNoise", "make_examples",
    "retention_eval_sets", "retention_mixture", "target_data", "build_tokenizer", "batches", "finetune",
]
