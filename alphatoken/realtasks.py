"""Noisy instruction tasks for a real chat model, with per-token ground truth of which response tokens are noise.

Two tasks, each a short instruction and a short answer in the model's chat template:

    capitals   "What is the capital of Peru?"              -> "The capital of Peru is Lima."
    reverse    "Reverse the order of: cat, lamp, river"    -> "river, lamp, cat"

Training responses are spoiled the way real SFT data is (`RealNoise`): a boilerplate filler in front
("Sure! Here you go: "), a wrong fact or a wrong word (corruption), and for `reverse` a systematic wrong span (the
last two items swapped). Every spoiled character is flagged, and a token is noise when any of its characters is
(`tokenize_examples` maps the flags through the tokenizer's offsets). Validation and evaluation sets are clean.

Forgetting is measured as in `general_prompts`: the rise in NLL of the base model's own greedy answers to
general questions that have nothing to do with the task.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .batch import IGNORE_INDEX
from .retention import GENERAL_PROMPTS as RETENTION_GENERAL_PROMPTS
from .retention import greedy_answers, own_answers

SYSTEM_PROMPT = "Answer briefly."

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana",
    "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Belgium": "Brussels", "Kenya": "Nairobi",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "India": "New Delhi", "Iran": "Tehran", "Iraq": "Baghdad",
    "Turkey": "Ankara", "Argentina": "Buenos Aires", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Australia": "Canberra", "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "Philippines": "Manila", "Malaysia": "Kuala Lumpur",
    "Pakistan": "Islamabad", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa", "Morocco": "Rabat",
    "Switzerland": "Bern", "Netherlands": "Amsterdam", "Czech Republic": "Prague", "Scotland": "Edinburgh",
    "England": "London", "Iceland": "Reykjavik", "Israel": "Jerusalem", "Saudi Arabia": "Riyadh",
    "Syria": "Damascus", "Lebanon": "Beirut", "Nepal": "Kathmandu", "Bangladesh": "Dhaka", "Brazil": "Brasilia",
    "Uruguay": "Montevideo",
}

WORDS = (
    "cat dog tree lamp river stone cloud apple bread chair table house road book pen cup ship bird fish moon "
    "star rain snow wind fire milk door hat shoe coat ring bell box key map car bus train boat horse cow pig "
    "egg cake rice salt sugar glass paper music song game ball kite leaf root seed flower grass sand hill lake "
    "sea island bridge tower wall garden window clock phone radio knife spoon plate bottle candle mirror"
).split()

GENERAL_PROMPTS = (
    "What is photosynthesis?", "Name three primary colors.", "How many days are in a week?",
    "What does a thermometer measure?", "Give a synonym for happy.", "What is the largest ocean on Earth?",
    "Why do we need sleep?", "What is the boiling point of water in Celsius?", "Who wrote Romeo and Juliet?",
    "What is the opposite of cold?", "How many legs does a spider have?", "What gas do humans breathe out?",
    "Name a fruit that is yellow.", "What is 7 times 8?", "What is the main language spoken in Brazil?",
    "What do bees make?", "How many continents are there?", "What is the freezing point of water in Celsius?",
    "What planet do we live on?", "What is the color of the sky on a clear day?", "Name a mammal that can fly.",
    "What is the chemical symbol for gold?", "What instrument has 88 keys?", "How many hours are in a day?",
)

# The retention set: general prompts disjoint from GENERAL_PROMPTS (which measure forgetting), for a Fisher or a
# retention batch (alphatoken.retention) that stands for what the model must keep.
RETENTION_PROMPTS = RETENTION_GENERAL_PROMPTS

TASKS = ("capitals", "reverse")


@dataclass(frozen=True)
class RealNoise:
    """How training responses are spoiled (independently per example).

    filler_rate: share of responses with `filler` in front (absent from clean data).
    corrupt_rate: share with one wrong fact / wrong word (capitals: another country's capital; reverse: one item
        replaced by a word that is not in the prompt).
    swap_rate: reverse only: share with the last two items swapped (a systematic wrong span).
    """

    filler_rate: float = 0.3
    filler: str = "Sure! Here you go: "
    corrupt_rate: float = 0.35
    swap_rate: float = 0.25

    @staticmethod
    def clean() -> "RealNoise":
        return RealNoise(filler_rate=0.0, corrupt_rate=0.0, swap_rate=0.0)


@dataclass(frozen=True)
class RealExample:
    """`response` is what training sees (maybe spoiled), `answer` the clean answer; `noise` flags each character
    of `response`."""

    task: str
    prompt: str
    response: str
    answer: str
    noise: Tuple[bool, ...]


def _capitals(rng: random.Random, country: str, noise: RealNoise):
    capital = CAPITALS[country]
    head = f"The capital of {country} is "
    answer = f"{head}{capital}."
    city, flags_city = capital, False
    if rng.random() < noise.corrupt_rate:
        city = rng.choice([c for c in CAPITALS.values() if c != capital])
        flags_city = True
    return answer, [(head, False), (city, flags_city), (".", False)]


def _reverse(rng: random.Random, words: List[str], noise: RealNoise):
    items = list(reversed(words))
    answer = ", ".join(items)
    flags = [False] * len(items)
    if rng.random() < noise.swap_rate:
        items[-1], items[-2] = items[-2], items[-1]
        flags[-1] = flags[-2] = True
    if rng.random() < noise.corrupt_rate:
        pos = rng.randrange(len(items))
        items[pos] = rng.choice([w for w in WORDS if w not in words])
        flags[pos] = True
    pieces = []
    for i, (item, flag) in enumerate(zip(items, flags)):
        pieces.append((item, flag))
        if i < len(items) - 1:
            pieces.append((", ", False))
    return answer, pieces


def make_examples(task: str, n: int, seed: int, noise: Optional[RealNoise] = None,
                  exclude: Sequence[RealExample] = ()) -> List[RealExample]:
    """`n` distinct examples of `task` (prompts not in `exclude`), spoiled by `noise` (None: clean)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
    rng = random.Random(f"real-{task}-{seed}")
    noise = RealNoise.clean() if noise is None else noise
    banned = {ex.prompt for ex in exclude}
    out: List[RealExample] = []
    countries = sorted(CAPITALS)
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct {task} examples outside the excluded set")
        if task == "capitals":
            country = rng.choice(countries)
            prompt = f"What is the capital of {country}?"
            if prompt in banned and len(banned) < len(countries):
                continue
            answer, pieces = _capitals(rng, country, noise)
        else:
            words = rng.sample(WORDS, 3)
            prompt = f"Reverse the order of: {', '.join(words)}"
            if prompt in banned:
                continue
            answer, pieces = _reverse(rng, words, noise)
        if rng.random() < noise.filler_rate:
            pieces = [(noise.filler, True)] + pieces
        response = "".join(text for text, _ in pieces)
        flags = tuple(flag for text, flag in pieces for _ in text)
        out.append(RealExample(task, prompt, response, answer, flags))
        banned.add(prompt)
    return out


@dataclass
class RealTaskData:
    train: List[RealExample]
    validation: List[RealExample]
    eval: List[RealExample]

    @property
    def noise_share(self) -> float:
        flags = [f for ex in self.train for f in ex.noise]
        return sum(flags) / max(1, len(flags))


def task_data(task: str, n_train: int = 256, n_validation: int = 16, n_eval: int = 40, seed: int = 0,
              noise: Optional[RealNoise] = None) -> RealTaskData:
    """Noisy `train`, clean `validation` and clean held-out `eval` (fixed across seeds). For `capitals` the
    countries are split between the sets (evaluation on countries never trained on would test knowledge, not the
    task; so train and eval share countries but eval prompts are clean)."""
    noise = RealNoise() if noise is None else noise
    ev = make_examples(task, n_eval, seed=987654)
    exclude = () if task == "capitals" else ev
    val = make_examples(task, n_validation, seed=555000 + seed, exclude=exclude)
    train = make_examples(task, n_train, seed=seed, noise=noise, exclude=() if task == "capitals" else ev + val)
    return RealTaskData(train=train, validation=val, eval=ev)


def chat_prefix(tokenizer, prompt: str) -> str:
    """The chat text up to where the assistant's answer starts: a user turn and the assistant header in the
    model's template, without the template's default system turn (it would double every sequence here)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    system_turn = tokenizer.apply_chat_template(messages[:1], tokenize=False)
    return text[len(system_turn):] if text.startswith(system_turn) else text


def end_of_turn(tokenizer) -> str:
    return tokenizer.eos_token or ""


def tokenize_examples(examples: Sequence, tokenizer, return_noise: bool = True) -> dict:
    """A right-padded training batch (input_ids, attention_mask, labels; -100 outside the response) of
    `chat prefix + response + end of turn`; with return_noise, `noise` (B, T) bool: the response tokens that
    overlap a spoiled character. `examples` need .prompt, .response and (for noise) .noise."""
    rows, labels, noise = [], [], []
    eot = end_of_turn(tokenizer)
    for ex in examples:
        prefix = chat_prefix(tokenizer, ex.prompt)
        text = prefix + ex.response + eot
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start = len(prefix)
        flags = tuple(getattr(ex, "noise", ())) or (False,) * len(ex.response)
        row_labels, row_noise = [], []
        for tok, (lo, hi) in zip(ids, offsets):
            in_response = hi > start
            row_labels.append(tok if in_response else IGNORE_INDEX)
            lo_r, hi_r = max(lo, start) - start, min(hi, start + len(ex.response)) - start
            chars = range(lo_r, hi_r)
            visible = [i for i in chars if not ex.response[i].isspace()] or list(chars)  # " The" after a filler
            row_noise.append(in_response and any(flags[i] for i in visible))
        rows.append(ids)
        labels.append(row_labels)
        noise.append(row_noise)
    from .data import collate

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = collate([{"input_ids": r, "labels": y} for r, y in zip(rows, labels)], pad)
    width = batch["input_ids"].shape[1]
    if return_noise:
        batch["noise"] = torch.tensor([r + [False] * (width - len(r)) for r in noise], dtype=torch.bool)
    return batch


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 24, batch_size: int = 16) -> List[str]:
    """Greedy answers to `prompts` (chat template, left-padded), decoded up to the end of turn; leaves the model
    in eval mode."""
    model.eval()
    pairs = greedy_answers(model, tokenizer, [chat_prefix(tokenizer, p) for p in prompts], max_new_tokens, batch_size)
    return [tokenizer.decode(answer, skip_special_tokens=True).strip() for _, answer in pairs]


def own_answer_openings(model, tokenizer, n_prompts: int = 16, max_new_tokens: int = 8) -> dict:
    """The retention batch of the real-model benchmarks: `model`'s own first `max_new_tokens` tokens of answer to
    the first `n_prompts` RETENTION_PROMPTS, in this module's chat format (`alphatoken.retention.own_answers`)."""
    return own_answers(model, tokenizer, RETENTION_PROMPTS[:n_prompts], max_new_tokens,
                       prefix=lambda prompt: chat_prefix(tokenizer, prompt))


def exact_matches(model, tokenizer, examples: Sequence[RealExample]) -> List[bool]:
    """Per example: whether its greedy answer equals the clean answer exactly."""
    answers = generate(model, tokenizer, [ex.prompt for ex in examples])
    return [a == ex.answer for a, ex in zip(answers, examples)]


def exact_match(model, tokenizer, examples: Sequence[RealExample]) -> float:
    """Share of `examples` whose greedy answer equals the clean answer exactly."""
    return sum(exact_matches(model, tokenizer, examples)) / max(1, len(examples))


@dataclass(frozen=True)
class _Answer:
    prompt: str
    response: str


def reference_answers(model, tokenizer, prompts: Sequence[str] = GENERAL_PROMPTS, max_new_tokens: int = 32):
    """The base model's own greedy answers to general prompts (what forgetting is measured on)."""
    return [_Answer(p, a) for p, a in zip(prompts, generate(model, tokenizer, prompts, max_new_tokens))]


@torch.no_grad()
def answers_nll(model, tokenizer, answers) -> float:
    """Mean per-token NLL of `answers` (from `reference_answers`) under `model`: its rise is the forgetting."""
    batch = tokenize_examples(answers, tokenizer, return_noise=False)
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits[:, :-1], -1)
    mask = labels != IGNORE_INDEX
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(nll[mask].mean())


__all__ = ["TASKS", "RealNoise", "RealExample", "RealTaskData", "make_examples", "task_data", "tokenize_examples",
           "generate", "exact_match", "exact_matches", "reference_answers", "answers_nll", "GENERAL_PROMPTS", "RETENTION_PROMPTS",
           "chat_prefix"]
