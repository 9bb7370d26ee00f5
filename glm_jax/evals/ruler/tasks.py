"""RULER's tasks (NVIDIA/RULER, scripts/synthetic.yaml): each one's generator, its arguments, the
template and answer prefix of its kind (scripts/data/synthetic/constants.py), the tokens it may
generate and its metric (scripts/eval/synthetic/constants.py)."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
VT_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above "
                "list?")
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_TEMPLATE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
               "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}")
QA_PREFIX = " Answer:"

# kind: (tokens to generate, metric)
KINDS = {"niah": (128, "string_match_all"), "variable_tracking": (30, "string_match_all"),
         "common_words_extraction": (120, "string_match_all"), "freq_words_extraction": (50, "string_match_all"),
         "qa": (32, "string_match_part")}


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str
    args: dict[str, Any]

    @property
    def tokens_to_generate(self) -> int:
        return KINDS[self.kind][0]

    @property
    def metric(self) -> str:
        return KINDS[self.kind][1]

    @property
    def needs_essay(self) -> bool:
        return self.args.get("type_haystack") == "essay"

    @property
    def seed_key(self) -> int:
        """The task's part of each sample's seed (stable across runs and Python versions)."""
        return zlib.crc32(self.name.encode())


def _niah(haystack: str, k: str, v: str, num_k: int = 1, num_v: int = 1, num_q: int = 1) -> dict:
    return {"type_haystack": haystack, "type_needle_k": k, "type_needle_v": v, "num_needle_k": max(num_k, num_q),
            "num_needle_v": num_v, "num_needle_q": num_q}


TASKS = {t.name: t for t in (
    Task("niah_single_1", "niah", _niah("noise", "words", "numbers")),
    Task("niah_single_2", "niah", _niah("essay", "words", "numbers")),
    Task("niah_single_3", "niah", _niah("essay", "words", "uuids")),
    Task("niah_multikey_1", "niah", _niah("essay", "words", "numbers", num_k=4)),
    Task("niah_multikey_2", "niah", _niah("needle", "words", "numbers")),
    Task("niah_multikey_3", "niah", _niah("needle", "uuids", "uuids")),
    Task("niah_multivalue", "niah", _niah("essay", "words", "numbers", num_v=4)),
    Task("niah_multiquery", "niah", _niah("essay", "words", "numbers", num_q=4)),
    Task("vt", "variable_tracking", {"type_haystack": "noise", "num_chains": 1, "num_hops": 4}),
    Task("cwe", "common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    Task("fwe", "freq_words_extraction", {"alpha": 2.0}),
    Task("qa_1", "qa", {"dataset": "squad"}),
    Task("qa_2", "qa", {"dataset": "hotpotqa"}),
)}
SYNTHETIC = tuple(name for name, t in TASKS.items() if t.kind != "qa")
QA_TASKS = tuple(name for name, t in TASKS.items() if t.kind == "qa")


def parse_tasks(text: str | None, qa_datasets: dict[str, object]) -> list[str]:
    """--tasks a,b,... (RULER's order kept) or, without it, every synthetic task and the QA tasks whose
    data is given. A QA task without its file is refused."""
    if text is None:
        names = list(SYNTHETIC) + [n for n in QA_TASKS if TASKS[n].args["dataset"] in qa_datasets]
    else:
        names = [p.strip() for p in text.split(",") if p.strip()]
        if not names:
            raise ValueError("--tasks is empty")
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    missing = [n for n in names if TASKS[n].kind == "qa" and TASKS[n].args["dataset"] not in qa_datasets]
    if missing:
        need = {"squad": "SQuAD v2 (dev-v2.0.json)", "hotpotqa": "HotpotQA (hotpot_dev_distractor_v1.json)"}
        raise ValueError(f"task {missing[0]} needs --qa-data with {need[TASKS[missing[0]].args['dataset']]}")
    order = list(TASKS)
    return sorted(set(names), key=order.index)
