"""The summarizer: one more adapter on the shared base LM that grounds several experts' drafts in
one answer ("one expert gives a task, another constraints: the answer obeys both").

The prompt (`summarizer_prompt`) lists the question and each draft under its expert's name; the
summarizer continues it with the answer. It is trained on synthetic cases made from the corpus's
own shards (`synthesize_cases`): the question is the start of a chunk of one category, the *task
draft* (from that category's expert) is the chunk's continuation, and the *constraint draft* (from
another category's expert) asks for terms taken from a chunk of its own category, which the task
text does not contain, and/or bounds the answer's length. The reference answer names the required
terms, then follows the task draft as far as the length bound allows, so it obeys both drafts.
The drafts come in either order, so the summarizer must tell task from constraint by content.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from imoe_ray.experts.data import IGNORE

SUMMARIZER = "summarizer"      # the adapter's name, as serving loads it
FUSION_DIR = "fusion"          # STORE/fusion/summarizer: the PEFT adapter directory
ANSWER = "Answer:"
MAX_QUESTION_WORDS = 16        # the prompt keeps the question's last words and each draft's first:
MAX_DRAFT_WORDS = 32           # the small base LM reads 128 tokens
DEFAULT_ANSWER_WORDS = 14      # the answer's length when no draft bounds it
MARGIN_WORDS = 2               # a reference answer stays this far below its bound
_WORD = re.compile(r"^[A-Za-z][a-z]{3,15}$")  # a required term: a plain lower-case-ish word
_STOP = frozenset("""about above after again against also although among another anything because been before
being below between both cannot could does doing down during each either else ever every from further have having
here hers herself himself however into itself just last like made make many might more most much must neither never
next none only other otherwise ours ourselves over same shall should since some such than that their theirs them
themselves then there these they this those though through thus under until upon very were what when where whether
which while whom whose will with within without would your yours yourself yourselves true false none self value
values return returns default object objects type types given used uses using function functions method methods
example examples parameter parameters argument arguments instance class note notes optional""".split())

STOP_WORDS = _STOP


@dataclass
class Case:
    """One synthetic fusion case: the prompt's parts, what the answer must obey, and a reference answer."""
    question: str
    drafts: list[tuple[str, str]]   # (expert, draft text), in prompt order
    task: int                       # which draft is the task draft
    terms: list[str]                # words the answer must contain (may be empty)
    max_words: int | None           # the answer's length bound in words (None: no bound)
    reference: str

    @property
    def prompt(self) -> str:
        return summarizer_prompt(self.question, self.drafts)

    def to_json(self) -> dict:
        return asdict(self)


def clip_words(text: str, n: int, keep_end: bool = False) -> str:
    words = text.split()
    return " ".join(words[-n:] if keep_end else words[:n])


def summarizer_prompt(question: str, drafts: list[tuple[str, str]], max_question_words: int = MAX_QUESTION_WORDS,
                      max_draft_words: int = MAX_DRAFT_WORDS) -> str:
    """The summarizer's prompt: the question (its last words), then one line per draft,
    `[expert] draft` (its first words, whitespace collapsed), then `Answer:`; the answer follows
    after a space. Serving puts the models' EOS separator before it, as training does."""
    lines = [clip_words(question, max_question_words, keep_end=True)]
    lines += [f"[{name}] {clip_words(text, max_draft_words)}" for name, text in drafts]
    return "\n".join(lines + [ANSWER])


def constraint_text(terms: list[str], max_words: int | None) -> str:
    """What the constraint expert says: the terms to mention and/or the length bound."""
    parts = []
    if terms:
        parts.append(f"Mention {' and '.join(terms)}.")
    if max_words is not None:
        parts.append(f"At most {max_words} words.")
    return " ".join(parts)


def reference_answer(task_words: list[str], terms: list[str], max_words: int | None) -> str:
    """The terms first ("X and Y:"), then the task draft, cut to stay within the bound."""
    head = f"{' and '.join(terms)}:".split() if terms else []
    total = (max_words - MARGIN_WORDS) if max_words is not None else DEFAULT_ANSWER_WORDS
    return " ".join(head + task_words[: max(1, total - len(head))])


def has_term(text: str, term: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(term)}(?![A-Za-z0-9_])", text, re.IGNORECASE) is not None


def candidate_terms(text: str, exclude: set[str]) -> list[str]:
    """Words of a constraint chunk that can be required: plain words, no stop words, not in `exclude`."""
    seen, out = set(exclude), []
    for raw in text.split():
        word = raw.strip(".,;:()[]{}'\"*`!?")
        low = word.lower()
        if _WORD.match(word) and low not in _STOP and low not in seen:
            seen.add(low)
            out.append(word)
    return out


def synthesize_cases(texts: dict[str, list[str]], n: int, seed: int, words: tuple[int, int] = (10, 16),
                     question_words: tuple[int, int] = (6, 12), draft_words: int = 20,
                     kinds: tuple[float, float, float, float] = (0.45, 0.15, 0.15, 0.25)) -> list[Case]:
    """`n` fusion cases from the category texts ({expert: chunks}, at least two experts).

    `kinds` are the shares of cases whose constraint draft asks for terms and a length bound,
    terms only, and a length bound only, and of single-draft cases (no constraint: the answer
    is the draft itself, which teaches the small base LM to copy); `words` is the range of
    length bounds."""
    names = [name for name, chunks in texts.items() if chunks]
    if len(names) < 2:
        raise ValueError(f"the summarizer needs drafts from two experts; only {len(names)} has text")
    rng = np.random.default_rng(seed)
    sizes = np.asarray([len(texts[name]) for name in names], dtype=np.float64)
    kind_p = np.asarray(kinds, dtype=np.float64) / sum(kinds)
    cases: list[Case] = []
    for _ in range(n * 20):  # chunks too short for a case are drawn again
        if len(cases) == n:
            break
        a = int(rng.choice(len(names), p=sizes / sizes.sum()))
        b = int(rng.choice([i for i in range(len(names)) if i != a]))
        task_chunk = texts[names[a]][rng.integers(len(texts[names[a]]))].split()
        q = int(rng.integers(question_words[0], question_words[1] + 1))
        if len(task_chunk) < q + draft_words:
            continue
        start = int(rng.integers(0, len(task_chunk) - q - draft_words + 1))
        question, task = task_chunk[start:start + q], task_chunk[start + q:start + q + draft_words]
        kind = int(rng.choice(4, p=kind_p))
        if kind == 3:
            cases.append(Case(" ".join(question), [(names[a], " ".join(task))], 0, [], None,
                              reference_answer(task, [], None)))
            continue
        terms: list[str] = []
        if kind < 2:
            pool = candidate_terms(texts[names[b]][rng.integers(len(texts[names[b]]))],
                                   {w.strip(".,;:()[]{}'\"*`!?").lower() for w in question + task})
            if not pool:
                continue
            n_terms = 2 if len(pool) > 1 and rng.random() < 0.7 else 1
            terms = [pool[i] for i in sorted(rng.choice(len(pool), n_terms, replace=False))]
        max_words = int(rng.integers(words[0], words[1] + 1)) if kind != 1 else None
        drafts = [(names[a], " ".join(task)), (names[b], constraint_text(terms, max_words))]
        task_at = int(rng.integers(2))
        if task_at:
            drafts.reverse()
        cases.append(Case(" ".join(question), drafts, task_at, terms, max_words,
                          reference_answer(task, terms, max_words)))
    return cases


def encode_case(tokenizer, prompt: str, answer: str | None = None) -> tuple[list[int], int]:
    """Token ids of EOS + prompt (+ " " + answer + EOS), and where the answer starts."""
    ids = [tokenizer.eos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = len(ids)
    if answer is not None:
        ids += tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids, start


def fits(tokenizer, cases: list[Case], max_len: int) -> list[Case]:
    """The cases whose prompt and reference answer fit the model's context."""
    return [c for c in cases if len(encode_case(tokenizer, c.prompt, c.reference)[0]) <= max_len]


def training_rows(cases: list[Case], tokenizer, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One row per case, right-padded to the longest: (input_ids, labels), loss on the answer only."""
    encoded = [encode_case(tokenizer, c.prompt, c.reference) for c in cases]
    width = max(len(ids) for ids, _ in encoded)
    if width > max_len:
        raise ValueError(f"a case has {width} tokens, more than the model's {max_len}: filter with fits() first")
    inputs = np.full((len(cases), width), tokenizer.pad_token_id, dtype=np.int64)
    labels = np.full((len(cases), width), IGNORE, dtype=np.int64)
    for r, (ids, start) in enumerate(encoded):
        inputs[r, : len(ids)] = ids
        labels[r, start: len(ids)] = ids[start:]
    return inputs, labels


# ---- using a trained summarizer ---------------------------------------------------------------

def load_summarizer(store_dir: str | Path, device: str | None = None):
    """The base LM with the summarizer adapter attached, and the tokenizer: (model, tokenizer).
    `with model.disable_adapter():` gives the bare base model with the same weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(store_dir)
    adapter = root / FUSION_DIR / SUMMARIZER
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{root} has no summarizer ({adapter}): run `imoe build --store {root}` "
                                f"with fusion.summarizer: true")
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    model = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter), adapter_name=SUMMARIZER)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), tokenizer


def context_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 1024)


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 40, batch_size: int = 32,
             steers: list | None = None) -> list[str]:
    """Greedy completions of the prompts (each after EOS), left-padded in batches, until EOS.
    A prompt longer than the context keeps its last tokens, as serving does. `steers` (one per
    prompt, or None) constrain each prompt's decoding (`constrained.CopySteer`: `adjust`, `advance`)."""
    device = next(model.parameters()).device
    limit = context_length(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[str] = []
    for b in range(0, len(prompts), batch_size):
        rows = []
        for p in prompts[b: b + batch_size]:
            ids, _ = encode_case(tokenizer, p)
            keep = max(1, limit - max_new_tokens)
            rows.append(ids if len(ids) <= keep else ids[:1] + ids[len(ids) - keep + 1:])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.as_tensor(r)
            mask[i, width - len(r):] = 1
        ids, mask = ids.to(device), mask.to(device)
        new = torch.empty((len(rows), 0), dtype=torch.long, device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for _ in range(min(max_new_tokens, limit - width)):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            chosen = steered_argmax(logits, steers[b: b + batch_size], done) if steers else logits.argmax(-1)
            token = torch.where(done, torch.full_like(done, pad, dtype=torch.long), chosen)
            done |= token == eos
            new = torch.cat([new, token[:, None]], 1)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, (~done | (token == eos)).long()[:, None]], 1)
            if done.all():
                break
        for row in new.tolist():
            row = row[: row.index(eos)] if eos in row else row
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def steered_argmax(logits: torch.Tensor, steers: list, done: torch.Tensor) -> torch.Tensor:
    """Each row's greedy token under its steer (if any), which then advances past it."""
    out = logits.argmax(-1)
    for i, steer in enumerate(steers):
        if steer is None or done[i]:
            continue
        out[i] = int(steer.adjust(torch.log_softmax(logits[i].float().cpu(), -1)).argmax())
        steer.advance(int(out[i]))
    return out


def summarize(model, tokenizer, question: str, drafts: list[tuple[str, str]], max_new_tokens: int = 40) -> str:
    """One answer grounded in the experts' drafts, from a model loaded with `load_summarizer`."""
    return generate(model, tokenizer, [summarizer_prompt(question, drafts)], max_new_tokens)[0]


@torch.inference_mode()
def reference_nll(model, tokenizer, cases: list[Case], batch_size: int = 32) -> np.ndarray:
    """Per case, the mean negative log-likelihood per token of the reference answer (and its EOS) given the prompt."""
    device = next(model.parameters()).device
    inputs, labels = training_rows(cases, tokenizer, context_length(model))
    out = []
    for b in range(0, len(cases), batch_size):
        x = torch.as_tensor(inputs[b: b + batch_size], device=device)
        y = torch.as_tensor(labels[b: b + batch_size], device=device)
        logits = model(input_ids=x).logits.float()  # right padding: causal attention never sees it
        logp = torch.log_softmax(logits[:, :-1], -1)
        target = y[:, 1:]
        scored = target != IGNORE
        nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * scored
        out.append((nll.sum(1) / scored.sum(1)).cpu().numpy())
    return np.concatenate(out)
