"""Write a JSONL file of short made-up business reports, the records of the summarise_documents demo.

    python demos/make_documents.py -n 200 -o demos/documents.jsonl

Seeded: the same arguments give the same file. Each line is {"id": "doc-0001", "document": "..."};
a document has six to nine sentences (--sentences), so it splits into three parts of two or three.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

COMPANIES = ["Northwind", "Contoso", "Globex", "Initech", "Umbrella Foods", "Stark Textiles", "Acme Rail", "Hooli"]
REGIONS = ["Europe", "Asia", "North America", "South America", "Africa", "Australia"]
PRODUCTS = ["laptops", "delivery vans", "frozen meals", "solar panels", "running shoes", "office chairs", "tablets"]
SENTENCES = [
    "Revenue {dir} {n}% in the {q} quarter, driven by sales of {product} in {region}.",
    "Operating costs {dir} by {n}% after the plant in {region} automated its packaging lines.",
    "{company} opened {k} new stores in {region} and plans {k2} more next year.",
    "The board approved a budget of {m} million dollars for research on {product}.",
    "Customer complaints about {product} {dir} by {n}% since the new support team started.",
    "{company} paused hiring in {region} and will review its staffing plans in {month}.",
    "A supplier in {region} raised prices for parts of {product} by {n}%.",
    "The company signed a {k}-year contract with a retailer in {region}.",
    "Shipping delays in {region} cut deliveries of {product} by {n}% in {month}.",
    "{company} expects demand for {product} to {verb} over the next two quarters.",
]
WORDS = {
    "dir": ["grew", "fell", "rose", "dropped"],
    "q": ["first", "second", "third", "fourth"],
    "month": ["January", "March", "June", "September", "November"],
    "verb": ["grow", "slow down", "stay flat", "double"],
}


def document(rng: random.Random, sentences: tuple[int, int] = (6, 9)) -> str:
    company = rng.choice(COMPANIES)
    picks = rng.sample(SENTENCES, rng.randint(*sentences))
    return " ".join(
        s.format(
            company=company,
            region=rng.choice(REGIONS),
            product=rng.choice(PRODUCTS),
            n=rng.randint(2, 40),
            k=rng.randint(2, 12),
            k2=rng.randint(2, 12),
            m=rng.randint(5, 900),
            **{key: rng.choice(values) for key, values in WORDS.items()},
        )
        for s in picks
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="how many documents (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sentences", type=int, nargs=2, default=(6, 9), metavar=("MIN", "MAX"),
        help=f"sentences per document, at least 3 (one per part) and at most {len(SENTENCES)} (default 6 9)",
    )  # fmt: skip
    parser.add_argument("-o", "--output", default="-", help="the JSONL file to write (default: stdout)")
    args = parser.parse_args(argv)
    low, high = args.sentences
    if not 3 <= low <= high <= len(SENTENCES):
        parser.error(f"--sentences {low} {high}: need 3 <= MIN <= MAX <= {len(SENTENCES)}")
    rng = random.Random(args.seed)
    lines = [json.dumps({"id": f"doc-{i:04d}", "document": document(rng, (low, high))}) for i in range(1, args.n + 1)]
    text = "\n".join(lines) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
