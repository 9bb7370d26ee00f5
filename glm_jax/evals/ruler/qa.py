"""RULER's QA tasks (scripts/data/synthetic/qa.py): a question of SQuAD v2 (qa_1) or HotpotQA (qa_2)
with its gold paragraphs among distractor documents, as many as the length holds, each
`Document {i}:\\n{text}`. The files are the user's (`--qa-data`), nothing is downloaded: SQuAD's
dev-v2.0.json (an object with "data") or HotpotQA's hotpot_dev_distractor_v1.json (a list)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np

from glm_jax.evals.ruler.build import Draw, Rendered
from glm_jax.evals.ruler.tasks import QA_PREFIX, QA_TEMPLATE

DOCUMENT = "Document {i}:\n{document}"


@dataclasses.dataclass(frozen=True)
class Question:
    query: str
    outputs: tuple[str, ...]
    gold: tuple[int, ...]          # its documents
    related: tuple[int, ...] = ()  # SQuAD: the other paragraphs of its article (first distractors)


@dataclasses.dataclass(frozen=True, eq=False)
class QAData:
    dataset: str                   # "squad" or "hotpotqa"
    path: str
    sha256: str
    questions: tuple[Question, ...]
    documents: tuple[str, ...]


def _squad(data: dict) -> tuple[list[Question], list[str]]:
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    questions = []
    for d in data["data"]:
        article = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            own = index[p["context"]]
            for qa in p["qas"]:
                if not qa.get("is_impossible", False) and qa["answers"]:
                    questions.append(Question(qa["question"], tuple(a["text"] for a in qa["answers"]), (own,),
                                              tuple(i for i in article if i != own)))
    return questions, docs


def _hotpotqa(data: list) -> tuple[list[Question], list[str]]:
    def text(title, sentences):
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({text(t, p) for d in data for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    questions = [Question(d["question"], (d["answer"],), tuple(index[text(t, p)] for t, p in d["context"]))
                 for d in data]
    return questions, docs


def load_qa(path: pathlib.Path) -> QAData:
    """A SQuAD v2 or HotpotQA file, told apart by its shape."""
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except OSError as e:
        raise ValueError(f"--qa-data: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"--qa-data: {path} is not JSON ({e})") from None
    try:
        if isinstance(data, dict) and "data" in data:
            dataset, (questions, docs) = "squad", _squad(data)
        elif isinstance(data, list):
            dataset, (questions, docs) = "hotpotqa", _hotpotqa(data)
        else:
            raise ValueError("neither SQuAD (an object with 'data') nor HotpotQA (a list)")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--qa-data: {path} is not a SQuAD v2 or HotpotQA file ({e})") from None
    if not questions:
        raise ValueError(f"--qa-data: {path} holds no answerable question")
    return QAData(dataset, str(path), hashlib.sha256(raw).hexdigest(), tuple(questions), tuple(docs))


def draw(data: QAData, sample: int, rng: np.random.Generator) -> Draw:
    """Sample i asks the file's question i (RULER's order); distractors: the question's related
    paragraphs, then the other documents in a seeded order (repeated past the file's end)."""
    q = data.questions[sample % len(data.questions)]
    taken = set(q.gold) | set(q.related)
    others = [i for i in rng.permutation(len(data.documents)).tolist() if i not in taken]
    order = list(q.gold) + list(q.related) + others
    seed = int(rng.integers(2 ** 63))

    def render(n: int) -> Rendered:
        chosen = [order[i % len(order)] for i in range(n)]
        chosen = [chosen[i] for i in np.random.default_rng(seed).permutation(n)]
        context = "\n\n".join(DOCUMENT.format(i=i + 1, document=data.documents[d]) for i, d in enumerate(chosen))
        return Rendered(QA_TEMPLATE.format(context=context, query=q.query), QA_PREFIX, q.outputs)

    return Draw(render, minimum=len(q.gold))
