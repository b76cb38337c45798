"""Shared helpers of the integration / DPO / offline / DDP tests: a tiny Llama from a config and a char tokenizer,
the two-process launch of the distributed tests, and the DDP comparison the launched trainer scripts write."""
from __future__ import annotations

import os
import socket
import string
import subprocess
import sys
from pathlib import Path

import torch

CHARS = string.ascii_lowercase + string.digits + " :>"
PAD, BOS, EOS = 0, 1, 2


def tiny_llama(seed: int = 0, vocab_size: int = 48, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def tokenizer():
    """A char-level PreTrainedTokenizerFast built locally (pad 0, bos 1, eos 2, unk 3)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="right", model_max_length=64)


def sft_examples(n: int = 16, seed: int = 0):
    """Tokenized SFT examples: input_ids and labels (-100 on the prompt), varying lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(2, 6, (1,), generator=g))
        r = int(torch.randint(3, 8, (1,), generator=g))
        ids = [BOS] + torch.randint(4, 40, (p + r,), generator=g).tolist() + [EOS]
        labels = [-100] * (p + 1) + ids[p + 1:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def pad_batch(examples, pad_id: int = PAD) -> dict:
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    att = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e["input_ids"])
        ids[i, :L] = torch.tensor(e["input_ids"])
        labels[i, :L] = torch.tensor(e["labels"])
        att[i, :L] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def collate(features):
    return pad_batch([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])


def free_port() -> int:
    """A TCP port free on this host right now (for the rendezvous of a launched run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict:
    """The environment of a launched CPU run: no GPUs, one thread per rank, no progress bars."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "ALPHATOKEN_PROGRESS": "0"}


def launch_two_ranks(script: str, tmp_path, *args: str, launcher: str = "accelerate",
                     results: str | None = None, timeout: int = 600):
    """Run tests/`script` OUT [args] in 2 CPU processes (gloo) and assert that it exited 0 (else fail with the
    tails of its output).

    launcher: "accelerate" (`accelerate launch`, DDP unless the script sets up its own plugin) or "torchrun"
    (`torch.distributed.run`). results: a file name pattern with one `{}` for the rank (e.g. "ds_rank{}.pt"):
    then the two ranks' saved results are loaded from tmp_path and returned, rank 0 first.
    """
    path = str(Path(__file__).resolve().parent / script)
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), path, str(tmp_path), *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), path, str(tmp_path), *args]
    else:
        raise ValueError(f"launcher must be 'accelerate' or 'torchrun', got {launcher!r}")
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if results is None:
        return None
    return [torch.load(Path(tmp_path) / results.format(r)) for r in range(2)]


# ---------------------------------------------------------------- inside a launched trainer script (one rank)


def logged(trainer, key: str) -> list:
    """The values of `key` the trainer logged, one per logged optimizer step."""
    return [h[key] for h in trainer.state.log_history if "loss" in h]


def ddp_comparison(ddp, other, ddp_weights, other_weights, keys=("loss", "keep_ratio")) -> dict:
    """What a trainer run is held to against the same run under DDP: the final weights' largest difference and,
    per key, (DDP's logged values, the other run's); keys other than "loss" are AlphaToken's ("alphatoken/<key>")."""
    result = {"weights_diff": max(float((a - b).abs().max()) for a, b in zip(other_weights, ddp_weights))}
    for key in keys:
        name = key if key == "loss" else f"alphatoken/{key}"
        result[key] = (logged(ddp, name), logged(other, name))
    return result


def save_rank_result(trainer, result: dict, out_dir: str, prefix: str) -> None:
    """Write this rank's `result` to <out_dir>/<prefix>_rank<r>.pt, then wait for the other rank and end training."""
    import torch.distributed as dist

    torch.save(result, os.path.join(out_dir, f"{prefix}_rank{dist.get_rank()}.pt"))
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


def run_rank_and_exit(body) -> None:
    """Run one rank's `body()`, print any failure, tear the process group down and leave with os._exit (status 0,
    or 1 after a failure): skipping the interpreter's teardown, where a gloo worker thread can abort the process
    ("terminate called without an active exception") after the results were written."""
    import traceback

    import torch.distributed as dist

    code = 0
    try:
        body()
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
