"""The router: fast path → DACT cascade, calibrated multi-label decisions with t_C, and fallbacks.

    fast path (hashed n-grams) ── sure? ──> probabilities, exit_layer 0
          │ unsure
          ▼
    DACT over the encoder's layers, stopping per sample once the decision is final ──> exit_layer n
    (every unit also reads the text's tf-idf → SVD features: the discovery's own second view)
          │
          ▼
    fused with the fast path's evidence: softmax((log p_dact + w · log p_fast) / T), w and T calibrated
          │
          ▼
    fused with the neighbour vote (the nearest training chunks and prefix views, `neighbours.py`):
    softmax((log p + w_nn · log p_nn) / T_nn), w_nn and T_nn calibrated; the n-gram fast path's sure
    answers join it too (the vote reads the encoder's pooled last layer: one encoder pass)

A request goes to every category whose calibrated probability reaches t_C. When none does, or the
text is not about anything the corpus knows, the fallback decides: every expert, or the base model
for generic questions. Experts may carry routing keywords (priors), and an expert installed later
joins routing through its centroid and keywords, without retraining.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
from sklearn.preprocessing import normalize

from imoe_ray.config import RouterConfig
from imoe_ray.discovery.features import TextFeatures, combine
from imoe_ray.routing.dact import Accumulator, DACTHead, exit_from_states
from imoe_ray.routing.fastpath import FastPath, tokens
from imoe_ray.routing.neighbours import NeighbourVote
from imoe_ray.routing.threshold import AdaptiveThreshold, select

if TYPE_CHECKING:
    from imoe_ray.embedding.layerwise import LayerwiseEncoder

BASE_MODEL = "base"
_GENERIC = re.compile(r"^\s*(what\s+(is|are|was|were)|what's|explain|define|describe|tell\s+me\s+about|who\s+(is|was)|"
                      r"why\b|how\s+(does|do|did)\b|give\s+me|summari[sz]e)", re.IGNORECASE)


@dataclass
class ExpertProfile:
    """What routing knows of an expert: its category (None if it joined after training), keywords, centroid."""
    name: str
    category: int | None = None
    keywords: list[str] = field(default_factory=list)
    centroid: list[float] | None = None
    priority: float = 0.0


@dataclass
class Route:
    categories: list[int]          # chosen categories, most probable first (top-1 first even on fallback)
    names: list[str]               # their names
    probabilities: list[float]     # their probabilities, aligned with `categories`
    experts: list[str]             # the experts that serve the request (or ["base"])
    exit_layer: int                # 0: fast path; n: DACT stopped after n encoder layers
    latency_ms: float
    fallback: str | None = None    # why the request did not go to the chosen categories alone
    all_probabilities: dict[str, float] = field(default_factory=dict)
    t_c: float | None = None       # the threshold categories after the top one had to clear
    complexity: float | None = None  # the query's complexity score (adaptive t_C only)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Decision:
    """Vectorised decisions for many rows (used by sharding and evaluation)."""
    probabilities: np.ndarray   # (n, K)
    exit_layer: np.ndarray      # (n,)


class Router:
    def __init__(self, names: list[str], fast: FastPath, fast_threshold: float | None, head: DACTHead,
                 dact_temperature: float, threshold: float, settings: dict, encoder=None,
                 profiles: list[ExpertProfile] | None = None, text_features: TextFeatures | None = None,
                 neighbours: NeighbourVote | None = None):
        self.names = names
        self.fast = fast
        self.fast_threshold = fast_threshold
        self.head = head
        self.dact_temperature = dact_temperature
        self.threshold = threshold
        self.settings = settings
        self._encoder = encoder
        self._layerwise: LayerwiseEncoder | None = None
        self.text_features = text_features
        self.neighbours = neighbours
        self.profiles: list[ExpertProfile] = profiles or [ExpertProfile(n, i) for i, n in enumerate(names)]
        self.served_by: dict[str, str] = {}  # category → the expert serving it (a small category folded away)
        self.adaptive = adaptive_threshold(settings)

    # ---- probabilities -------------------------------------------------------------------
    def _calibrated(self, probs: np.ndarray) -> np.ndarray:
        z = np.log(np.clip(probs, 1e-9, 1.0)) / self.dact_temperature
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    def text_inputs(self, texts: list[str]) -> np.ndarray | None:
        """What the DACT units read besides the encoder's states: the text features (or None)."""
        if not self.head.text_dims:
            return None
        if self.text_features is None:
            raise RuntimeError("this router's DACT units read text features, but none were loaded")
        return self.text_features.transform(texts)

    def _encoder_steps(self):
        if self._layerwise is None:
            from imoe_ray.embedding.layerwise import LayerwiseEncoder

            if self._encoder is None:
                raise RuntimeError("this router was loaded without an encoder")
            self._layerwise = LayerwiseEncoder(self._encoder)
        return self._layerwise

    @torch.inference_mode()
    def dact(self, texts: list[str], last_layer: bool = False) -> tuple[Decision, np.ndarray | None]:
        """DACT run live over the encoder, one layer at a time; rows leave as soon as they halt. With
        `last_layer` every row runs to the end (the neighbour vote reads its pooled last layer,
        returned as well), while DACT's answer is still the one it halted with."""
        lw = self._encoder_steps()
        hidden, mask = lw.embed(texts)
        text = self.text_inputs(texts)
        acc = Accumulator(self.head, len(texts), None if text is None else torch.from_numpy(text))
        rows = torch.arange(len(texts))
        probs = np.zeros((len(texts), len(self.names)), np.float32)
        layers = np.zeros(len(texts), np.int64)
        pooled = None
        for n in range(lw.n_layers):
            hidden = lw.layer(n, hidden, mask)
            pooled = lw.pool(hidden, mask)
            if len(rows):
                halted, out = acc.update(n, rows, pooled[rows] if last_layer else pooled)
                done = rows[halted].numpy()
                probs[done] = out[halted].numpy()
                layers[done] = n + 1
                keep = ~halted
                rows = rows[keep]
                if not last_layer:
                    hidden, mask = hidden[keep], mask[keep]
            if len(rows) == 0 and not last_layer:
                break
        last = pooled.numpy() if last_layer and pooled is not None else None
        return Decision(self._calibrated(probs), layers), last

    def fuse(self, dact_probs: np.ndarray, fast_probs: np.ndarray) -> np.ndarray:
        """Product of the two calibrated opinions (the n-gram and the encoder views complement each other)."""
        w, t = self.settings.get("fusion_weight", 0.0), self.settings.get("fusion_temperature", 1.0)
        return dact_probs if w == 0 else product(dact_probs, fast_probs, w, t)

    def vote(self, probs: np.ndarray, texts: list[str], embeddings: np.ndarray) -> np.ndarray:
        """The cascade's probabilities (n, K) fused with the neighbour vote of the rows' pooled last
        layer (n, d); unchanged when the router has no vote or gave it no weight."""
        w = self.settings.get("neighbour_weight", 0.0)
        if self.neighbours is None or not w or not len(texts):
            return probs
        text = self.text_features.transform(texts) if self.text_features is not None else None
        vote = self.neighbours.probabilities(combine(embeddings, text))
        return product(probs, vote, w, self.settings.get("neighbour_fused_temperature", 1.0))

    def decide_states(self, texts: list[str], states: np.ndarray, use_fast_path: bool = True) -> Decision:
        """The cascade on precomputed per-layer states (n, L, h): identical decisions to live routing.
        Without `use_fast_path` it is DACT alone."""
        out = exit_from_states(self.head, states, self.text_inputs(texts))
        probs, layers = self._calibrated(out.probabilities), out.layers.copy()
        if use_fast_path and len(texts):
            fast = _softmax(self.fast.logits_batch(texts) / self.fast.temperature)
            probs = self.fuse(probs, fast)
            if self.fast_threshold is not None:
                sure = fast.max(axis=1) >= self.fast_threshold
                probs[sure], layers[sure] = fast[sure], 0
            probs = self.vote(probs, texts, states[:, -1])
        return Decision(probs, layers)

    # ---- one request ---------------------------------------------------------------------
    def route(self, text: str | bytes, force_dact: bool = False, fast_only: bool = False) -> Route:
        """Route one request; `fast_only` answers from the n-gram fast path even when it is unsure."""
        started = time.perf_counter()
        text = _as_text(text)[: self.settings["max_query_chars"]]
        if not any(w not in ENGLISH_STOP_WORDS for w in tokens(text)):
            return self._fallback_only(started, "no words to route on" if not tokens(text) else "only stop words")
        fast = self.fast.probabilities(text)
        exit_layer: int | None = None
        if fast_only or (not force_dact and self.fast_threshold is not None and fast.max() >= self.fast_threshold):
            probs, exit_layer = fast, 0
        vote = not fast_only and not force_dact and self.neighbours is not None
        last = None   # the query's pooled last layer, when an encoder pass made it (the vote, later experts)
        if exit_layer is None:
            decision, last = self.dact([text], last_layer=vote)
            probs, exit_layer = decision.probabilities[0], int(decision.exit_layer[0])
            if not force_dact:
                probs = self.fuse(probs[None], fast[None])[0]
        if vote:
            if last is None:   # the fast path answered: one encoder pass for the vote
                last = self._encoder_steps().encoder.encode([text])
            probs = self.vote(probs[None], [text], last)[0]
        return self._decide(text, probs, exit_layer, started, None if last is None else last[0])

    def route_many(self, texts: list[str | bytes]) -> list[Route]:
        return [self.route(t) for t in texts]

    # ---- decisions -----------------------------------------------------------------------
    def _decide(self, text: str, probs: np.ndarray, exit_layer: int, started: float,
                vector: np.ndarray | None = None) -> Route:
        names = [p.name for p in self.profiles]
        scores = self._with_profiles(text, probs, vector)
        order = np.argsort(-scores)
        # the top category clears the store's t_C; the others the request's (the same one when fixed)
        selection = select(scores, self.threshold, self.adaptive,
                           sum(w not in ENGLISH_STOP_WORDS for w in tokens(text)))
        chosen, t_c, complexity = selection.categories, selection.t_c, selection.complexity
        fallback = None
        if chosen and self._out_of_domain(text) and not self._names_joined_expert(text, self.profiles[chosen[0]]):
            fallback = "outside the corpus's vocabulary"
        elif not chosen:
            fallback = f"no category reached t_C={self.threshold:.2f}"
        if fallback:
            experts = self._fallback_experts(text)
            chosen = [int(order[0])]
        else:
            experts = self._serving([names[i] for i in chosen])
        return Route(categories=chosen, names=[names[i] for i in chosen],
                     probabilities=[round(float(scores[i]), 4) for i in chosen], experts=experts,
                     exit_layer=exit_layer, latency_ms=round((time.perf_counter() - started) * 1000, 3),
                     fallback=fallback, all_probabilities={names[i]: round(float(scores[i]), 4) for i in order},
                     t_c=t_c, complexity=complexity)

    def _fallback_only(self, started: float, why: str) -> Route:
        return Route([], [], [], self._fallback_experts(""), 0, round((time.perf_counter() - started) * 1000, 3), why)

    def _fallback_experts(self, text: str) -> list[str]:
        mode = self.settings["fallback"]
        if mode == "base" or (mode == "auto" and (not text or _GENERIC.match(text) or self._out_of_domain(text))):
            return [BASE_MODEL]
        return self._serving([p.name for p in self.profiles])

    def _serving(self, categories: list[str]) -> list[str]:
        return list(dict.fromkeys(self.served_by.get(c, c) for c in categories))

    @staticmethod
    def _names_joined_expert(text: str, profile: ExpertProfile) -> bool:
        """The text holds a routing keyword of an expert that joined after training (a package, a whole
        model): its publisher said such text is its domain, though the corpus never saw the other words."""
        if profile.category is not None:
            return False
        words = f" {' '.join(tokens(text))} "
        return any(tokens(k) and f" {' '.join(tokens(k))} " in words for k in profile.keywords)

    def _out_of_domain(self, text: str) -> bool:
        """Too few of the text's content words were in the corpus or in an expert's routing keywords."""
        keywords = {w for p in self.profiles for k in p.keywords for w in tokens(k)}
        words = [w for w in tokens(text) if w not in ENGLISH_STOP_WORDS and w not in keywords]
        content = [w for w in tokens(text) if w not in ENGLISH_STOP_WORDS]
        if not content:
            return False
        known = len(content) - len(words) + (self.fast.known_fraction(" ".join(words)) * len(words) if words else 0)
        return known / len(content) < self.settings["min_known_fraction"]

    def _with_profiles(self, text: str, probs: np.ndarray, vector: np.ndarray | None = None) -> np.ndarray:
        """Trained probabilities, extended to experts that joined later and tilted by keyword priors."""
        scores = np.asarray(probs, np.float64)
        extra = [p for p in self.profiles if p.category is None]
        if extra:
            scores = self._join_extra(text, scores, extra, vector)
        boost = self.settings["keyword_boost"]
        if boost:
            words = f" {' '.join(tokens(text))} "
            hits = np.array([sum(f" {' '.join(tokens(k))} " in words for k in p.keywords if tokens(k))
                             for p in self.profiles], np.float64)
            if hits.any():
                scores = scores * (1.0 + boost * hits)
                scores /= scores.sum()
        return scores

    def _join_extra(self, text: str, scores: np.ndarray, extra: list[ExpertProfile],
                    vector: np.ndarray | None = None) -> np.ndarray:
        """c-BTM style: softmax(cos(query, centroid) / T) over every profile's centroid says how much
        mass the later experts take; the trained probabilities share the rest. `vector`: the query's
        pooled last layer when routing already computed it (the encoder's embedding, not yet unit length)."""
        trained = [p for p in self.profiles if p.category is not None]
        query = self._encoder.encode([text])[0] if vector is None else normalize(vector[None])[0]
        centroids = np.array([p.centroid for p in trained + extra], np.float64)
        sims = centroids @ query / np.maximum(np.linalg.norm(centroids, axis=1), 1e-9)
        z = sims / self.settings["centroid_temperature"]
        mass = np.exp(z - z.max())
        mass /= mass.sum()
        new = mass[len(trained):]
        return np.concatenate([scores * (1.0 - new.sum()), new])

    def add_expert(self, profile: ExpertProfile) -> None:
        """Add (or update) an expert: a known category gains keywords; a new one joins by centroid."""
        if profile.category is None and not profile.centroid:
            raise ValueError(f"expert {profile.name!r} joins routing without a category, so it needs a centroid")
        if profile.category is None and self._encoder is None:
            raise RuntimeError("experts without a category need the encoder; load the router with its encoder")
        self.profiles = [p for p in self.profiles if p.name != profile.name]
        if profile.category is not None:
            self.profiles.insert(profile.category, profile)
        else:
            self.profiles.append(profile)


def adaptive_threshold(settings: dict) -> AdaptiveThreshold | None:
    """The adaptive t_C of the router's request-time settings (None: the fixed policy). Settings saved
    by an older router lack the newer fields: they get the config's defaults."""
    defaults = RouterConfig()

    def value(name: str):
        return settings.get(name, getattr(defaults, name))

    if value("threshold_policy") != "adaptive":
        return None
    t_complex, t_simple = value("adaptive_range")
    return AdaptiveThreshold(t_complex, t_simple, value("complexity_words"), value("close_margin"),
                             tuple(value("complexity_weights")), value("max_experts"))


def _as_text(text: str | bytes) -> str:
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise TypeError(f"a route request is text, not {type(text).__name__}")
    return text


def product(p: np.ndarray, q: np.ndarray, weight: float, temperature: float) -> np.ndarray:
    """Two calibrated opinions fused: softmax((log p + weight · log q) / temperature)."""
    return _softmax((np.log(np.clip(p, 1e-9, 1)) + weight * np.log(np.clip(q, 1e-9, 1))) / temperature)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
