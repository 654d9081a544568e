"""A made-up shop database and questions with known answers, the data of the AutoTQA demo.

    python demos/tables.py --db shop.sqlite --questions questions.jsonl --seed 0 -n 60

AutoTQA answers questions about tables with several agents: a planner, an engineer that writes SQL, an executor
that runs it and a critic that judges the answer and sends it back. The demo needs a database with a few related
tables, a safe way to run whatever SQL a model writes, and questions whose answers are known, so that a run can be
scored the way text-to-SQL benchmarks score one (execution accuracy). This module provides all three, from the
standard library alone and without downloading anything:

- `build_database` writes a seeded SQLite database: regions, customers, products, orders and order items, with
  uneven distributions so that different regions and categories give different answers;
- `schema_text` is what the engineer is shown: the CREATE TABLE statements, row counts and example rows;
- `run_sql` runs one SELECT on a read-only connection under a time limit and a row cap, and turns every failure
  into a message that says what to change;
- `make_questions` instantiates question templates with entities drawn from the data, with reference SQL and
  answers; `answers_match` compares a result with a reference answer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# The data. Weights are deliberately uneven: with equal weights every region would have about the same answer and
# a query that filters on the wrong region could still look right.

# (name, country, share of customers)
REGIONS: list[tuple[str, str, float]] = [
    ("Bavaria", "Germany", 0.22),
    ("Lombardy", "Italy", 0.17),
    ("Catalonia", "Spain", 0.15),
    ("Scotland", "United Kingdom", 0.12),
    ("Brittany", "France", 0.10),
    ("Saxony", "Germany", 0.09),
    ("Flanders", "Belgium", 0.08),
    ("Tyrol", "Austria", 0.07),
]

# category -> (share of products, lowest and highest list price, product nouns)
CATEGORIES: dict[str, tuple[float, tuple[float, float], list[str]]] = {
    "electronics": (0.24, (19.0, 900.0), [
        "Headphones", "Smartwatch", "Tablet", "Bluetooth Speaker", "E-Reader", "Webcam", "Monitor", "Keyboard",
        "Power Bank", "Router", "Action Camera", "Drone",
    ]),
    "books": (0.22, (6.0, 45.0), [
        "Cookbook", "Novel", "Atlas", "Field Guide", "Poetry Collection", "Biography", "Thriller", "Travel Guide",
        "Dictionary", "Comic Anthology", "History of Europe", "Puzzle Book",
    ]),
    "kitchen": (0.16, (6.0, 320.0), [
        "Blender", "Chef's Knife", "Frying Pan", "Espresso Machine", "Toaster", "Cutting Board", "Kettle",
        "Stand Mixer", "Dutch Oven", "Salad Spinner",
    ]),
    "toys": (0.14, (5.0, 90.0), [
        "Building Blocks", "Puzzle", "Plush Bear", "Model Train", "Board Game", "Kite", "Doll House", "Toy Car",
        "Marble Run", "Water Pistol",
    ]),
    "sports": (0.13, (9.0, 420.0), [
        "Yoga Mat", "Tennis Racket", "Running Shoes", "Football", "Dumbbell Set", "Bike Helmet", "Climbing Rope",
        "Ski Goggles", "Jump Rope", "Camping Tent",
    ]),
    "garden": (0.11, (7.0, 260.0), [
        "Hose", "Pruning Shears", "Lawn Mower", "Watering Can", "Seed Kit", "Planter", "Rake", "Bird Feeder",
        "Wheelbarrow", "Garden Gloves",
    ]),
}

BRANDS = ["Nordline", "Alpenhaus", "Vela", "Koru", "Brightwood", "Castello", "Duna", "Ferro", "Lumo", "Marisol",
          "Oakridge", "Pavo", "Quill", "Sorrento", "Tidewater", "Zephyr"]

FIRST_NAMES = [
    "Anna", "Ben", "Carla", "David", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Klara", "Luca", "Marie",
    "Noah", "Olivia", "Paul", "Quentin", "Rosa", "Sven", "Tara", "Ugo", "Vera", "Wim", "Xenia", "Yusuf", "Zoe",
    "Amelie", "Bruno", "Chiara", "Diego", "Emma", "Finn", "Giulia", "Henrik", "Isla", "Jan", "Lea", "Mateo",
    "Nina", "Oscar", "Pia", "Rafael", "Sofia", "Tom", "Valentina", "Yann",
]
LAST_NAMES = [
    "Müller", "Schmidt", "Rossi", "Bianchi", "Garcia", "Martinez", "Campbell", "MacLeod", "Le Gall", "Moreau",
    "Peeters", "Janssens", "Huber", "Wagner", "Fischer", "Romano", "Ferrari", "Puig", "Serra", "Stewart",
    "O'Neill", "Bernard", "Dubois", "Weber", "Hofer", "Colombo", "Lopez", "Ross", "Maes", "Becker", "Klein",
    "Costa", "Vidal", "Murray", "Leroy", "Pichler", "Wolf", "Greco", "Ortega", "Fraser",
]
EMAIL_DOMAINS = ["example.com", "mail.example", "post.example", "inbox.example"]

SEGMENTS = {"consumer": 0.78, "business": 0.22}
STATUSES = {"completed": 0.84, "cancelled": 0.09, "returned": 0.07}
# More orders towards the end of the year, as in retail.
MONTH_WEIGHTS = [0.07, 0.06, 0.07, 0.075, 0.08, 0.075, 0.07, 0.075, 0.08, 0.085, 0.11, 0.14]
ITEMS_PER_ORDER = {1: 0.30, 2: 0.30, 3: 0.20, 4: 0.12, 5: 0.08}
QUANTITY = {1: 0.55, 2: 0.22, 3: 0.12, 4: 0.07, 5: 0.04}
DISCOUNTS = {1.0: 0.83, 0.9: 0.12, 0.8: 0.05}

N_CUSTOMERS = 800
N_PRODUCTS = 120
N_ORDERS = 3000
YEAR = 2025

SCHEMA = """
CREATE TABLE regions (
    region_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    country TEXT NOT NULL
);
CREATE TABLE customers (
    customer_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE,
    region_id INTEGER NOT NULL,
    signup_date TEXT NOT NULL, -- ISO date, YYYY-MM-DD
    segment TEXT NOT NULL CHECK (segment IN ('consumer', 'business')),
    FOREIGN KEY (region_id) REFERENCES regions (region_id)
);
CREATE TABLE products (
    product_id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    category TEXT NOT NULL, -- books, electronics, garden, kitchen, sports or toys
    price REAL NOT NULL -- list price in euros
);
CREATE TABLE orders (
    order_id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL,
    order_date TEXT NOT NULL, -- ISO date, YYYY-MM-DD
    status TEXT NOT NULL CHECK (status IN ('completed', 'cancelled', 'returned')),
    FOREIGN KEY (customer_id) REFERENCES customers (customer_id)
);
CREATE TABLE order_items (
    order_id INTEGER NOT NULL,
    product_id INTEGER NOT NULL,
    quantity INTEGER NOT NULL,
    unit_price REAL NOT NULL, -- price actually paid per unit, after any discount
    PRIMARY KEY (order_id, product_id),
    FOREIGN KEY (order_id) REFERENCES orders (order_id),
    FOREIGN KEY (product_id) REFERENCES products (product_id)
);
CREATE INDEX orders_by_customer ON orders (customer_id);
CREATE INDEX order_items_by_product ON order_items (product_id);
"""


def _pick(rng: random.Random, weights: dict[Any, float]) -> Any:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _random_date(rng: random.Random, start: date, end: date) -> date:
    """A day in [start, end)."""
    return start + timedelta(days=rng.randrange((end - start).days))


def _generate(seed: int) -> dict[str, list[tuple]]:
    """Every table's rows, from one seeded generator so that a seed always gives the same database."""
    rng = random.Random(seed)
    regions = [(i, name, country) for i, (name, country, _) in enumerate(REGIONS, start=1)]
    region_weights = [share for _, _, share in REGIONS]

    # Each region leans towards some categories, so "the top category in region R" differs between regions.
    affinity = {(region_id, cat): rng.lognormvariate(0.0, 0.9) for region_id, *_ in regions for cat in CATEGORIES}

    # Customers: unique names (a question names a customer, so a name must pick one), ids in signup order.
    names = rng.sample([f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES], N_CUSTOMERS)
    signups = sorted(_random_date(rng, date(YEAR - 3, 1, 1), date(YEAR, 1, 1)) for _ in range(N_CUSTOMERS))
    customers = []
    for customer_id, (name, signup) in enumerate(zip(names, signups), start=1):
        local = re.sub(r"[^a-z.]", "", name.lower().replace(" ", ".").replace("ü", "ue"))
        email = f"{local}@{rng.choice(EMAIL_DOMAINS)}"
        region_id = rng.choices(range(1, len(regions) + 1), weights=region_weights)[0]
        customers.append((customer_id, name, email, region_id, signup.isoformat(), _pick(rng, SEGMENTS)))

    # Products: category sizes and price ranges differ; prices are log-uniform within a category's range.
    categories = rng.choices(list(CATEGORIES), weights=[c[0] for c in CATEGORIES.values()], k=N_PRODUCTS)
    products, taken = [], set()
    for product_id, category in enumerate(categories, start=1):
        _, (low, high), nouns = CATEGORIES[category]
        name = f"{rng.choice(BRANDS)} {rng.choice(nouns)}"
        while name in taken:
            name = f"{rng.choice(BRANDS)} {rng.choice(nouns)}"
        taken.add(name)
        price = round(math.exp(rng.uniform(math.log(low), math.log(high))), 2)
        products.append((product_id, name, category, price))
    # Cheaper products sell more often; a few products are simply popular.
    popularity = [rng.lognormvariate(0.0, 0.8) / price**0.3 for *_, price in products]

    # Orders: a few customers order often (heavy-tailed activity, higher for businesses); ids in date order.
    activity = [rng.paretovariate(1.6) * (2.5 if c[5] == "business" else 1.0) for c in customers]
    buyers = rng.choices([c[0] for c in customers], weights=activity, k=N_ORDERS)
    months = rng.choices(range(1, 13), weights=MONTH_WEIGHTS, k=N_ORDERS)
    days = []
    for month in months:
        start = date(YEAR, month, 1)
        end = date(YEAR + 1, 1, 1) if month == 12 else date(YEAR, month + 1, 1)
        days.append(_random_date(rng, start, end))
    placed = sorted(zip(days, buyers))
    orders = [(i, buyer, day.isoformat(), _pick(rng, STATUSES)) for i, (day, buyer) in enumerate(placed, start=1)]

    region_of = {c[0]: c[3] for c in customers}
    items = []
    for order_id, customer_id, _, _ in orders:
        region_id = region_of[customer_id]
        weights = [pop * affinity[region_id, p[2]] for pop, p in zip(popularity, products)]
        chosen: list[tuple] = []
        for _ in range(_pick(rng, ITEMS_PER_ORDER)):
            product = rng.choices(products, weights=weights)[0]
            if product not in chosen:  # one line per product; a repeat pick just makes a shorter order
                chosen.append(product)
        for product_id, _, _, price in sorted(chosen):
            unit_price = round(price * _pick(rng, DISCOUNTS), 2)
            items.append((order_id, product_id, _pick(rng, QUANTITY), unit_price))

    return {"regions": regions, "customers": customers, "products": products, "orders": orders,
            "order_items": items}


def build_database(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> dict[str, int]:
    """Write the shop database to `path` and return the number of rows of each table.

    The same seed always gives the same rows. The database is written to a temporary file next to `path` and
    renamed into place, so a reader never sees a half-written database and a failed build leaves nothing behind.
    An existing file is kept unless `overwrite` is true: it may be a database someone edited by hand.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    tables = _generate(seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        with closing(sqlite3.connect(tmp)) as conn:
            conn.execute("PRAGMA foreign_keys = ON")  # the generator's ids are checked as they are inserted
            conn.executescript(SCHEMA)
            with conn:
                for table, rows in tables.items():
                    marks = ", ".join("?" * len(rows[0]))
                    conn.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {table: len(rows) for table, rows in tables.items()}


# ---------------------------------------------------------------------------------------------------------------
# Reading the database.


def _connect_read_only(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A connection that cannot write: SQLite itself refuses, whatever SQL it is given.

    A plain `sqlite3.connect` would also create an empty database for a mistyped path, hiding the mistake, so a
    missing file is an error here.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no database file at {file}")
    conn = sqlite3.connect(file.resolve().as_uri() + "?mode=ro", uri=True)
    conn.execute("PRAGMA query_only = ON")
    return conn


def _tables(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({_quote_identifier(table)})")]


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def schema_text(path: str | os.PathLike[str]) -> str:
    """The schema as the engineer agent is shown it: each table's CREATE TABLE statement, its row count and two
    example rows. The examples show the formats (ISO dates, lower-case categories) that a WHERE clause must use."""
    with closing(_connect_read_only(path)) as conn:
        parts = []
        for table, sql in conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY rowid"):
            name = _quote_identifier(table)
            count = conn.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]
            examples = conn.execute(f"SELECT * FROM {name} LIMIT 2").fetchall()
            lines = [f"{sql};", f"-- {count} rows; for example ({', '.join(_columns(conn, table))}):"]
            lines += [f"--   {tuple(row)!r}" for row in examples]
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Running model-written SQL.

# One fenced block, as chat models write it: ```sql ... ``` (the language tag is optional).
_FENCE = re.compile(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)```", re.S)
# String literals and quoted names are matched so that a "--" inside a string is not taken for a comment.
_STRINGS_AND_COMMENTS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?(?:\*/|$)", re.S)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


class _Refused(Exception):
    """SQL that `run_sql` will not run; the message says why and what to send instead."""


def _without_comments(sql: str) -> str:
    return _STRINGS_AND_COMMENTS.sub(lambda m: " " if m.group().startswith(("--", "/*")) else m.group(), sql)


def _unfence(text: str) -> str:
    blocks = _FENCE.findall(text)
    if len(blocks) > 1:
        raise _Refused(f"found {len(blocks)} fenced code blocks; send exactly one SQL query")
    if blocks:
        return blocks[0]
    text = text.strip()
    if text.startswith("```"):  # a fence on one line, or one left unclosed
        text = re.sub(r"^```[ \t]*(?:sqlite|sql)?", "", text, flags=re.I).removesuffix("```")
    return text


def _single_statement(text: str) -> str:
    """The one SELECT in `text`, without fences or a trailing semicolon; `_Refused` for anything else.

    Statements are split where SQLite itself would see one end (`sqlite3.complete_statement`), so a semicolon
    inside a string or a comment does not count.
    """
    statements, current = [], ""
    for char in _unfence(text):
        current += char
        if char == ";" and sqlite3.complete_statement(current):
            statements.append(current)
            current = ""
    statements.append(current)
    statements = [s for s in statements if _without_comments(s).strip(" \t\r\n;")]
    if not statements:
        raise _Refused("the query is empty; send one SELECT statement")
    if len(statements) > 1:
        raise _Refused(f"found {len(statements)} statements; send exactly one SELECT statement")
    statement = statements[0].strip()
    while statement.endswith(";"):
        statement = statement[:-1].rstrip()
    first = re.match(r"\s*(\w+)", _without_comments(statement))
    keyword = first.group(1).upper() if first else statement[:20]
    if keyword not in ("SELECT", "WITH"):
        raise _Refused(f"only a SELECT query (or WITH ... SELECT) may run, not {keyword}: the database is read-only")
    return statement


def _explain_error(conn: sqlite3.Connection, message: str, sql: str) -> str:
    """Add to SQLite's message what the model needs to fix the query: the tables or columns that do exist."""
    tables = _tables(conn)
    if message.startswith("no such table"):
        return f"{message} (tables: {', '.join(tables)})"
    if message.startswith("no such column"):
        name = message.split(":", 1)[1].strip()
        qualifier = name.rsplit(".", 1)[0].strip('"`[]').lower() if "." in name else ""
        words = {w.lower() for w in re.findall(r"\w+", _without_comments(sql))}
        named = [t for t in tables if t.lower() == qualifier] or [t for t in tables if t.lower() in words] or tables
        listing = "; ".join(f"columns of {t}: {', '.join(_columns(conn, t))}" for t in named)
        return f"{message} ({listing})"
    if message.startswith("ambiguous column name"):
        return f"{message} (more than one joined table has this column: write it as table.column or alias.column)"
    if "readonly database" in message:
        return f"{message} (only SELECT queries may run)"
    return message


def _plain(value: Any) -> Any:
    """A value that JSON can carry; SQLite blobs become hex text."""
    return value.hex() if isinstance(value, (bytes, bytearray, memoryview)) else value


def run_sql(db_path: str | os.PathLike[str], sql: str, *, timeout_s: float = 2.0, max_rows: int = 50) -> dict:
    """Run one model-written SELECT on the database and return its result or what went wrong.

    Returns {"ok": True, "columns": [...], "rows": [[...], ...], "truncated": bool} with at most `max_rows` rows
    (`truncated` says whether there were more), or {"ok": False, "error": "..."}. Bad SQL never raises: the error
    goes back to the model, which can fix its query. Only a missing database file raises (FileNotFoundError),
    since no query can fix that.

    Three limits keep a bad query harmless: the connection is read-only (so even a write that slips past the
    SELECT check fails), the query is interrupted after `timeout_s` seconds, and at most `max_rows` + 1 rows are
    fetched, so a result of millions of rows is neither held in memory nor pasted into a prompt.
    """
    with closing(_connect_read_only(db_path)) as conn:
        try:
            statement = _single_statement(sql)
        except _Refused as refused:
            return {"ok": False, "error": str(refused)}
        deadline = time.monotonic() + timeout_s
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        try:
            cursor = conn.execute(statement)
            rows = cursor.fetchmany(max_rows + 1)
        except sqlite3.OperationalError as error:
            conn.set_progress_handler(None, 0)  # now, not in `finally`: the explanation runs queries of its own
            if str(error) == "interrupted":
                return {"ok": False, "error": f"query ran longer than {float(timeout_s)} s (its time limit); make it "
                        "cheaper: filter before joining, join on keys, and avoid cross joins and unbounded recursion"}
            return {"ok": False, "error": _explain_error(conn, str(error), statement)}
        except (sqlite3.Error, sqlite3.Warning, ValueError) as error:
            return {"ok": False, "error": f"{error}"}
        finally:
            conn.set_progress_handler(None, 0)
        columns = [d[0] for d in cursor.description or ()]
        return {
            "ok": True,
            "columns": columns,
            "rows": [[_plain(v) for v in row] for row in rows[:max_rows]],
            "truncated": len(rows) > max_rows,
        }


# ---------------------------------------------------------------------------------------------------------------
# Questions.


@dataclass
class Question:
    """One question with its reference SQL and the rows that SQL returns."""

    id: str  # "Q001", ...
    question: str
    sql: str
    answer: list[list]
    tables: tuple[str, ...]  # the tables the reference SQL reads
    kind: str  # "single" (one table) or "multi" (joins)
    template: str = ""  # the template it was made from, so results can be broken down by question type

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "sql": self.sql, "answer": self.answer,
                "tables": list(self.tables), "kind": self.kind, "template": self.template}

    @classmethod
    def from_json(cls, d: dict) -> Question:
        return cls(id=d["id"], question=d["question"], sql=d["sql"], answer=[list(r) for r in d["answer"]],
                   tables=tuple(d["tables"]), kind=d["kind"], template=d.get("template", ""))


Params = dict[str, str]


@dataclass(frozen=True)
class Template:
    """A question pattern. `question` and `sql` are format strings over the same parameters; in `sql` each
    parameter is substituted as a quoted SQL string literal. `tie_sql`, for "which one is the top" questions,
    returns the two best scores: a question whose top two tie has no single right answer and is skipped."""

    name: str
    kind: str
    tables: tuple[str, ...]
    question: str
    sql: str
    candidates: Callable[[sqlite3.Connection], list[Params]]
    tie_sql: str = ""


def _values(conn: sqlite3.Connection, key: str, sql: str) -> list[Params]:
    return [{key: row[0]} for row in conn.execute(sql)]


def _segment_years(conn: sqlite3.Connection) -> list[Params]:
    years = [r[0] for r in conn.execute("SELECT DISTINCT substr(signup_date, 1, 4) FROM customers ORDER BY 1")]
    segments = [r[0] for r in conn.execute("SELECT DISTINCT segment FROM customers ORDER BY 1")]
    return [{"segment": s, "year": y, "start": f"{y}-01-01", "end": f"{int(y) + 1}-01-01"}
            for s in segments for y in years]


def _status_months(conn: sqlite3.Connection) -> list[Params]:
    statuses = [r[0] for r in conn.execute("SELECT DISTINCT status FROM orders ORDER BY 1")]
    months = []
    for m in range(1, 13):
        start, end = date(YEAR, m, 1), (date(YEAR + 1, 1, 1) if m == 12 else date(YEAR, m + 1, 1))
        months.append({"month": start.strftime("%B"), "start": start.isoformat(), "end": end.isoformat()})
    return [{"status": s, **m} for s in statuses for m in months]


_CATEGORIES_SQL = "SELECT DISTINCT category FROM products ORDER BY 1"
_REGIONS_SQL = "SELECT name FROM regions ORDER BY region_id"
_COMPLETED_IN_REGION = """FROM order_items oi
JOIN orders o ON o.order_id = oi.order_id
JOIN customers c ON c.customer_id = o.customer_id
JOIN regions r ON r.region_id = c.region_id"""

TEMPLATES: list[Template] = [
    Template(
        "customers_by_segment_year", "single", ("customers",),
        "How many {segment} customers signed up in {year}?",
        "SELECT COUNT(*) FROM customers WHERE segment = {segment} AND signup_date >= {start} AND signup_date < {end}",
        _segment_years,
    ),
    Template(
        "products_in_category", "single", ("products",),
        "How many products are in the {category} category?",
        "SELECT COUNT(*) FROM products WHERE category = {category}",
        lambda conn: _values(conn, "category", _CATEGORIES_SQL),
    ),
    Template(
        "most_expensive_in_category", "single", ("products",),
        "What is the most expensive product in the {category} category?",
        "SELECT name FROM products WHERE category = {category} ORDER BY price DESC, name LIMIT 1",
        lambda conn: _values(conn, "category", _CATEGORIES_SQL),
        tie_sql="SELECT price FROM products WHERE category = {category} ORDER BY price DESC LIMIT 2",
    ),
    Template(
        "orders_by_status_month", "single", ("orders",),
        "How many orders placed in {month} 2025 have the status {status}?",
        "SELECT COUNT(*) FROM orders WHERE status = {status} AND order_date >= {start} AND order_date < {end}",
        _status_months,
    ),
    Template(
        "average_price_in_category", "single", ("products",),
        "What is the average price of the products in the {category} category, rounded to two decimals?",
        "SELECT ROUND(AVG(price), 2) FROM products WHERE category = {category}",
        lambda conn: _values(conn, "category", _CATEGORIES_SQL),
    ),
    Template(
        "product_price", "single", ("products",),
        "What is the list price of the {product}?",
        "SELECT price FROM products WHERE name = {product}",
        lambda conn: _values(conn, "product", "SELECT name FROM products ORDER BY product_id"),
    ),
    Template(
        "customers_in_region", "multi", ("customers", "regions"),
        "How many customers are in the {region} region?",
        "SELECT COUNT(*) FROM customers c JOIN regions r ON r.region_id = c.region_id WHERE r.name = {region}",
        lambda conn: _values(conn, "region", _REGIONS_SQL),
    ),
    Template(
        "completed_revenue_in_region", "multi", ("order_items", "orders", "customers", "regions"),
        "What is the total revenue (quantity times unit price) of completed orders from customers in the {region} "
        "region, rounded to two decimals?",
        f"SELECT ROUND(SUM(oi.quantity * oi.unit_price), 2) {_COMPLETED_IN_REGION}\n"
        "WHERE r.name = {region} AND o.status = 'completed'",
        lambda conn: _values(conn, "region", _REGIONS_SQL),
    ),
    Template(
        "top_category_units_in_region", "multi", ("order_items", "orders", "customers", "regions", "products"),
        "Which product category sold the most units in completed orders from customers in the {region} region?",
        f"SELECT p.category {_COMPLETED_IN_REGION}\nJOIN products p ON p.product_id = oi.product_id\n"
        "WHERE r.name = {region} AND o.status = 'completed'\n"
        "GROUP BY p.category ORDER BY SUM(oi.quantity) DESC, p.category LIMIT 1",
        lambda conn: _values(conn, "region", _REGIONS_SQL),
        tie_sql=f"SELECT SUM(oi.quantity) AS units {_COMPLETED_IN_REGION}\n"
        "JOIN products p ON p.product_id = oi.product_id\nWHERE r.name = {region} AND o.status = 'completed'\n"
        "GROUP BY p.category ORDER BY units DESC LIMIT 2",
    ),
    Template(
        "orders_of_customer", "multi", ("orders", "customers"),
        "How many orders (of any status) did {customer} place?",
        "SELECT COUNT(*) FROM orders o JOIN customers c ON c.customer_id = o.customer_id WHERE c.name = {customer}",
        lambda conn: _values(conn, "customer", "SELECT name FROM customers WHERE customer_id IN "
                             "(SELECT customer_id FROM orders) ORDER BY customer_id"),
    ),
    Template(
        "top_customer_in_region", "multi", ("order_items", "orders", "customers", "regions"),
        "Which customer in the {region} region has the highest revenue from completed orders?",
        f"SELECT c.name {_COMPLETED_IN_REGION}\nWHERE r.name = {{region}} AND o.status = 'completed'\n"
        "GROUP BY c.customer_id ORDER BY SUM(oi.quantity * oi.unit_price) DESC, c.name LIMIT 1",
        lambda conn: _values(conn, "region", _REGIONS_SQL),
        tie_sql=f"SELECT ROUND(SUM(oi.quantity * oi.unit_price), 2) AS revenue {_COMPLETED_IN_REGION}\n"
        "WHERE r.name = {region} AND o.status = 'completed'\nGROUP BY c.customer_id ORDER BY revenue DESC LIMIT 2",
    ),
    Template(
        "customers_buying_category", "multi", ("order_items", "orders", "products"),
        "How many different customers have a completed order that contains a product from the {category} "
        "category?",
        "SELECT COUNT(DISTINCT o.customer_id) FROM orders o\nJOIN order_items oi ON oi.order_id = o.order_id\n"
        "JOIN products p ON p.product_id = oi.product_id\nWHERE p.category = {category} AND o.status = 'completed'",
        lambda conn: _values(conn, "category", _CATEGORIES_SQL),
    ),
]


def _literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _answer(db_path: str | os.PathLike[str], template: Template, params: Params) -> tuple[str, list[list]] | None:
    """The reference SQL and its rows, or None when the instance makes a poor question: no rows, a zero or NULL
    answer (which a query that matches nothing would also return), or a tie for the top place."""
    quoted = {k: _literal(v) for k, v in params.items()}
    sql = template.sql.format(**quoted)
    result = run_sql(db_path, sql, timeout_s=30.0, max_rows=1000)
    if not result["ok"]:
        raise RuntimeError(f"reference SQL of {template.name} failed: {result['error']}\n{sql}")
    rows = result["rows"]
    if not rows or any(v is None or v == 0 for row in rows for v in row):
        return None
    if template.tie_sql:
        top = run_sql(db_path, template.tie_sql.format(**quoted), timeout_s=30.0)["rows"]
        if len(top) == 2 and top[0] == top[1]:
            return None
    return sql, rows


def make_questions(db_path: str | os.PathLike[str], *, seed: int = 0, n: int = 60) -> list[Question]:
    """`n` questions about the database, each with its reference SQL and answer; the same seed gives the same list.

    Questions are drawn in rounds: each round takes one unused instance of every template, alternating one-table
    and multi-table templates, so any `n` is about half of each kind and n >= len(TEMPLATES) covers every template.
    A template whose instances run out drops out of later rounds.
    """
    rng = random.Random(seed)
    with closing(_connect_read_only(db_path)) as conn:
        pools = {t.name: t.candidates(conn) for t in TEMPLATES}
    for pool in pools.values():
        rng.shuffle(pool)
    singles = [t for t in TEMPLATES if t.kind == "single"]
    multis = [t for t in TEMPLATES if t.kind == "multi"]
    questions: list[Question] = []
    while len(questions) < n and any(pools.values()):
        rng.shuffle(singles)
        rng.shuffle(multis)
        order = [t for pair in zip(singles, multis) for t in pair]
        order += singles[len(multis):] + multis[len(singles):]
        for template in order:
            if len(questions) == n:
                break
            pool = pools[template.name]
            while pool:
                params = pool.pop()
                found = _answer(db_path, template, params)
                if found is not None:
                    sql, rows = found
                    questions.append(Question(
                        id=f"Q{len(questions) + 1:03d}", question=template.question.format(**params), sql=sql,
                        answer=rows, tables=template.tables, kind=template.kind, template=template.name,
                    ))
                    break
    if len(questions) < n:
        raise ValueError(f"asked for {n} questions, but the templates give only {len(questions)} on this database")
    return questions


# ---------------------------------------------------------------------------------------------------------------
# Scoring.


def _as_rows(value: Any) -> list[list]:
    """Rows from a result in any of the shapes an agent may report: rows, one flat column, or a bare value."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [[value]]
    return [list(v) if isinstance(v, Sequence) and not isinstance(v, (str, bytes)) else [v] for v in value]


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return None


def _cells_match(got: Any, want: Any, tol: float) -> bool:
    if got is None or want is None:
        return got is None and want is None
    g, w = _number(got), _number(want)
    if g is not None and w is not None:
        # Integers (counts, ids) must be exact: a tolerance is for float rounding, and 1% of a count of 300 would
        # accept 303.
        if isinstance(want, int):
            return g == w
        return math.isclose(g, w, rel_tol=tol, abs_tol=1e-9)
    if g is not None or w is not None:
        return False
    return str(got).strip().casefold() == str(want).strip().casefold()


def _rows_match(got: list, want: list, tol: float) -> bool:
    return len(got) == len(want) and all(_cells_match(g, w, tol) for g, w in zip(got, want))


def answers_match(result_rows: Any, expected_rows: Any, *, tol: float = 0.01) -> bool:
    """Whether a result is the expected answer, as execution accuracy judges it in text-to-SQL benchmarks.

    The rows must be the same multiset: row order is ignored (the reference answers of "top" questions are single
    rows), floats may differ by the relative tolerance `tol` (integers must be equal), strings are compared
    stripped and case-insensitively. A one-value answer [[x]] also matches x itself or [x]. Extra or missing
    columns do not match: the question says what to return.
    """
    got, want = _as_rows(result_rows), _as_rows(expected_rows)
    if len(got) != len(want):
        return False
    unused = sorted(got, key=repr)
    for row in sorted(want, key=repr):
        for i, candidate in enumerate(unused):
            if _rows_match(candidate, row, tol):
                del unused[i]
                break
        else:
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True, help="the SQLite file to write (replaced if it exists)")
    parser.add_argument("--questions", help="the JSONL file of questions to write (default: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-n", type=int, default=60, help="how many questions (default 60)")
    args = parser.parse_args(argv)
    counts = build_database(args.db, seed=args.seed, overwrite=True)
    summary = f"wrote {args.db} ({', '.join(f'{v} {k}' for k, v in counts.items())})"
    if args.questions:
        questions = make_questions(args.db, seed=args.seed, n=args.n)
        with open(args.questions, "w") as f:
            f.writelines(json.dumps(q.to_json(), ensure_ascii=False) + "\n" for q in questions)
        kinds = {k: sum(q.kind == k for q in questions) for k in ("single", "multi")}
        summary += f" and {len(questions)} questions ({kinds['single']} single-table, {kinds['multi']} multi-table)"
        summary += f" to {args.questions}"
    print(summary, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
