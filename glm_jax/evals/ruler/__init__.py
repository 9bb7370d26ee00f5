"""`glm-jax ruler`: RULER's synthetic tasks (NVIDIA/RULER, arXiv 2404.06654) in GLM-4's chat format.

Tasks (scripts/synthetic.yaml): niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue,
niah_multiquery (needles `One of the special magic numbers for {key} is: {value}.` in noise lines,
essay text or other needles), vt (variable tracking), cwe (common words), fwe (frequent coded
words); qa_1 (SQuAD v2) and qa_2 (HotpotQA) from the user's files.

- Each prompt is one user turn (RULER's template for the task), then the answer prefix opening the
  assistant's turn; with the model's tokenizer, the prompt plus the task's generation budget (128
  NIAH, 30 VT, 120 CWE, 50 FWE, 32 QA tokens) is at most the length, with the most haystack that
  allows (exact: the real prompt is encoded).
- Every (task, length, sample) draws from a generator seeded by (seed, task, length, sample).
- Greedy answers, many rows per engine call; scored as RULER scores: string_match_all (the share of
  reference strings in the response, case-insensitive) for the synthetic tasks, string_match_part
  (any of them) for QA.

OUT gets config.json (a rerun with the same arguments resumes, other ones are refused unless
forced), results.jsonl (a line per sample: task, length, sample, prompt_tokens, answers, response,
score, depths, seconds: its share of its batch's engine time), summary.json (task x length, the average per length,
RULER's weighted averages and effective length) and heatmap.png.
"""

from glm_jax.evals.ruler.plan import Inputs, make_sample
from glm_jax.evals.ruler.results import format_summary
from glm_jax.evals.ruler.runner import RulerConfig, run
from glm_jax.evals.ruler.scoring import string_match_all, string_match_part
from glm_jax.evals.ruler.tasks import SYNTHETIC, TASKS, parse_tasks

__all__ = ["Inputs", "RulerConfig", "SYNTHETIC", "TASKS", "format_summary", "make_sample", "parse_tasks", "run",
           "string_match_all", "string_match_part"]
