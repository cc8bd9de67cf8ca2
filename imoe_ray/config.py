"""The one configuration object of IMoE-Ray.

Every stage reads its settings from `Config`; nothing else looks at the environment.
A YAML file gives the settings, `--set section.field=value` on the CLI overrides them, and
pydantic validates the result once, at the edge, with messages that name the bad field.
Every field has a default that works offline on a laptop.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_ENCODER = "embedded:all-MiniLM-L6-v2"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which field and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(_Section):
    path: str | None = Field(None, description="HF dataset id or path, .txt/.jsonl/.parquet file, or a directory of them")
    text_column: str = "text"
    id_column: str | None = Field("id", description="column with stable ids; generated from the text when absent")
    split: str = Field("train", description="split to read from a Hugging Face dataset")
    chunk_tokens: int = Field(256, ge=16, le=8192, description="chunk length in encoder tokens")
    chunk_overlap: int = Field(32, ge=0, description="tokens shared by neighbouring chunks")
    min_chunk_tokens: int = Field(8, ge=1, description="shorter trailing chunks are merged into the previous one")

    @model_validator(mode="after")
    def _overlap_below_length(self) -> "CorpusConfig":
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})")
        return self


class EmbeddingConfig(_Section):
    encoder: str = Field(DEFAULT_ENCODER, description="'embedded:all-MiniLM-L6-v2', a HF model id, or a local directory")
    batch_size: int = Field(64, ge=1)
    max_tokens: int = Field(256, ge=8, description="truncation length when encoding")
    concurrency: int | None = Field(None, ge=1, description="embedding actors; default: one per GPU, else one per 2 CPUs")
    num_threads: int | None = Field(None, ge=1, description="torch threads per actor; default: CPUs per actor")
    part_rows: int = Field(2048, ge=1, description="rows per resumable embedding part file")


class DiscoveryConfig(_Section):
    max_categories: int | None = Field(None, ge=2, description="optional cap on n_C; n_C itself is found automatically")
    min_cluster_fraction: float = Field(0.02, gt=0, lt=0.5, description="smallest category as a fraction of the chunks")
    min_cluster_size: int = Field(8, ge=2, description="smallest category in chunks (the larger of this and the fraction wins)")
    text_features: bool = Field(True, description="add tf-idf→SVD features of the text to the embeddings")
    svd_dims: int = Field(100, ge=2, description="dimensions of the tf-idf→SVD text features")
    reduce_dims: int = Field(10, ge=2, description="UMAP dimensions before density clustering")
    n_neighbors: int = Field(30, ge=2, description="UMAP neighbourhood size")
    threshold: float = Field(0.2, gt=0, lt=1, description="t_C: membership above which a chunk belongs to a category")
    complexity_k: float = Field(0.0, ge=0, description="k of t_C = t_base*(1-log(1+k*c)/log(1+k)); 0 keeps t_C fixed")
    n_keywords: int = Field(10, ge=1)
    seed: int = 0


class RouterConfig(_Section):
    calib_fraction: float = Field(0.15, gt=0, lt=0.5, description="share of input rows held out to calibrate")
    test_fraction: float = Field(0.15, ge=0, lt=0.5, description="share of input rows held out to evaluate")
    prefix_tokens: tuple[int, int] = Field((8, 32), description="length range of the prefix views, in encoder tokens")
    key_terms: tuple[int, int] = Field((3, 6), description="how many key terms a key-term view has")
    synthetic_chunks_per_cluster: int = Field(15, ge=2, description="sub-cluster size when synthesising queries per category")
    synthetic_per_cluster: int = Field(4, ge=0, le=7, description="queries synthesised per sub-cluster")
    eval_prefix_tokens: int = Field(24, ge=1, description="prefix length of the held-out short-query evaluation")
    max_tokens: int = Field(256, ge=8, description="encoder tokens a request is truncated to")
    max_query_chars: int = Field(20_000, ge=100, description="characters of a request the router reads")
    fast_features: int = Field(2**17, ge=2**10, description="hash buckets of the fast path's n-gram features")
    fast_c: float = Field(10.0, gt=0, description="inverse regularisation of the fast path's logistic regression")
    fast_min_precision: float = Field(0.9, ge=0, le=1, description="held-out precision the fast path must keep "
                                      "(it must also be at least as accurate there as the slow path)")
    ponder_lambdas: list[float] = Field([0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1], min_length=1, description="DACT halting weights tried")
    max_accuracy_drop: float = Field(0.01, ge=0, description="DACT may lose this much accuracy against the full encoder")
    read_text_features: bool = Field(True, description="the fast path, every DACT unit (and the reference head) also read the text's "
                                     "tf-idf → SVD features that discovery clustered on (when discovery used them)")
    reference_c: float = Field(4.0, gt=0, description="inverse regularisation of every layer's logistic-regression "
                               "classifier (the last layer's is the full-encoder reference)")
    epochs: int = Field(30, ge=1, description="passes of the halting units' training")
    lr: float = Field(3e-3, gt=0, description="learning rate of the halting units")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay of the halting units")
    batch_size: int = Field(256, ge=1)
    threshold: float | None = Field(None, gt=0, lt=1, description="t_C for requests; None: discovery.threshold")
    fallback: Literal["auto", "all", "base"] = Field(
        "auto", description="no category above t_C: 'all' experts, the 'base' model, or 'auto' (base for generic questions)")
    min_known_fraction: float = Field(0.34, ge=0, le=1, description="queries with fewer known content words are out of domain")
    keyword_boost: float = Field(1.0, ge=0, description="prior weight of an expert's routing keywords found in a query")
    centroid_temperature: float = Field(0.1, gt=0, description="T of softmax(cos/T) for experts joined by centroid")
    threshold_policy: Literal["fixed", "adaptive"] = Field(
        "fixed", description="t_C per request: 'fixed' (threshold) or 'adaptive' (from the query's complexity: "
                             "imoe_ray/routing/threshold.py)")
    adaptive_range: list[float] = Field([0.03, 0.1], min_length=2, max_length=2,
                                        description="adaptive t_C of the most complex and of the simplest query "
                                                    "(the adaptive defaults were tuned on calibration splits: "
                                                    "benchmarks/bench_route_threshold.py --folds)")
    complexity_words: int = Field(12, ge=1, description="content words at which a query counts as long (adaptive t_C)")
    close_margin: float = Field(0.2, ge=0, le=1, description="categories this close to the top count as rivals (adaptive t_C)")
    complexity_weights: list[float] = Field([1.0, 3.0, 1.0], min_length=3, max_length=3,
                                            description="weights of length, router entropy and close rivals in the "
                                                        "query's complexity score (adaptive t_C)")
    max_experts: int | None = Field(3, ge=1, description="most categories one request goes to (adaptive t_C); "
                                                        "null: no cap")
    neighbour_k: int = Field(25, ge=0, description="training rows in the neighbour vote (0: no vote)")
    neighbour_temperature: float = Field(0.1, gt=0, description="T of a neighbour's weight exp(cos / T)")
    neighbour_rows: int = Field(50_000, ge=1, description="most training rows the neighbour vote keeps (a uniform sample)")
    seed: int = 0

    @model_validator(mode="after")
    def _ranges(self) -> "RouterConfig":
        for name in ("prefix_tokens", "key_terms"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range [low, high] with 1 <= low <= high, not {[lo, hi]}")
        lo, hi = self.adaptive_range
        if not 0 < lo <= hi < 1:
            raise ValueError(f"adaptive_range must be [t_complex, t_simple] with 0 < t_complex <= t_simple < 1, not {[lo, hi]}")
        if min(self.complexity_weights) < 0 or sum(self.complexity_weights) <= 0:
            raise ValueError(f"complexity_weights must be three weights >= 0 with a positive sum, not {self.complexity_weights}")
        return self


# Router settings read at request time (changing them needs no retraining), and the ones training reads.
ROUTER_RUNTIME_FIELDS = ("threshold", "fallback", "min_known_fraction", "keyword_boost", "centroid_temperature",
                         "threshold_policy", "adaptive_range", "complexity_words", "close_margin",
                         "complexity_weights", "max_experts")
ROUTER_TRAINING_FIELDS = tuple(f"router.{k}" for k in RouterConfig.model_fields if k not in ROUTER_RUNTIME_FIELDS)


class ShardingConfig(_Section):
    write_lancedb: bool = True


class PretrainConfig(_Section):
    """The embedded default base LM: a tokenizer and a small Llama-style model trained on the corpus."""
    vocab_size: int = Field(4096, ge=260, description="BPE vocabulary trained on the corpus")
    hidden_size: int = Field(128, ge=16)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    intermediate_size: int = Field(384, ge=16)
    seq_len: int = Field(128, ge=16, description="training block length in LM tokens (also the experts')")
    epochs: float = Field(4.0, gt=0, description="passes over the training text")
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(16, ge=1, description="blocks per optimizer step (over all workers)")
    workers: int = Field(1, ge=1, description="Ray Train workers")
    cpus_per_worker: int | None = Field(None, ge=1, description="default: every CPU of the cluster over the workers")
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> "PretrainConfig":
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of heads ({self.heads})")
        return self


class ExpertsConfig(_Section):
    base_model: str | None = Field(None, description="HF causal LM id or directory; None: pre-train one on the corpus")
    adapter: Literal["lora", "dora", "ia3"] = "lora"
    r: int = Field(16, ge=1, description="LoRA/DoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA/DoRA scaling numerator")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="modules the adapter wraps")
    output_layer: bool = Field(True, description="with all-linear, also adapt lm_head: an expert can then shift "
                                                 "next-token frequencies toward its domain (false: experts vLLM "
                                                 "loads as trained; what that costs: docs/benchmarks.md)")
    # One pass in small batches: on the sample corpus, 3 passes made each expert fit its shard's own
    # passages and lose on new ones (top-1 expert 1.06x the dense baseline's perplexity, 0.94x at one pass).
    epochs: float = Field(1.0, gt=0, description="passes over each expert's shard")
    lr: float = Field(4e-3, gt=0)
    batch_size: int = Field(4, ge=1, description="blocks per optimizer step (over all of an expert's workers)")
    strategy: Literal["ddp", "deepspeed"] = Field("ddp", description="'deepspeed': ZeRO through Ray Train")
    zero_stage: int = Field(2, ge=0, le=2, description="DeepSpeed ZeRO stage (0-2: every rank keeps whole parameters)")
    workers_per_expert: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1)
    gpus_per_worker: float | None = Field(None, ge=0, description="default: 1/max_concurrent of a GPU when the cluster has GPUs")
    max_concurrent: int | None = Field(None, ge=1, description="expert jobs at once; default: as many as resources allow")
    max_failures: int = Field(2, ge=0, description="restarts of a failed worker group per expert (FailureConfig)")
    checkpoint_s: float = Field(10.0, ge=0, description="least seconds between two checkpoints of a one-worker "
                                "job (each costs a second or two; a killed job resumes from the last one)")
    min_chunks: int = Field(8, ge=1, description="smaller categories are folded into their nearest neighbour")
    dense_baseline: bool = Field(True, description="also train one adapter on all shards with the experts' total tokens")
    top_k: int = Field(3, ge=1, description="experts mixed per request (token-level mixture)")
    seed: int = 0


class FusionConfig(_Section):
    """The summarizer: one more adapter on the base LM that grounds several experts' drafts in one answer."""
    summarizer: bool = Field(True, description="train the summarizer in the build (stage `summarizer`)")
    examples: int = Field(4800, ge=8, description="synthetic training cases made from the shards' training rows "
                                                  "(those longer than max_tokens are dropped)")
    eval_cases: int = Field(200, ge=1, description="held-out cases `imoe eval summarizer` makes")
    epochs: float = Field(2.0, gt=0, description="passes over the training cases")
    lr: float = Field(4e-3, gt=0)
    batch_size: int = Field(16, ge=1, description="cases per optimizer step")
    r: int = Field(64, ge=1, description="LoRA rank of the summarizer (always LoRA: what serving's adapter bank loads)")
    alpha: float = Field(128, gt=0, description="LoRA scaling numerator")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="modules the adapter wraps (the attention: copying "
                                                              "from the drafts is what it learns); a base LM with other "
                                                              "names needs its own, or 'all-linear'")
    max_tokens: int = Field(80, ge=16, description="longest training case in LM tokens (longer ones are dropped)")
    max_words: tuple[int, int] = Field((8, 12), description="range of the length bounds a constraint draft sets")
    question_words: tuple[int, int] = Field((4, 8), description="range of the synthetic questions' lengths, in words")
    draft_words: int = Field(12, ge=2, description="length of a synthetic task draft, in words")
    cpus_per_worker: int | None = Field(None, ge=1, description="default: every CPU of the cluster")
    seed: int = 0
    constrained: bool = Field(True, description="serving fuses by plan and copy (imoe_ray.fusion.constrained): the "
                              "drafts' required terms and length bounds are obeyed by construction and the summarizer "
                              "copies their content; false: the summarizer writes the answer freely, as trained")
    copy_bias: float | None = Field(None, gt=0, description="null: copy by construction (each answer token continues "
                                    "a draft, or ends the answer); a number: added to the copy candidates' "
                                    "log-probabilities, so the summarizer may bridge with its own words")
    stop: Literal["budget", "sentence", "model"] = Field(
        "budget", description="where a fused answer may end (plan and copy): 'budget': when the copied draft reaches "
                              "the word budget (the tightest bound, else answer_words); 'sentence': also at a sentence's "
                              "end; 'model': at any word's end the summarizer chooses")
    answer_words: int = Field(14, ge=1, description="length of a fused answer, in words, when no draft bounds it")
    salient_terms: int = Field(1, ge=0, description="specific words of each content draft after the first that the "
                                                    "fused answer must contain (so every expert that wrote text counts)")

    @model_validator(mode="after")
    def _ranges(self) -> "FusionConfig":
        for name, low in (("max_words", 4), ("question_words", 1)):
            lo, hi = getattr(self, name)
            if not low <= lo <= hi:
                raise ValueError(f"{name} must be a range [low, high] with {low} <= low <= high, not {[lo, hi]}")
        return self


class ServeConfig(_Section):
    """Ray Serve: the router ingress and the autoscaled expert replicas."""
    host: str = Field("127.0.0.1", description="HTTP host of `imoe serve`")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of `imoe serve`")
    mode: Literal["basic", "fast", "optimized"] = Field(
        "basic", description="'fast': fast-path routing, top-1 expert; 'basic': full router, mixture when several "
                             "categories; 'optimized': also retrieval, compression and the summarizer when present")
    max_loaded_experts: int = Field(8, ge=1, description="adapters resident per replica (LRU); 1: one at a time")
    memory_budget_mb: float | None = Field(None, gt=0, description="bytes of model weights an expert replica may "
                                           "hold resident, in MB: the base, its adapters and whole-model experts "
                                           "(`imoe experts add-model`), which an LRU loads and evicts within it; "
                                           "None: no byte limit, one whole-model expert resident at a time")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling target per expert replica")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)
    expert_cpus: float = Field(1.0, ge=0, description="CPUs per expert replica")
    expert_gpus: float | None = Field(None, ge=0, description="GPUs per expert replica (fractions allowed); "
                                                              "default: 1 when the cluster has GPUs, else 0")
    router_cpus: float = Field(0.5, ge=0, description="CPUs of the router (ingress) replica")
    threads: int | None = Field(None, ge=1, description="torch threads per expert replica; default: its CPUs")
    max_batch_size: int = Field(16, ge=1, description="rows decoded together (an ensemble of k experts is k rows)")
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="how long arrivals wait for company before they "
                                        "join the decoding batch (later ones join at its next step anyway)")
    max_tokens: int = Field(64, ge=1, description="completion length when a request does not say")
    max_tokens_limit: int = Field(1024, ge=1, description="the largest max_tokens a request may ask for")
    top_k: int | None = Field(None, ge=1, description="experts of an ensemble request; default: experts.top_k")
    retry_s: float = Field(60.0, ge=0, description="how long a request is retried while a dead replica is replaced")
    request_timeout_s: float = Field(120.0, gt=0, description="HTTP request timeout of the Serve proxy")
    max_ongoing_requests: int = Field(64, ge=1, description="requests one expert replica works on at once")
    max_queued_requests: int = Field(256, ge=0, description="requests waiting for an expert replica; beyond it, and "
                                     "beyond max_ongoing + max_queued in the router, the client gets 429 at once")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest HTTP request body (413 beyond)")
    max_messages: int = Field(256, ge=1, description="most chat messages in one request")
    max_prompt_chars: int = Field(200_000, ge=1, description="longest prompt (all messages), in characters, "
                                  "refused before tokenisation")
    max_stop_chars: int = Field(256, ge=1, description="longest stop string")
    cross_talk: bool = Field(False, description="cross-talk: when two or more selected categories reach t_ct, their "
                             "experts draft a second time, each reading the others' first drafts, before the "
                             "summarizer fuses them (imoe_ray/fusion/crosstalk.py); a request's imoe.cross_talk overrides")
    t_ct: float = Field(0.3, gt=0, lt=1, description="t_CT: router probability a selected category needs to take "
                        "part in cross-talk")
    cross_talk_tokens: int = Field(64, ge=8, description="most tokens of the other experts' drafts in one "
                                   "second-round prompt (cross-talk)")
    clarify: bool = Field(False, description="answer with a clarifying question (imoe.clarification) when the "
                          "experts' drafts disagree or the router's top categories are nearly tied on a short query; "
                          "a request's imoe.clarify overrides it")
    clarify_divergence: float = Field(0.9, ge=0, le=1, description="drafts disagree when the mean pairwise "
                                      "Jensen-Shannon divergence (base 2, 0: same words, 1: no word shared) of their "
                                      "content words exceeds this, or when their directives contradict each other")
    clarify_tie_margin: float = Field(0.1, ge=0, le=1, description="the router's top two experts are nearly tied "
                                      "when their probabilities differ by at most this")
    clarify_query_words: int = Field(6, ge=1, description="a query of at most this many words is short (a near tie "
                                     "asks for clarification only on a short query)")


class RetrievalConfig(_Section):
    """Per-expert knowledge bases (LanceDB), prompt pre-compression and learning from answers."""
    search: Literal["hybrid", "vector", "text"] = Field("hybrid", description="hybrid: vector and full-text fused")
    k: int = Field(4, ge=1, description="passages retrieved per request")
    candidates: int = Field(20, ge=1, description="hits per list (vector, text) before fusion")
    fusion: Literal["score", "rrf"] = Field(
        "score", description="hybrid: 'score': weighted sum of max-normalised cosine and BM25; 'rrf': weighted reciprocal rank")
    vector_weight: float | None = Field(None, ge=0, le=1, description="weight of the vector list in hybrid fusion; "
                                        "null: the one calibrated at shard time (kb/fusion.json)")
    calibration_queries: int = Field(120, ge=0, description="query views that calibrate the fusion weight at shard time; 0: none")
    rrf_k: int = Field(60, ge=1, description="k of reciprocal-rank fusion, 1/(k + rank)")
    min_similarity: float = Field(0.2, ge=-1, le=1, description="relevance floor: cosine of passage and query")
    compressor: Literal["selective", "filler", "none"] = Field(
        "selective", description="'selective': drop the least surprising words under the base LM; 'filler': stop words only")
    compression_ratio: float = Field(2.5, ge=1, description="target prompt tokens before / after compression")
    min_compress_tokens: int = Field(48, ge=0, description="shorter prompts are not compressed")
    learn: bool = Field(True, description="append (question, answer) of `optimized` requests to the experts' tables")
    learn_max_chars: int = Field(4000, ge=16, description="longest learned row, in characters")
    learn_callers: list[str] | None = Field(
        None, description="callers whose answers may be learned (client addresses; API key names once keys exist); "
                          "null: every caller, []: none")
    learn_rows_per_caller_hour: int | None = Field(
        60, ge=0, description="most rows one caller may add to a table per hour; null: no cap")
    learn_max_rows: int | None = Field(10000, ge=0, description="most learned rows a table may hold; null: no cap")
    learn_batch_rows: int = Field(128, ge=1, description="learned rows written together (one LanceDB commit per table)")
    learn_flush_s: float = Field(5.0, gt=0, description="longest a learned row waits before its batch is written")


class MoeEncoderConfig(_Section):
    """`imoe train-encoder`: a sparse-MoE encoder upcycled from embedding.encoder, trained contrastively."""
    n_experts: int = Field(4, ge=2, description="E: expert FFNs per MoE layer")
    top_k: int = Field(1, ge=1, description="experts per token (gates: softmax over the chosen k)")
    every: int = Field(2, ge=1, description="every n-th encoder layer becomes MoE (1: all)")
    capacity_factor: float | None = Field(1.25, gt=0, description="expert capacity while training, x tokens*k/E; null: none")
    noise: float = Field(0.01, ge=0, description="noise added to the expert copies, as a fraction of each weight's std")
    aux_weight: float = Field(0.05, ge=0, description="weight of the load-balancing loss")
    loss: Literal["infonce", "triplet", "contrastive"] = Field("infonce", description="infonce: in-batch negatives")
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature")
    margin: float = Field(0.3, ge=0, description="margin of the triplet and contrastive losses")
    pairs: list[Literal["neighbours", "views"]] = Field(["views", "neighbours"], min_length=1,
                                                      description="mined pairs: query-like view of a chunk, next chunk of its document")
    batches: Literal["topic", "mixed", "random"] = Field(
        "topic", description="topic: each batch from one discovered category (hard in-batch negatives); mixed: "
        "every other batch; random when the store has no categories yet")
    steps: int | None = Field(None, ge=1, description="optimizer steps; null: by hardware (see `resolved`)")
    batch_size: int | None = Field(None, ge=2, description="pairs per step; null: by hardware")
    lr: float | None = Field(None, gt=0, description="learning rate; null: by hardware")
    router_lr: float = Field(1e-3, gt=0, description="learning rate of the routers (new weights)")
    max_tokens: int | None = Field(None, ge=8, description="truncation length while training; null: the length "
                                   "passages are encoded at (embedding.max_tokens)")
    utilisation_chunks: int = Field(256, ge=1, description="training chunks encoded after training to record expert utilisation")
    cpus: int | None = Field(None, ge=1, description="CPUs of the training worker; default: every CPU of the cluster")
    seed: int = 0

    # what a null steps / batch_size / lr becomes (CPU steps are slow: fewer of them)
    BY_HARDWARE: ClassVar[dict[str, dict[str, int | float]]] = {
        "gpu": {"steps": 200, "batch_size": 32, "lr": 3e-5},
        "cpu": {"steps": 50, "batch_size": 32, "lr": 1e-4},
    }

    def resolved(self, gpu: bool, passage_tokens: int) -> dict[str, Any]:
        """The settings as a plain dict, null steps / batch_size / lr filled in for a cluster with (`gpu`)
        or without GPUs and a null max_tokens with `passage_tokens`; resolved where training starts,
        recorded in the model's manifest. Training on the whole passage matters: a query view taken from
        a chunk's tail cannot match a positive truncated before it (`imoe eval encoder` measures it)."""
        settings = self.model_dump(mode="json")
        for name, value in self.BY_HARDWARE["gpu" if gpu else "cpu"].items():
            if settings[name] is None:
                settings[name] = value
        if settings["max_tokens"] is None:
            settings["max_tokens"] = passage_tokens
        return settings


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; None starts or joins a local one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a locally started Ray")
    include_dashboard: bool = False
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources every embedding "
                                        "actor, Train worker and expert replica also asks for, to place them on the "
                                        "nodes that offer them (e.g. {\"gpu_pool\": 1})")

    @field_validator("resources")
    @classmethod
    def _positive_resources(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in value.items() if not v > 0 or k in ("CPU", "GPU", "memory")]
        if bad:
            raise ValueError(f"ray.resources: {', '.join(bad)}: custom resources need a positive amount "
                             "(CPU, GPU and memory are set per stage)")
        return value


class JobsConfig(_Section):
    """The job queue (`/v1/jobs`): agents' jobs with priorities, preemption and durable records."""
    slots: int = Field(2, ge=1, description="jobs generating at once; a higher-priority job preempts when all are busy")
    step_tokens: int = Field(8, ge=1, description="tokens per generation step; jobs are preempted between steps")
    max_tokens: int = Field(64, ge=1, description="completion length when a job does not say")
    max_tokens_limit: int = Field(1024, ge=1, description="the largest max_tokens a job may ask for")
    max_priority: int = Field(100, ge=0, description="priorities run from 0 to this (higher runs first)")
    per_agent_limit: int = Field(0, ge=0, description="jobs one agent may have running at once; 0: no limit")
    max_queued: int = Field(10_000, ge=1, description="unfinished jobs the queue accepts")
    retention_s: float = Field(7 * 86400, gt=0, description="finished job records older than this are deleted at start")
    max_queued_per_key: int | None = Field(1000, ge=1, description="unfinished jobs one API key (or, without "
                                           "keys, one agent) may have; null: only max_queued applies")
    step_timeout_s: float = Field(300.0, gt=0, description="longest one generation step may take; beyond it the job fails")
    max_experts: int = Field(16, ge=1, description="most experts a job may name")


class PackagesConfig(_Section):
    """`.expert` packages: who is trusted, and what an archive may hold (`imoe experts install`)."""
    trusted_keys: list[str] = Field(default_factory=list,
                                    description="ed25519 public keys trusted to sign packages: hex, base64 or key file paths")
    allow_unsigned: bool = Field(False, description="install unsigned or untrusted packages (a bad signature is always refused)")
    max_member_bytes: int = Field(2 << 30, ge=1, description="largest file an archive may hold")
    max_members: int = Field(64, ge=2, description="most entries an archive may hold")
    max_total_bytes: int = Field(4 << 30, ge=1, description="largest total unpacked size")
    max_header_bytes: int = Field(4096, ge=512, description="largest extended tar header (GNU long name, pax records)")
    max_ratio: float = Field(100.0, ge=1, description="most an archive may expand when decompressed (times its size)")


class Config(_Section):
    store: str = Field("store", description="local directory or any URI pyarrow.fs opens (s3://, gs://, file://); "
                       "S3 reads AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION")
    cache_dir: str | None = Field(None, description="local cache of a URI store's models on each node (only a "
                                  "cache); default: ~/.cache/imoe-ray")
    corpus: CorpusConfig = CorpusConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    router: RouterConfig = RouterConfig()
    sharding: ShardingConfig = ShardingConfig()
    pretrain: PretrainConfig = PretrainConfig()
    experts: ExpertsConfig = ExpertsConfig()
    fusion: FusionConfig = FusionConfig()
    serve: ServeConfig = ServeConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    moe_encoder: MoeEncoderConfig = MoeEncoderConfig()
    ray: RayConfig = RayConfig()
    jobs: JobsConfig = JobsConfig()
    packages: PackagesConfig = PackagesConfig()

    def fields_hash(self, *names: str) -> str:
        """A short stable hash of the named sections or dotted fields ("corpus", "embedding.encoder"),
        used by stage manifests to tell whether a stage's settings changed."""
        payload = {}
        for name in names:
            value: Any = self
            for part in name.split("."):
                value = getattr(value, part)
            payload[name] = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self, comments: bool = False) -> str:
        """The settings as YAML; with `comments`, each field's description after it (`imoe config`)."""
        if not comments:
            return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        return "\n".join(_commented(self, indent=0)) + "\n"


def _commented(model: BaseModel, indent: int) -> list[str]:
    """YAML lines of a settings object: sections as blocks under their docstring, fields in flow style
    followed by their description."""
    lines, pad = [], " " * indent
    data = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip().splitlines()
            lines += ([f"{pad}# {doc[0]}"] if doc else []) + [f"{pad}{name}:"] + _commented(value, indent + 2)
            continue
        text = yaml.safe_dump(data[name], default_flow_style=True, width=10**6).strip()
        text = text.removesuffix("\n...").removesuffix("...").strip()
        lines.append(f"{pad}{name}: {text}" + (f"  # {field.description}" if field.description else ""))
    return lines


def _parse_scalar(text: str) -> Any:
    """Parse an override's value the way YAML would ('3' -> 3, 'null' -> None, 'a' -> 'a')."""
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` overrides to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        dotted, value = item.split("=", 1)
        keys = [k for k in dotted.strip().split(".") if k]
        if not keys:
            raise ConfigError(f"override {item!r} names no field")
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = _parse_scalar(value)
    return data


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown field (check the spelling)" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {msg}")
    return "invalid configuration:\n" + "\n".join(lines)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None, **fields: Any) -> Config:
    """Build the validated Config from a base mapping, an optional YAML file, CLI overrides and fields.

    Precedence, lowest first: defaults, `base` (e.g. the settings a store was built with), the YAML
    file, `overrides` ("section.field=value"), `fields` (keyword names with "__" for ".").
    """
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, not {type(loaded).__name__}")
        data = _merge(data, loaded)
    data = apply_overrides(data, list(overrides or []))
    explicit = [f"{k.replace('__', '.')}={json.dumps(v)}" for k, v in fields.items() if v is not None]
    data = apply_overrides(data, explicit)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


# Settings that older stores recorded and that no longer exist: dropped from a store's config.yaml
# (a user's YAML or --set naming them is still an error).
RETIRED_FIELDS = {"router": ("aux_weight",)}  # DACT's classifiers are fit by logistic regression now


def stored_settings(store: str) -> dict[str, Any]:
    """The settings a store was built with (`STORE/config.yaml`, local or on an object store), or {}."""
    from imoe_ray.store.store import Store, is_uri

    if not is_uri(store) and not (Path(store) / "config.yaml").is_file():
        return {}  # a store not built yet: nothing to read, and no directory to create
    s = Store(store, create=False)
    if not s.is_file("config.yaml"):
        return {}
    try:
        loaded = yaml.safe_load(s.read_bytes("config.yaml")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{s.uri_of('config.yaml')} is not valid YAML: {e}") from None
    return loaded if isinstance(loaded, dict) else {}


def store_config(store: str, path: str | Path | None = None, overrides: list[str] | None = None, **fields: Any) -> Config:
    """The configuration a command runs with on a store: the settings the store was built with
    (`STORE/config.yaml`), then the YAML file, the overrides and the fields."""
    base = stored_settings(store)
    for section, names in RETIRED_FIELDS.items():
        if isinstance(base.get(section), dict):
            base[section] = {k: v for k, v in base[section].items() if k not in names}
    return load_config(path, overrides, base=base, store=str(store), **fields)
