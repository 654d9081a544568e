"""Batch pipeline exported from summarize_documents.ipynb by `parrot-nb export`.

Each record is a JSON object whose fields are the arguments of run(document: str).
Run it over a JSONL file of records, one application per record:

    parrot-nb run THIS_FILE.py --inputs records.jsonl --output results.jsonl
"""

import parrot_nb
import parrot_nb.pipeline as _pipeline
from parrot_nb import SemanticFunction

# ── cell 1 (markdown)
# # Summarise documents: a notebook made for export
#
# Map-reduce over one document: split it into three parts, summarise each part (the map calls run
# batched), then combine the three summaries into a short summary and a title (the reduce call starts
# on the server as soon as the last part is done).
#
# Written for `parrot-nb export`, which turns it into a batch pipeline:
#
# - the cell tagged `parameters` holds the pipeline's parameters (`parrot-nb run --param audience=...`);
# - `def run(document)` is the work for one record: a record is a JSON object whose fields are its
#   arguments, and it returns the semantic variables to write;
# - cells tagged `notebook-only` (trying it on a few records here) are left out of the pipeline.
#
# ```bash
# parrot-nb export demos/summarize_documents.ipynb -o demos/summarize_documents.py
# python demos/make_documents.py -n 200 -o /tmp/documents.jsonl
# parrot-nb run demos/summarize_documents.py --inputs /tmp/documents.jsonl --output /tmp/summaries.jsonl --concurrency 16
# ```

# ── cell 2: parameters; `parrot-nb run --param NAME=VALUE` overrides them
audience = "a busy executive"
globals().update(_pipeline.parameters(audience=audience))

# ── cell 3
_pipeline.start(model='smollm2')  # %parrot start

# ── cell 4: %%semantic summarize_part --chat --max-tokens 16 --temperature 0
summarize_part = SemanticFunction.from_template(
    'summarize_part',
    """\
{{role:system}}You are a concise analyst.
{{role:user}}Summarize this passage in one short sentence:
{{input:passage}}{{output:summary}}""",
    chat=True,
    max_tokens=16,
    temperature=0.0,
)

# ── cell 5: %%semantic combine --chat --max-tokens 24 --temperature 0
combine = SemanticFunction.from_template(
    'combine',
    """\
{{role:system}}You are a concise analyst.
{{role:user}}Write a two-sentence summary for {{input:audience}} from these notes:
1. {{input:s1}}
2. {{input:s2}}
3. {{input:s3}}{{output:summary}}Now give it a title of at most six words.{{output:title max_tokens=8}}""",
    chat=True,
    max_tokens=24,
    temperature=0.0,
)

# ── cell 6
import re


def split(document: str, parts: int = 3) -> list[str]:
    """Cut a document into `parts` runs of whole sentences, of about equal length."""
    sentences = re.split(r"(?<=[.!?])\s+", document.strip())
    size, extra = divmod(len(sentences), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(" ".join(sentences[start:end]))
        start = end
    return out


def run(document: str):
    """The work for one record: summarise three parts, then combine them into a summary and a title."""
    p1, p2, p3 = split(document)
    s1, s2, s3 = (summarize_part(passage=p) for p in (p1, p2, p3))
    return combine(audience=audience, s1=s1, s2=s2, s3=s3)

# ── cell 7 (markdown)
# ## Try it on the first records
#
# `run` returns variables at once; `.get()` waits for them. This cell is tagged `notebook-only`: the
# pipeline does not run it.

# ── cell 8: tagged 'notebook-only', left out

# ── cell 9: tagged 'notebook-only', left out

# ── cell 10
_pipeline.stop()  # %parrot stop
