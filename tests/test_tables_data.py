"""The AutoTQA demo's data (demos/tables.py): the generated shop database, the read-only SQL executor, the
questions with reference answers and the answer comparison."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("demo_tables", REPO / "demos" / "tables.py")
assert _spec and _spec.loader
tables = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tables  # dataclasses look their module up while the class is built
_spec.loader.exec_module(tables)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One database for the tests that only read it (building one takes a fraction of a second)."""
    path = tmp_path_factory.mktemp("shop") / "shop.sqlite"
    tables.build_database(path, seed=0)
    return path


@pytest.fixture(scope="module")
def questions(shop: Path) -> list:
    return tables.make_questions(shop, seed=0, n=60)


def dump_hash(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        text = "\n".join(conn.iterdump())
    conn.close()
    return hashlib.sha256(text.encode()).hexdigest()


def scalar(path: Path, sql: str):
    with sqlite3.connect(path) as conn:
        value = conn.execute(sql).fetchone()[0]
    conn.close()
    return value


# --- the database -----------------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_database(tmp_path: Path) -> None:
    counts_a = tables.build_database(tmp_path / "a.sqlite", seed=3)
    counts_b = tables.build_database(tmp_path / "b.sqlite", seed=3)
    assert counts_a == counts_b
    assert dump_hash(tmp_path / "a.sqlite") == dump_hash(tmp_path / "b.sqlite")


def test_different_seeds_give_different_databases(tmp_path: Path) -> None:
    tables.build_database(tmp_path / "a.sqlite", seed=0)
    tables.build_database(tmp_path / "b.sqlite", seed=1)
    assert dump_hash(tmp_path / "a.sqlite") != dump_hash(tmp_path / "b.sqlite")


def test_row_counts_are_in_the_intended_ranges(tmp_path: Path) -> None:
    counts = tables.build_database(tmp_path / "shop.sqlite", seed=0)
    assert counts["regions"] == 8
    assert counts["customers"] == 800
    assert counts["products"] == 120
    assert counts["orders"] == 3000
    assert 6000 <= counts["order_items"] <= 8000
    for table, count in counts.items():  # the returned counts are what the file holds
        assert scalar(tmp_path / "shop.sqlite", f"SELECT COUNT(*) FROM {table}") == count


@pytest.mark.parametrize(
    "orphans",
    [
        "SELECT COUNT(*) FROM customers WHERE region_id NOT IN (SELECT region_id FROM regions)",
        "SELECT COUNT(*) FROM orders WHERE customer_id NOT IN (SELECT customer_id FROM customers)",
        "SELECT COUNT(*) FROM order_items WHERE order_id NOT IN (SELECT order_id FROM orders)",
        "SELECT COUNT(*) FROM order_items WHERE product_id NOT IN (SELECT product_id FROM products)",
    ],
)
def test_foreign_keys_hold(shop: Path, orphans: str) -> None:
    assert scalar(shop, orphans) == 0
    with sqlite3.connect(shop) as conn:
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    conn.close()


def test_values_are_in_their_domains(shop: Path) -> None:
    assert scalar(shop, "SELECT COUNT(*) FROM orders WHERE order_date NOT BETWEEN '2025-01-01' AND '2025-12-31'") == 0
    assert scalar(shop, "SELECT COUNT(*) FROM orders WHERE date(order_date) IS NOT order_date") == 0
    assert scalar(shop, "SELECT COUNT(*) FROM customers WHERE date(signup_date) IS NOT signup_date") == 0
    assert scalar(shop, "SELECT COUNT(DISTINCT category) FROM products") == 6
    assert scalar(shop, "SELECT COUNT(*) FROM order_items WHERE quantity < 1 OR unit_price <= 0") == 0
    assert scalar(shop, "SELECT COUNT(DISTINCT name) FROM customers") == 800  # a name picks one customer


def test_distributions_are_uneven(shop: Path) -> None:
    with sqlite3.connect(shop) as conn:
        per_region = [r[0] for r in conn.execute("SELECT COUNT(*) FROM customers GROUP BY region_id")]
        per_category = [r[0] for r in conn.execute("SELECT COUNT(*) FROM products GROUP BY category")]
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM orders GROUP BY status").fetchall())
    conn.close()
    assert max(per_region) > 2 * min(per_region)
    assert max(per_category) > 1.5 * min(per_category)
    assert statuses["completed"] > statuses["cancelled"] > 0 and statuses["returned"] > 0


def test_an_existing_file_is_kept_unless_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "shop.sqlite"
    path.write_text("not a database")
    with pytest.raises(FileExistsError):
        tables.build_database(path, seed=0)
    assert path.read_text() == "not a database"
    tables.build_database(path, seed=0, overwrite=True)
    assert scalar(path, "SELECT COUNT(*) FROM regions") == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop.sqlite"]  # no temporary file left behind


def test_schema_text_shows_tables_counts_and_examples(shop: Path) -> None:
    text = tables.schema_text(shop)
    for table in ("regions", "customers", "products", "orders", "order_items"):
        assert f"CREATE TABLE {table}" in text
    assert "FOREIGN KEY (customer_id) REFERENCES customers (customer_id)" in text
    assert "-- 800 rows" in text and "-- 3000 rows" in text
    assert "'Bavaria', 'Germany'" in text  # an example row of regions


# --- run_sql ----------------------------------------------------------------------------------------------------


def test_select_returns_columns_and_rows(shop: Path) -> None:
    result = tables.run_sql(shop, "SELECT name, country FROM regions WHERE region_id <= 2 ORDER BY region_id")
    assert result == {"ok": True, "columns": ["name", "country"], "rows": [["Bavaria", "Germany"],
                      ["Lombardy", "Italy"]], "truncated": False}


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO regions VALUES (99, 'Atlantis', 'Nowhere')",
        "UPDATE products SET price = 0",
        "DROP TABLE orders",
        "DELETE FROM customers",
        "WITH gone AS (SELECT 1) DELETE FROM customers",  # starts like a SELECT; the read-only file refuses it
    ],
)
def test_writes_are_refused_and_leave_the_file_unchanged(shop: Path, sql: str) -> None:
    before = shop.read_bytes()
    result = tables.run_sql(shop, sql)
    assert result["ok"] is False
    assert "SELECT" in result["error"]
    assert shop.read_bytes() == before


def test_two_statements_are_refused(shop: Path) -> None:
    result = tables.run_sql(shop, "SELECT 1; SELECT 2;")
    assert result == {"ok": False, "error": "found 2 statements; send exactly one SELECT statement"}


def test_a_semicolon_in_a_string_is_not_a_second_statement(shop: Path) -> None:
    result = tables.run_sql(shop, "SELECT 'a;b' AS s; -- the end")
    assert result["ok"] and result["rows"] == [["a;b"]]


def test_a_markdown_fenced_query_runs(shop: Path) -> None:
    reply = "Here is the query:\n```sql\nSELECT COUNT(*) AS n FROM regions;\n```\nIt counts the regions."
    result = tables.run_sql(shop, reply)
    assert result["ok"] and result["columns"] == ["n"] and result["rows"] == [[8]]


def test_a_result_over_the_row_cap_is_truncated(shop: Path) -> None:
    result = tables.run_sql(shop, "SELECT order_id FROM orders ORDER BY order_id", max_rows=7)
    assert result["truncated"] is True
    assert result["rows"] == [[i] for i in range(1, 8)]
    exact = tables.run_sql(shop, "SELECT order_id FROM orders WHERE order_id <= 7", max_rows=7)
    assert exact["truncated"] is False and len(exact["rows"]) == 7


def test_a_runaway_query_stops_at_the_time_limit(shop: Path) -> None:
    sql = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1000000000) "
           "SELECT COUNT(*) FROM c")
    result = tables.run_sql(shop, sql, timeout_s=0.5)
    assert result["ok"] is False
    assert result["error"].startswith("query ran longer than 0.5 s (its time limit)")


def test_no_such_column_lists_the_columns(shop: Path) -> None:
    result = tables.run_sql(shop, "SELECT price_usd FROM products")
    assert result == {"ok": False, "error": "no such column: price_usd "
                      "(columns of products: product_id, name, category, price)"}


def test_no_such_table_lists_the_tables(shop: Path) -> None:
    result = tables.run_sql(shop, "SELECT * FROM sales")
    assert result["ok"] is False
    assert result["error"] == "no such table: sales (tables: regions, customers, products, orders, order_items)"


def test_a_syntax_error_is_returned_not_raised(shop: Path) -> None:
    result = tables.run_sql(shop, "SELECT name FROM WHERE")
    assert result["ok"] is False and "syntax error" in result["error"]


def test_a_missing_database_raises_and_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.sqlite"):
        tables.run_sql(tmp_path / "missing.sqlite", "SELECT 1")
    assert not (tmp_path / "missing.sqlite").exists()


# --- questions --------------------------------------------------------------------------------------------------


def test_reference_sql_gives_the_stored_answer(shop: Path, questions: list) -> None:
    for q in questions:
        result = tables.run_sql(shop, q.sql)
        assert result["ok"], (q.id, result)
        assert result["rows"] == q.answer, q.id
        assert q.answer and all(row for row in q.answer), q.id


def test_scalar_answers_are_one_row_of_one_value(questions: list) -> None:
    for q in questions:
        assert len(q.answer) == 1 and len(q.answer[0]) == 1, q.id
        assert q.answer[0][0] not in (None, 0), q.id


def test_questions_cover_every_template_and_both_kinds(questions: list) -> None:
    assert len(questions) == 60
    assert [q.id for q in questions] == [f"Q{i:03d}" for i in range(1, 61)]
    assert {q.template for q in questions} == {t.name for t in tables.TEMPLATES}
    kinds = Counter(q.kind for q in questions)
    assert kinds == {"single": 30, "multi": 30}
    assert len({q.question for q in questions}) == 60  # no question asked twice


def test_kind_matches_the_tables_used(questions: list) -> None:
    for q in questions:
        assert (len(q.tables) == 1) == (q.kind == "single"), q.id
        for table in q.tables:
            assert table in q.sql, (q.id, table)


def test_answers_differ_between_entities(questions: list) -> None:
    # Uneven data: a query that ignores the region would give the same answer for every region.
    for template in ("customers_in_region", "completed_revenue_in_region", "customers_buying_category"):
        answers = [q.answer[0][0] for q in questions if q.template == template]
        assert len(answers) >= 2 and len(set(answers)) == len(answers), template


def test_questions_are_deterministic_for_a_seed(shop: Path, questions: list) -> None:
    again = tables.make_questions(shop, seed=0, n=60)
    assert [q.to_json() for q in again] == [q.to_json() for q in questions]
    other = tables.make_questions(shop, seed=1, n=60)
    assert [q.question for q in other] != [q.question for q in questions]


def test_question_json_round_trip(questions: list) -> None:
    for q in questions:
        back = tables.Question.from_json(json.loads(json.dumps(q.to_json())))
        assert back == q
        assert isinstance(back.tables, tuple)


def test_names_with_quotes_are_escaped_in_the_sql(shop: Path) -> None:
    name = tables.run_sql(shop, "SELECT name FROM customers WHERE name LIKE '%''%' LIMIT 1")["rows"][0][0]
    template = next(t for t in tables.TEMPLATES if t.name == "orders_of_customer")
    sql = template.sql.format(customer=tables._literal(name))
    result = tables.run_sql(shop, sql)
    assert result["ok"], result


# --- answers_match ----------------------------------------------------------------------------------------------


def test_floats_match_within_the_tolerance() -> None:
    assert tables.answers_match([[100.4]], [[100.0]], tol=0.01)
    assert not tables.answers_match([[102.0]], [[100.0]], tol=0.01)
    assert tables.answers_match([[165357.76]], [[165357.7600001]])


def test_integers_must_be_equal() -> None:
    assert tables.answers_match([[300]], [[300]])
    assert tables.answers_match([[300.0]], [[300]])
    assert not tables.answers_match([[301]], [[300]])


def test_row_order_is_ignored() -> None:
    assert tables.answers_match([["b", 2], ["a", 1]], [["a", 1], ["b", 2]])
    assert not tables.answers_match([["a", 2], ["b", 1]], [["a", 1], ["b", 2]])


def test_rows_are_a_multiset() -> None:
    assert not tables.answers_match([["a"], ["a"]], [["a"], ["b"]])
    assert not tables.answers_match([["a"]], [["a"], ["a"]])


def test_strings_are_compared_case_insensitively_and_stripped() -> None:
    assert tables.answers_match([["  Kitchen "]], [["kitchen"]])
    assert not tables.answers_match([["kitchen ware"]], [["kitchen"]])


def test_a_scalar_matches_a_one_value_answer() -> None:
    assert tables.answers_match([(42,)], [[42]])
    assert tables.answers_match(42, [[42]])
    assert tables.answers_match(["Luca Huber"], [["luca huber"]])
    assert tables.answers_match("42", [[42]])
    assert not tables.answers_match(43, [[42]])


def test_extra_columns_or_wrong_answers_do_not_match() -> None:
    assert not tables.answers_match([["Luca Huber", 1234.5]], [["Luca Huber"]])
    assert not tables.answers_match([["Emma Becker"]], [["Luca Huber"]])
    assert not tables.answers_match([], [[1]])
    assert not tables.answers_match([[None]], [[0]])


def test_reference_answers_match_themselves_and_not_each_other(questions: list) -> None:
    for q in questions:
        assert tables.answers_match(q.answer, q.answer), q.id
    revenue = [q for q in questions if q.template == "completed_revenue_in_region"]
    assert not tables.answers_match(revenue[0].answer, revenue[1].answer)


# --- the command line -------------------------------------------------------------------------------------------


def test_cli_writes_a_database_and_questions(tmp_path: Path) -> None:
    db, out = tmp_path / "shop.sqlite", tmp_path / "questions.jsonl"
    db.write_text("replaced by the CLI")
    proc = subprocess.run(
        [sys.executable, str(REPO / "demos" / "tables.py"), "--db", str(db), "--questions", str(out),
         "--seed", "0", "-n", "24"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "24 questions" in proc.stderr and proc.stdout == ""
    assert scalar(db, "SELECT COUNT(*) FROM orders") == 3000
    lines = out.read_text().splitlines()
    assert len(lines) == 24
    loaded = [tables.Question.from_json(json.loads(line)) for line in lines]
    assert {q.template for q in loaded} == {t.name for t in tables.TEMPLATES}
    for q in loaded[:5]:
        assert tables.run_sql(db, q.sql)["rows"] == q.answer
