"""The evaluation sections: the held-out evaluation (eval) and the demo's knowledge line (demo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from kilm_ray.config.fields import ConfigError, check_min, check_range, doc


@dataclass
class EvalConfig:
    split: Literal["test", "valid"] = doc(
        "The held-out split evaluated (articles never trained on). valid is what training validated on.",
        default="test")
    test_looks_before: int = doc(
        "Earlier looks at this dataset's test articles this evaluation knows of (the test ledger, "
        "<out>/test_looks.jsonl, counts every look by any model or rule). 0 = a first look: a test evaluation "
        "is refused unless the ledger holds exactly this many, so a second look is a choice stated on the "
        "command line. A comparison of N models declares 0 .. N-1.", default=0)
    test_ledger: Optional[str] = doc(
        "Where looks at test are counted: default <out>/test_looks.jsonl beside the dataset's manifest; one file "
        "(local or s3://) that several output directories of the same dump share counts their looks together.",
        default=None)
    max_samples: int = doc(
        "Held-out mentions every mention probe runs on: a seeded random sample across the split's articles "
        "(the smallest keyed hashes of sample id and entity; eval.seed). 0 = all.", default=500)
    train_recall_samples: int = doc(
        "Training mentions whose knowledge is generated too (a seeded sample): recall of training samples, "
        "reported as such (not held out). 0 = skip.", default=256)
    max_sense_items: int = doc(
        "WordNet usage examples in the word-sense probe (a seeded sample; 0 = all).", default=400)
    batch_size: int = doc("Sequences per generation / scoring batch.", default=16)
    num_beams: int = doc("Beams for description generation.", default=1)
    max_new_tokens: int = doc("Longest generated knowledge string.", default=48)
    title_candidates: Literal["generated", "generated_or_mention"] = doc(
        "Describe's title (slot-trained models): generated = the decoded title; generated_or_mention = the likelier, "
        "under the model (summed log-probability of title and <sep>), of the decoded title and the mention as "
        "written, the description then decoded after it. A small model's commonest title error is a misspelled "
        "copy of the mention; its own score picks the spelling. Reports also give the decoded titles' figure. "
        "Greedy decoding only. Evaluation only: the service's describe decodes titles (generated), so a figure "
        "measured with generated_or_mention is not what the served model answers (the report says which).",
        default="generated")
    no_repeat_ngram_size: int = doc(
        "Greedy decoding of slot-trained models: no n-gram repeated within one answer (the prompt is not counted; "
        "a text-form answer copies the right context, so it is left alone). 0 = off.", default=0)
    max_disambiguation_mentions: int = doc(
        "Sampled mentions with an ambiguous anchor text scored in anchor disambiguation (0 = all).", default=500)
    max_candidates: int = doc("Candidates per mention in disambiguation.", default=8)
    retention_max_chunks: int = doc(
        "Held-out chunks (a seeded sample) for the text-infilling (retention) loss; as many training chunks "
        "give the training-text loss. 0 = every held-out chunk.", default=200)
    qa_file: Optional[str] = doc(
        "Questions for zero-shot QA, .gz or not: Google's NQ-open JSONL ({question, answer: [...]} lines), DPR's "
        "TSV (question<TAB>['answer', ...], read as CSV), question<TAB>answer[<TAB>answer...], or a JSON list of "
        "{question, answer(s)} objects / [question, answers] pairs. Unreadable rows and questions holding a "
        "control token are skipped and counted.",
        default=None, path="local")
    qa_shots: int = doc(
        "Few-shot QA as the paper evaluates it: exemplars (question, first answer) from eval.qa_exemplar_file "
        "before each question (the paper: 1, 2, 5, 10). 0 = zero-shot.", default=0)
    qa_exemplars: Literal["tfidf", "random"] = doc(
        "How exemplars are chosen: tfidf = the training questions most similar to the question asked (TF-IDF "
        "over word unigrams and bigrams); random = one draw seeded by eval.seed, the same for every question.",
        default="tfidf")
    qa_exemplar_file: Optional[str] = doc(
        "The training questions exemplars come from, in any format eval.qa_file reads (the train split of the "
        "dataset asked: NQ-open train for NQ, TriviaQA's train JSON for TriviaQA, ...). Needed when "
        "eval.qa_shots > 0.", default=None, path="local")
    qa_prompt: int = doc(
        "The QA prompt variant (the official code's --method): 1 'Question: q? Answer: a', 2 'Question: q? "
        "Answer:a', 3 'Q: q? A: a', 4 'Q: q? A:a' (the space after the trigger changes the answer's first "
        "token).", default=2)
    appos_file: Optional[str] = doc(
        "ApposCorpus for the appositive generation task (the paper's): a test.jsonl, or the corpus root with "
        "eval.appos_subset. The slot stands where the gold appositive does; scored by token F1 and ROUGE-L "
        "against it.", default=None, path="local")
    appos_subset: str = doc(
        "With eval.appos_file a corpus root: wiki_org, wiki_per, news_org or news_per (its test.jsonl).",
        default="")
    appos_max_items: int = doc("ApposCorpus rows probed (a seeded sample; 0 = all).", default=0)
    seed: int = doc("Seed of the samples (mentions, chunks, word senses) and of the retention test's masks.",
                     default=1234)
    actors: int = doc("Probe actors (each holds the model) in the evaluation's Ray Data stages.", default=1)
    cpus_per_actor: float = doc("CPUs per probe actor (also its torch threads, rounded).", default=1.0)
    gpus_per_actor: float = doc("GPUs per probe actor: > 0 runs the probes on GPU workers (cuda).", default=0.0)

    def validate(self, path: str) -> None:
        for name in ("batch_size", "num_beams", "max_new_tokens", "max_candidates", "actors"):
            check_min(f"{path}.{name}", getattr(self, name), 1)
        check_min(f"{path}.no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        if self.num_beams > 1 and (self.no_repeat_ngram_size or self.title_candidates != "generated"):
            key = "no_repeat_ngram_size" if self.no_repeat_ngram_size else "title_candidates"
            raise ConfigError(f"{path}.{key} applies to greedy decoding; {path}.num_beams is {self.num_beams}")
        check_range(f"{path}.qa_prompt", self.qa_prompt, 1, 4)
        check_range(f"{path}.qa_shots", self.qa_shots, 0, 64)
        if self.qa_shots and not self.qa_exemplar_file:
            raise ConfigError(f"{path}.qa_shots is {self.qa_shots}: set {path}.qa_exemplar_file to the training "
                              "questions the exemplars come from")
        check_range(f"{path}.cpus_per_actor", self.cpus_per_actor, 0.0, 1024.0, low_open=True)
        check_range(f"{path}.gpus_per_actor", self.gpus_per_actor, 0.0, 64.0)
        for name in ("test_looks_before", "appos_max_items", "max_samples", "max_disambiguation_mentions", "retention_max_chunks", "train_recall_samples",
                     "max_sense_items"):
            check_min(f"{path}.{name}", getattr(self, name), 0)


@dataclass
class DemoConfig:
    split: Literal["test", "valid"] = doc(
        "The held-out split of the demo's knowledge line and examples.", default="test")
    min_train_mentions: int = doc(
        "The demo's rule, fixed before training: mentions in held-out articles of entities whose knowledge is in "
        "at least this many training mentions (all of them, in the seeded order of eval.seed).", default=2)
    examples: int = doc("Describe probes the demo sends over HTTP (the first mentions of the same rule).",
                         default=5)

    def validate(self, path: str) -> None:
        check_min(f"{path}.min_train_mentions", self.min_train_mentions, 1)
        check_min(f"{path}.examples", self.examples, 0)
