"""The data sections of the tree: what preprocessing reads and writes (corpus, tokenizer, data) and how
training masks it (masking)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from kilm_ray.config.fields import ConfigError, check_min, check_range, doc


@dataclass
class CorpusConfig:
    mode: Literal["lead", "article"] = doc(
        "Text kept per article: the lead section (KILM) or the whole article minus reference sections.",
        default="lead",
    )
    knowledge_sources: list[str] = doc(
        "Knowledge sources tried in order for each link target: template ({{Short description}}), "
        "first_sentence (of the target's article in the dump), external (the --knowledge files).",
        default_factory=lambda: ["template", "first_sentence", "external"],
    )
    max_pages: int = doc("Stop after this many pages per read task (a dump file, or a byte range of a "
                          "multistream dump; 0 = all). For quick runs.", default=0)
    keep_truncated_input: bool = doc(
        "A dump file that ends early (a partial download) or does not decompress stops the run with one line naming "
        "the file and the byte. true: keep the pages read before that point instead, counted as truncated_input "
        "in the stats.", default=False)
    read_unit_mb: float = doc(
        "Compressed MiB per read task of a multistream dump (read through its -index.txt.bz2): the unit "
        "of parallel decompression.", default=64)
    redirect_rounds: int = doc(
        "Rounds of redirect-chain compression (one join each): chains of up to 2^N redirects are followed "
        "(Wikipedia bots fix double redirects, so 2 is plenty).", default=2)
    link_resolution: Literal["auto", "lookup", "distributed"] = doc(
        "How links meet their targets' redirects and knowledge. 'distributed': Ray Data group-bys "
        "(redirect chains, knowledge by entity, links back to pages); no process holds a table that grows "
        "with the corpus. 'lookup': the driver builds one table of redirects and descriptions that every "
        "chunking process holds: faster on small inputs (no shuffles), but 4-5 KB per page per process. "
        "'auto': lookup when the dumps and knowledge bases together are at most "
        "corpus.lookup_max_input_mb (compressed), else distributed. Both give identical samples.",
        default="auto")
    lookup_max_input_mb: float = doc(
        "With link_resolution auto: the largest input (dump + knowledge-base files, compressed MB) resolved "
        "by lookup; 64 MB of enwiki bz2 is about 60 k pages, ~300 MB of tables per process.", default=64)
    shuffle_partitions: int = doc(
        "Partitions of the group-bys that resolve links (0 = sized from the data: one per "
        "corpus.shuffle_partition_mb of stage input, at least the cluster's CPUs).", default=0)
    shuffle_partition_mb: float = doc(
        "With shuffle_partitions 0: MB of stage input (parquet) per partition. A reduce task holds one "
        "partition, so this bounds its memory whatever the corpus size.", default=32)
    pages_per_block: int = doc(
        "Pages per Ray Data block out of the dump reader: the unit of parallel parsing. Blocks under "
        "100 kB stay in the driver's memory while they wait for the writer (Ray keeps small task results "
        "with their owner): 64 lead-section pages made the driver grow ~1.4 KB per page.", default=256)
    valid_fraction: float = doc(
        "Fraction of articles held out of training for validation during training (and Tune).", default=0.05
    )
    test_fraction: float = doc(
        "Fraction of articles held out of training for the final evaluation (kilm-ray eval).", default=0.05
    )
    split_seed: int = doc("Seed of the article-level split (a keyed hash of the title).", default=0)
    max_description_chars: int = doc(
        "Descriptions longer than this are cut at a word boundary (first sentences can be long).",
        default=400,
    )
    task_resources: dict[str, float] = doc(
        "Extra Ray resources every preprocessing task asks for, e.g. {preprocess: 0.01} to keep them on "
        "the CPU nodes of cluster.yaml.",
        default_factory=dict,
    )
    kb_read_unit_mb: float = doc(
        "Compressed MiB per read task of a knowledge-base file (plain text, or .bz2 cut at its compressed "
        "blocks, e.g. Wikidata's dump); a .gz file is read whole by one task.", default=64)
    shared_paths: list[str] = doc(
        "Local directories mounted at the same path on every node (NFS, EFS, FSx). On a cluster of more "
        "than one node (or one that autoscales) preprocess refuses a local --out, --dump or --knowledge "
        "outside them: each node would use its own disk. s3:// needs no declaring.", default_factory=list)
    cluster_cpus: int = doc(
        "CPUs the shuffles are planned for (partitions >= CPUs): 0 = the autoscaler's configured maximum "
        "when the cluster has one (spot CPU nodes start at zero), else the CPUs present.", default=0)

    def validate(self, path: str) -> None:
        allowed = {"template", "first_sentence", "external"}
        bad = [s for s in self.knowledge_sources if s not in allowed]
        if bad or not self.knowledge_sources:
            raise ConfigError(
                f"{path}.knowledge_sources: {bad or '[]'} not allowed; choose from {sorted(allowed)}"
            )
        check_range(f"{path}.valid_fraction", self.valid_fraction, 0.0, 0.9)
        check_range(f"{path}.test_fraction", self.test_fraction, 0.0, 0.9)
        if self.valid_fraction + self.test_fraction > 0.9:
            raise ConfigError(f"{path}.valid_fraction + {path}.test_fraction: must leave 10% of articles to train on")
        check_min(f"{path}.max_pages", self.max_pages, 0)
        check_min(f"{path}.pages_per_block", self.pages_per_block, 1)
        check_range(f"{path}.read_unit_mb", self.read_unit_mb, 0.0, 1e6, low_open=True)
        check_range(f"{path}.redirect_rounds", self.redirect_rounds, 0, 6)
        check_min(f"{path}.shuffle_partitions", self.shuffle_partitions, 0)
        check_range(f"{path}.shuffle_partition_mb", self.shuffle_partition_mb, 0.0, 1e6, low_open=True)
        check_min(f"{path}.lookup_max_input_mb", self.lookup_max_input_mb, 0)
        check_min(f"{path}.max_description_chars", self.max_description_chars, 16)
        check_range(f"{path}.kb_read_unit_mb", self.kb_read_unit_mb, 0.0, 1e6, low_open=True)
        check_min(f"{path}.cluster_cpus", self.cluster_cpus, 0)
        for i, shared in enumerate(self.shared_paths):
            if "://" in shared or not shared.startswith(("/", "~")):
                raise ConfigError(f"{path}.shared_paths[{i}]: {shared!r} must be an absolute local directory "
                                  "(object stores such as s3:// are shared already)")


@dataclass
class TokenizerConfig:
    source: str = doc(
        "Where the tokenizer comes from: 'train' (a byte-level BPE trained on the corpus), "
        "'gpt2-bpe:DIR' (encoder.json + vocab.bpe), or a local directory / hub id such as "
        "facebook/bart-base. The five KILM tokens are always added.",
        default="train", path="local_or_hub",
    )
    vocab_size: int = doc("Vocabulary size when source=train.", default=8000)
    add_prefix_space: Optional[bool] = doc(
        "Tokenize a word at the start of a paragraph as after a space. null = as the official KILM code: "
        "true for a pretrained BART tokenizer (a hub id, a directory, gpt2-bpe:DIR), so that a mention "
        "opening a paragraph has the tokens of its ' Title' knowledge; false for one trained here.",
        default=None)
    train_max_paragraphs: int = doc("Paragraphs sampled to train the BPE (source=train).", default=200_000)

    def validate(self, path: str) -> None:
        check_min(f"{path}.vocab_size", self.vocab_size, 300)
        check_min(f"{path}.train_max_paragraphs", self.train_max_paragraphs, 1)


@dataclass
class DataConfig:
    max_source_tokens: int = doc(
        "Longest encoder input (special tokens included); text is chunked to fit it with a knowledge slot.",
        default=512,
    )
    max_knowledge_tokens: int = doc(
        "Longest 'Title<sep>description' knowledge string; target length = source + this.", default=128
    )
    min_chunk_tokens: int = doc("Chunks shorter than this are dropped.", default=8)
    max_eval_entities: int = doc("Evaluation: samples per chunk, one per entity (the first N).", default=10)
    title_as_mentioned: bool = doc(
        "Spell a mention's knowledge title with a lower-case first letter when the mention has one "
        "([[vowel]] -> 'vowel<sep>...'; Wikipedia titles ignore the first letter's case, exact match too). "
        "For small models from scratch: copying a title is then copying tokens. False = page titles.",
        default=False)
    train_min_mentions: int = doc(
        "Training chunks with fewer linked entities (with knowledge) are not written: 1 trains on the "
        "chunks that carry knowledge only (3.4x fewer chunks on the excerpt's whole articles), so a fixed "
        "budget sees each entity more often. 0 keeps all text.", default=0)

    def validate(self, path: str) -> None:
        check_min(f"{path}.max_source_tokens", self.max_source_tokens, 32)
        check_min(f"{path}.max_knowledge_tokens", self.max_knowledge_tokens, 4)
        check_min(f"{path}.min_chunk_tokens", self.min_chunk_tokens, 1)
        check_min(f"{path}.max_eval_entities", self.max_eval_entities, 1)
        check_min(f"{path}.train_min_mentions", self.train_min_mentions, 0)

    @property
    def max_text_tokens(self) -> int:
        # <s> </s> around the text, <ent> </ent> around the mention, <ent_desc> <mask> </ent_desc>.
        return self.max_source_tokens - 7


@dataclass
class MaskingConfig:
    mask_ratio: float = doc(
        "BART text infilling: fraction of non-special source tokens masked (budget = ceil(ratio * n)).",
        default=0.3,
    )
    poisson_lambda: float = doc("Mean of the Poisson distribution of masked span lengths.", default=3.0)
    knowledge_prob: float = doc(
        "Probability that a training chunk with linked entities gets a knowledge slot (one entity, its "
        "knowledge masked). 1.0 = KILM; 0.0 = plain BART text infilling (the baseline).",
        default=1.0,
    )
    knowledge_loss_weight: float = doc(
        "Weight of knowledge tokens (inside <ent_desc>...</ent_desc>) in the token-averaged loss.",
        default=1.0,
    )
    entities_per_chunk: int = doc(
        "Linked entities (with knowledge) marked in a chunk that gets knowledge, at most; chosen uniformly "
        "without replacement per (seed, epoch, sample). 1 = the paper; more puts every link of a short "
        "chunk to work each epoch (the model's positions grow by max_knowledge_tokens + 4 per extra one).",
        default=1,
    )
    knowledge_slot: bool = doc(
        "True = KILM: each marked entity gets <ent_desc>knowledge</ent_desc>, masked in the source. False = "
        "the fair baseline: the same entities are marked <ent>mention</ent>, with no knowledge slot, so "
        "only the knowledge objective differs.",
        default=True,
    )
    knowledge_as_text: bool = doc(
        "With knowledge_slot false: each marked entity's knowledge follows its mention as a plain-text "
        "appositive ('mention, Title: description,'; no markup), and BART text infilling runs on that text. "
        "The data-matched baseline: KILM's knowledge, BART's objective; probed by infilling 'mention, <mask>,'.",
        default=False,
    )

    def validate(self, path: str) -> None:
        if self.knowledge_as_text and self.knowledge_slot:
            raise ConfigError(f"{path}.knowledge_as_text: needs {path}.knowledge_slot=false (knowledge goes either "
                              "into the slot or into the text)")
        check_range(f"{path}.mask_ratio", self.mask_ratio, 0.0, 0.95)
        check_range(f"{path}.poisson_lambda", self.poisson_lambda, 0.0, 64.0, low_open=True)
        check_range(f"{path}.knowledge_prob", self.knowledge_prob, 0.0, 1.0)
        check_range(f"{path}.knowledge_loss_weight", self.knowledge_loss_weight, 0.0, 100.0)
        check_range(f"{path}.entities_per_chunk", self.entities_per_chunk, 1, 64)
