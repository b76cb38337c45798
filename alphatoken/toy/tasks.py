"""Synthetic tasks of the toy world: retention tasks the built-in model is pre-trained on, and a new target task.

Every example is `<bos> prompt response <eos>` at character level; the prompt ends with `>`:

    add      A:47+85>   -> 132      (two numbers in 0..99)
    copy     C:qwjd>    -> qwjd     (3-8 lowercase letters)
    reverse  R:qwjd>    -> djwq     (3-6 lowercase letters)
    sort     S:5038>    -> 0358     (target task, 3-4 digits; never seen in pre-training)

Target *training* responses carry low-value tokens (see `TargetNoise`); the held-out evaluation and validation
sets are clean. Each noisy character is flagged in `Example.noise`, so experiments can measure how much of the
noise a selection method drops.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

RETENTION_TASKS = ("add", "copy", "reverse")
TARGET_TASK = "sort"
SORT_LENGTH = (3, 4)  # digits in a sort prompt (inclusive range)
TASK_CODES = {"add": "A", "copy": "C", "reverse": "R", "sort": "S"}


@dataclass(frozen=True)
class Example:
    """One example. `response` is what training sees; `answer` is the clean answer exact match is scored on.

    noise: one flag per character of `response`, True where the character is a low-value token
    (filler, corrupted, or part of a systematic wrong span). The `<eos>` after the response is never noise.
    """

    task: str
    prompt: str
    response: str
    answer: str
    noise: Tuple[bool, ...] = field(default=())

    @property
    def is_noisy(self) -> bool:
        return any(self.noise)


@dataclass(frozen=True)
class TargetNoise:
    """How target-task training responses are spoiled (each kind independently, per example).

    filler_rate: share of responses that start with the boilerplate `filler` (absent from clean data, so a
        model that learns to emit it fails exact match).
    swap_rate: share with a systematic wrong span: the last two characters of the answer swapped.
    corrupt_rate: share with `corrupt_chars` random characters replaced by a different random digit.
    """

    filler_rate: float = 0.3
    filler: str = "sure,"
    swap_rate: float = 0.25
    corrupt_rate: float = 0.3
    corrupt_chars: int = 1

    @staticmethod
    def clean() -> "TargetNoise":
        return TargetNoise(filler_rate=0.0, swap_rate=0.0, corrupt_rate=0.0)


def _answer(task: str, rng: random.Random) -> Tuple[str, str]:
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a}+{b}", str(a + b)
    if task == "copy":
        s = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
        return s, s
    if task == "reverse":
        s = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        return s, s[::-1]
    if task == "sort":
        s = "".join(rng.choice(string.digits) for _ in range(rng.randint(*SORT_LENGTH)))
        return s, "".join(sorted(s))
    raise ValueError(f"unknown task {task!r}; tasks are {RETENTION_TASKS + (TARGET_TASK,)}")


def _spoil(answer: str, noise: TargetNoise, rng: random.Random) -> Tuple[str, Tuple[bool, ...]]:
    chars, flags = list(answer), [False] * len(answer)
    if rng.random() < noise.swap_rate and len(chars) >= 2 and chars[-1] != chars[-2]:
        chars[-1], chars[-2] = chars[-2], chars[-1]
        flags[-1] = flags[-2] = True
    if rng.random() < noise.corrupt_rate:
        for pos in rng.sample(range(len(chars)), min(noise.corrupt_chars, len(chars))):
            chars[pos] = rng.choice([d for d in string.digits if d != chars[pos]])
            flags[pos] = True
    if rng.random() < noise.filler_rate:
        chars = list(noise.filler) + chars
        flags = [True] * len(noise.filler) + flags
    return "".join(chars), tuple(flags)


def make_examples(task: str, n: int, seed: int, noise: Optional[TargetNoise] = None,
                  exclude: Sequence[Example] = ()) -> List[Example]:
    """`n` examples of `task` from a seeded RNG; `noise` spoils the responses (None: clean).

    exclude: examples whose prompts must not reappear (keeps held-out sets disjoint from training sets).
    """
    rng = random.Random(f"{task}-{seed}")
    banned = {ex.prompt for ex in exclude}
    out: List[Example] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {task} examples outside the excluded set")
        body, answer = _answer(task, rng)
        prompt = f"{TASK_CODES[task]}:{body}>"
        if prompt in banned:
            continue
        if noise is None:
            response, flags = answer, (False,) * len(answer)
        else:
            response, flags = _spoil(answer, noise, rng)
        out.append(Example(task, prompt, response, answer, flags))
    return out


def retention_mixture(n: int, seed: int, tasks: Sequence[str] = RETENTION_TASKS) -> List[Example]:
    """`n` clean examples, an equal share of each retention task, shuffled (pre-training data)."""
    per = -(-n // len(tasks))
    mix = [ex for i, task in enumerate(tasks) for ex in make_examples(task, per, seed * 1000 + i)]
    random.Random(seed).shuffle(mix)
    return mix[:n]


def retention_eval_sets(n: int = 200, seed: int = 12345) -> dict:
    """Clean held-out sets, one per retention task: {task: [Example]}."""
    return {task: make_examples(task, n, seed) for task in RETENTION_TASKS}


@dataclass
class TargetData:
    """Target-task splits: noisy `train`, clean `validation` (for target="validation"), clean held-out `eval`."""

    train: List[Example]
    validation: List[Example]
    eval: List[Example]

    @property
    def noise_share(self) -> float:
        """Share of response characters (without eos) of `train` that are noise."""
        flags = [f for ex in self.train for f in ex.noise]
        return sum(flags) / max(1, len(flags))


def target_data(n_train: int = 2000, n_validation: int = 64, n_eval: int = 300, seed: int = 0,
                noise: Optional[TargetNoise] = None, task: str = TARGET_TASK) -> TargetData:
    """The target task's splits; training responses spoiled by `noise` (default `TargetNoise()`).

    task: "sort" (the new task) by default; a retention task such as "add" gives a noisy fine-tuning set of a
    task the built-in model already knows (noisy addition: every spoiled digit is surprising to the model).
    The evaluation set is fixed across seeds (seed-independent) so that seeds only vary training data and order.
    """
    noise = TargetNoise() if noise is None else noise
    if task not in TASK_CODES:
        raise ValueError(f"unknown task {task!r}; tasks are {sorted(TASK_CODES)}")
    ev = make_examples(task, n_eval, seed=987654)
    val = make_examples(task, n_validation, seed=555000 + seed, exclude=ev)
    train = make_examples(task, n_train, seed=seed, noise=noise, exclude=ev + val)
    return TargetData(train=train, validation=val, eval=ev)
