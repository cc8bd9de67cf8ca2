"""The request pipeline's retrieval, compression and learning components for one store (the Router
deployment builds them; `imoe_ray.serving.pipeline.Planner` calls them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from imoe_ray.compression.units import Compressed, count_tokens, key_terms
from imoe_ray.config import Config
from imoe_ray.retrieval.fusion import configured
from imoe_ray.retrieval.knowledge_base import KnowledgeBase, Passage, open_knowledge_base
from imoe_ray.retrieval.learning import Caps, Exchange, LearningBuffer


def expert_categories(store: str | Path) -> dict[str, list[str]]:
    """Expert name → the categories (knowledge-base tables) it serves."""
    index = Path(store) / "experts" / "index.json"
    if not index.is_file():
        return {}
    return {e["name"]: list(e.get("categories") or [e["name"]]) for e in json.loads(index.read_text())["experts"]}


class StoreRetriever:
    """Hybrid search over the tables of the request's categories (all tables when it has none)."""

    def __init__(self, kb: KnowledgeBase, cfg: Config, experts: dict[str, list[str]]):
        self.kb, self.rc, self.experts = kb, cfg.retrieval, experts

    def tables(self, names: list[str]) -> list[str]:
        known = set(self.kb.names())
        out = [t for n in names for t in ([n] if n in known else self.experts.get(n, []))]
        return list(dict.fromkeys(t for t in out if t in known))

    def embed(self, query: str):
        return self.kb.embed([query])[0]

    def retrieve(self, query: str, categories: list[str], k: int, vector=None) -> list[Passage]:
        return self.kb.search(query, self.tables(categories) or None, k=k, mode=self.rc.search,
                              min_similarity=self.rc.min_similarity, candidates=self.rc.candidates, vector=vector)


class PromptCompressor:
    """Compress [prompt, *passages] to the configured ratio (key terms of the query kept), then fit the
    retrieved context into its token budget. Returns the prompt and the context as two texts."""

    def __init__(self, store: str | Path, cfg: Config, threads: int | None = 1, scorer=None):
        """`scorer` (texts → per text, token offsets and surprisals): where the selective compressor's
        base LM runs, e.g. the expert replica that already holds it; without one it loads its own."""
        from transformers import AutoTokenizer

        from imoe_ray.compression.filler import FillerCompressor
        from imoe_ray.compression.selective import SelectiveCompressor

        self.rc = cfg.retrieval
        if self.rc.compressor == "selective":
            self.method: SelectiveCompressor | FillerCompressor | None = SelectiveCompressor(Path(store) / "base", threads=threads, scorer=scorer)
            self.tokenizer = self.method.tokenizer
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(Path(store) / "base")
            self.method = FillerCompressor(count_tokens(self.tokenizer)) if self.rc.compressor == "filler" else None
        self.count = count_tokens(self.tokenizer)

    def compress(self, query: str, texts: list[str], budget_tokens: int | None) -> Compressed:
        """The ratio it reports is the compressor's own: tokens in (passages cut to what the budget
        can use) over tokens out."""
        prompt, passages = texts[0], texts[1:]
        if budget_tokens is not None and passages:
            usable = budget_tokens * (self.rc.compression_ratio if self.method is not None else 1.0)
            passages = self._fit(passages, math.ceil(usable))
        original = self.count([prompt, *passages])
        if self.method is not None and original >= self.rc.min_compress_tokens:
            out = self.method.reduce(prompt, passages, self.rc.compression_ratio, keys=key_terms(query))
            prompt, passages = out.question, out.passages
        context = "\n".join(p for p in passages if p)
        if budget_tokens is not None and context:
            ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
            context = self.tokenizer.decode(ids[:budget_tokens]) if len(ids) > budget_tokens else context
        return Compressed(prompt, [context] if context else [], original, self.count([prompt, context]))

    def _fit(self, passages: list[str], tokens: int) -> list[str]:
        """The passages, in rank order, up to `tokens` tokens (the last one cut)."""
        out = []
        for passage, ids in zip(passages, self.tokenizer(passages, add_special_tokens=False)["input_ids"]):
            if tokens <= 0:
                break
            out.append(passage if len(ids) <= tokens else self.tokenizer.decode(ids[:tokens]))
            tokens -= len(ids)
        return out


class Learner:
    """Queues an `optimized` request's question and answer for its experts' tables, with the caller
    that sent it (written in batches, within the per-caller and per-table caps)."""

    def __init__(self, kb: KnowledgeBase, cfg: Config, experts: dict[str, list[str]]):
        self.kb, self.rc, self.experts = kb, cfg.retrieval, experts
        self.buffer = LearningBuffer(kb, self.rc.learn_max_chars, Caps.of(self.rc), self.rc.learn_batch_rows,
                                     self.rc.learn_flush_s)

    def allowed(self, caller: str | None) -> bool:
        return self.rc.learn_callers is None or caller in self.rc.learn_callers

    def learn(self, question: str, answer: str, experts: list[str], request_id: str, caller: str | None = None) -> bool:
        """False when this caller's answers are not learned (not allowed, or over its hourly cap)."""
        if not self.allowed(caller):
            return False
        tables = [t for e in experts for t in self.experts.get(e, [e])]
        return self.buffer.add(Exchange(question, answer, tables, request_id, caller))


def build_components(store: str | Path, cfg: Config, threads: int | None = 1, scorer=None,
                     local_root: str | Path | None = None):
    """(retriever, compressor, learner) for a store; None where the store or the settings have none.
    `scorer`: see `PromptCompressor` (the Serve Router passes the expert replicas' base model).
    `local_root`: where the store's files can be read by path (a URI store's mirror, see
    `imoe_ray.store.mirror`); the knowledge base is opened at the store itself."""
    from imoe_ray.store.store import Store, is_uri

    local = Path(local_root or store)
    compressor = PromptCompressor(local, cfg, threads, scorer) if (local / "base" / "config.json").is_file() else None
    has_kb = Store(store, create=False).exists("kb") if is_uri(store) else (Path(store) / "kb").is_dir()
    if not has_kb:
        return None, compressor, None
    experts = expert_categories(local)
    kb = open_knowledge_base(store, cfg.embedding.encoder, cfg.embedding.max_tokens, cfg.corpus.text_column,
                             consistency_s=1.0, threads=threads)
    kb.fusion = configured(kb.fusion, cfg.retrieval)
    learner = Learner(kb, cfg, experts) if cfg.retrieval.learn else None
    return StoreRetriever(kb, cfg, experts), compressor, learner
