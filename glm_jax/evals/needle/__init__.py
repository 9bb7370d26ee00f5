"""`glm-jax needle`: needle in a haystack (LWM's protocol) in GLM-4's own chat format.

Every prompt is one user turn of the chat template, generation prompt included:

    [gMASK]<sop><|user|>
    {haystack sentences, with the needle(s) `The special magic {city} number is: {number}.` among them}

    What is the special magic {city} number? {instruction}<|assistant|>

- `context_length` counts the whole prompt in the model's tokens. The haystack is the most sentences,
  from the sample's offset on, that keep the prompt within it: found by encoding the real prompt
  (a token-count estimate, then a search over whole sentences), so it is exact, never over, and one
  more sentence would be over.
- A needle at depth d sits at the sentence boundary nearest to d% of the haystack's tokens (0: before
  the first sentence, 100: after the last). `--multi-needle K` puts K needles (different cities) at
  depths d, d + 100/K, d + 200/K, ... (those over 100 wrap round to d - 100 + ...: evenly spread,
  one of them at the cell's depth d) and asks for each in turn: K prompts, K result lines.
- Greedy decoding, `max_new_tokens` at most; a response is correct when it contains the number
  (a substring, as LWM scores).
- Samples repeat a cell with other cities, numbers and haystack offsets, all drawn from a generator
  seeded by (seed, length, depth, sample): a cell's prompts do not depend on the rest of the grid.

OUT gets config.json (the arguments the results depend on: a rerun with the same ones resumes,
other ones are refused unless forced), results.jsonl (a line per cell, sample and question, appended
as each finishes), summary.json and heatmap.png.
"""

from glm_jax.evals.needle.haystack import FILLER, FILLER_NAME, Haystack, load_haystack
from glm_jax.evals.common import parse_lengths, prompt_ids
from glm_jax.evals.needle.plan import CITIES, Case, parse_depths, plan_cases
from glm_jax.evals.needle.prompt import INSTRUCTION, NEEDLE, QUESTION, Needle, Prompt, build_prompt
from glm_jax.evals.needle.results import format_summary, is_correct
from glm_jax.evals.needle.runner import NeedleConfig, run

__all__ = ["CITIES", "FILLER", "FILLER_NAME", "INSTRUCTION", "NEEDLE", "QUESTION", "Case", "Haystack", "Needle",
           "NeedleConfig", "Prompt", "build_prompt", "format_summary", "is_correct", "load_haystack", "parse_depths",
           "parse_lengths", "plan_cases", "prompt_ids", "run"]
