"""Batch pipeline exported from autotqa.ipynb by `parrot-nb export`.

Each record is a JSON object whose fields are the arguments of run(question: str).
Run it over a JSONL file of records, one application per record:

    parrot-nb run THIS_FILE.py --inputs records.jsonl --output results.jsonl
"""

import parrot_nb
import parrot_nb.pipeline as _pipeline
from parrot_nb import SemanticFunction

# ── cell 1 (markdown)
# # AutoTQA: questions about tables, answered by a team of agents
#
# After AutoTQA (multi-agent tabular question answering). Four agents answer a question about a shop's
# SQLite database:
#
# - the **planner** names the tables the question needs;
# - the **engineer** writes one SQLite query, shown solved questions like this one (retrieved from a log of
#   past questions by a native step) and the plan;
# - the **executor** runs the query: a native step on the server, read-only (`mode=ro`), with a time
#   limit and a row cap;
# - the **critic** judges the result and, if it says *revise*, sends it back with a sentence of feedback:
#   the engineer writes a new query, at most `max_rounds` times in all.
#
# The loop is ordinary Python around semantic calls. Within a round nothing waits for the notebook: the
# engineer starts when the plan is done, the executor when the query is, the critic when the result is.
# The notebook waits at the end of each round, for the result and the verdict. `answer(..., one_at_a_time=True)` runs the same
# agents the request-centric way (each call waited for before the next is sent) for comparison:
# `benchmarks/autotqa_app.py` measures both.
#
# The data is generated (`tables.py`, beside this notebook): regions, customers, products, orders and
# order items, a few thousand rows, and questions with reference SQL and answers.
#
# Made for export too: the cell tagged `parameters` holds the pipeline's parameters, `run(question)` is
# the work for one record, and the cells tagged `notebook-only` are left out.
#
# ```bash
# parrot-nb export demos/autotqa.ipynb -o /tmp/autotqa.py
# python demos/tables.py --db /tmp/shop.sqlite --questions /tmp/questions.jsonl -n 60
# parrot-nb run /tmp/autotqa.py --inputs /tmp/questions.jsonl --output /tmp/answers.jsonl --model smollm2
# ```

# ── cell 2: parameters; `parrot-nb run --param NAME=VALUE` overrides them
seed = 0  # the database and the held-out questions; the log of solved questions uses seed + 1
max_rounds = 3  # engineer -> executor -> critic rounds, at most
row_cap = 20  # rows the executor returns, at most
sql_timeout_s = 2.0  # the executor's time limit per query
examples = 3  # solved questions shown to the engineer (0: none)
globals().update(_pipeline.parameters(seed=seed, max_rounds=max_rounds, row_cap=row_cap, sql_timeout_s=sql_timeout_s, examples=examples))

# ── cell 3
_pipeline.start(model='smollm2')  # %parrot start

# ── cell 4 (markdown)
# ## The database, and a log of solved questions
#
# The engineer learns the schema from `schema_text` (CREATE TABLE statements, row counts, two example
# rows per table). A log of past questions with their SQL (other questions than the held-out ones) gives
# it examples.

# ── cell 5
import re
import tempfile
from pathlib import Path

import parrot_nb
import tables

workdir = tempfile.TemporaryDirectory(prefix="autotqa-")  # removed when the kernel exits
db_path = str(Path(workdir.name) / "shop.sqlite")
rows = tables.build_database(db_path, seed=seed)
schema = tables.schema_text(db_path)
solved = [{"question": q.question, "sql": " ".join(q.sql.split())} for q in tables.make_questions(db_path, seed=seed + 1, n=48)]
print(", ".join(f"{n} {table}" for table, n in rows.items()), f"| {len(solved)} solved questions in the log")

# ── cell 6 (markdown)
# ## The agents
#
# The engineer's output is constrained to the shape of one SQL statement (a regular expression: `SELECT`
# or `WITH`, the characters of SQL, a closing `;`), so every answer at least parses as one statement.

# ── cell 7
TABLES = "(regions|customers|products|orders|order_items)"
PLAN = f"Tables: {TABLES}(, {TABLES}){{0,4}}"
SQL = r"(SELECT|WITH) [A-Za-z0-9_().,*'= <>+/%-]{3,600};"

# ── cell 8: %%semantic plan --temperature 0
plan = SemanticFunction.from_template(
    'plan',
    """\
{{input:schema}}

Question: {{input:question}}
Which tables does a query that answers it read?
{{output:plan regex=PLAN max_tokens=32}}""",
    temperature=0.0,
    namespace=globals(),
)

# ── cell 9: %%semantic write_sql --temperature 0
write_sql = SemanticFunction.from_template(
    'write_sql',
    """\
{{input:schema}}

-- Solved questions like this one:

{{input:examples}}

-- {{input:plan}}
Question: {{input:question}}
SQL: {{output:sql regex=SQL max_tokens=200}}""",
    temperature=0.0,
    namespace=globals(),
)

# ── cell 10: %%semantic revise_sql --temperature 0
revise_sql = SemanticFunction.from_template(
    'revise_sql',
    """\
{{input:schema}}

-- Solved questions like this one:

{{input:examples}}

-- {{input:plan}}
Question: {{input:question}}
SQL: {{input:previous}}
-- Result: {{input:result}}
-- Reviewer: {{input:feedback}}
-- A corrected query:
SQL: {{output:sql regex=SQL max_tokens=200}}""",
    temperature=0.0,
    namespace=globals(),
)

# ── cell 11: %%semantic critique --chat --temperature 0
critique = SemanticFunction.from_template(
    'critique',
    """\
{{role:system}}You review the answers of a team that queries a shop's SQLite database.
{{role:user}}Question: {{input:question}}
SQL: {{input:sql}}
Result: {{input:result}}
Does this result answer the question? Reply accept or revise.{{output:verdict choices="accept|revise"}}In one sentence, what should the query do differently?{{output:feedback max_tokens=40}}""",
    chat=True,
    temperature=0.0,
)

# ── cell 12
@parrot_nb.native
def similar_examples(question: str, solved: list, k: int) -> str:
    """The k solved questions that share the most words with this one, most similar last (nearest the question)."""
    words = lambda text: set(re.findall(r"[a-z]+", text.lower()))
    asked = words(question)
    scored = sorted(
        (len(asked & words(s["question"])) / len(asked | words(s["question"])), s["question"], s["sql"])
        for s in solved if s["question"] != question
    )
    return "\n\n".join(f"Question: {q}\nSQL: {sql};" for _, q, sql in scored[len(scored) - k:]) if k else "(none)"


@parrot_nb.native(timeout=sql_timeout_s + 10)
def execute(sql: str, db_path: str, timeout_s: float, max_rows: int) -> dict:
    """Run the engineer's query read-only, under a time limit and a row cap; failures come back as {"ok": false, "error": ...}."""
    return tables.run_sql(db_path, sql, timeout_s=timeout_s, max_rows=max_rows)

# ── cell 13
def answer(question: str, one_at_a_time: bool = False) -> dict:
    """Plan, write, execute and critique, at most `max_rounds` rounds; the last round's query and result.

    With `one_at_a_time`, each call's value is waited for before the next call is sent, as a
    request-centric client does: the same agents, the same prompts, one request at a time.
    """
    step = (lambda v: v.get()) if one_at_a_time else (lambda v: v)
    shown = step(similar_examples(question=question, solved=solved, k=examples))
    the_plan = step(plan(schema=schema, question=question))
    sql = step(write_sql(schema=schema, examples=shown, plan=the_plan, question=question))
    for attempt in range(1, max_rounds + 1):
        result = step(execute(sql=sql, db_path=db_path, timeout_s=sql_timeout_s, max_rows=row_cap))
        review = critique(question=question, sql=sql, result=result)
        outcome = result.get() if not one_at_a_time else result
        if (review.verdict.get() == "accept" and outcome["ok"] and outcome["rows"]) or attempt == max_rounds:
            break
        feedback = outcome["error"] if not outcome["ok"] else step(review.feedback)
        sql = step(revise_sql(schema=schema, examples=shown, plan=the_plan, question=question, previous=sql,
                              result=result, feedback=feedback))  # fmt: skip
    return {"sql": sql, "result": result, "rounds": attempt, "verdict": review.verdict}


def run(question: str):
    """The work for one record: a question in, its query, result and number of rounds out."""
    return answer(question)

# ── cell 14 (markdown)
# ## Try it on a few held-out questions
#
# Questions from another seed than the log's, scored by execution accuracy (the result's rows against the
# reference query's). This cell and the next are tagged `notebook-only`.

# ── cell 15: tagged 'notebook-only', left out

# ── cell 16: tagged 'notebook-only', left out

# ── cell 17
_pipeline.show_status()  # %parrot status

# ── cell 18
_pipeline.stop()  # %parrot stop
