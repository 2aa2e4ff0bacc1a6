"""Raw text into language-model training rows, two ways, as distilpythia compared them.

- `pad_truncate`: one row per document, cut at `max_length`, shorter ones padded in the batch:
  every row starts at a document's beginning, the ends of long documents are never seen, and
  padding costs compute;
- `pack`: the documents joined (each followed by EOS) and cut into rows of exactly
  `block_size` tokens: no padding and no text thrown away, but rows start mid-document.

The local corpora (`LM_FILES`) are read from the data mirror: WikiText-2's test and validation
splits (articles), tiny-shakespeare (speeches) and 125 Project Gutenberg books (paragraphs, the
Gutenberg header and licence footer stripped): text apart from WikiText for training a model
that is later evaluated on WikiText.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from kdlib.data import DataError, resolve_data_dir

LM_FILES = {
    "wikitext2-test": "lm/wiki.test.raw",
    "wikitext2-valid": "lm/wiki.valid.raw",
    "tinyshakespeare": "lm/tinyshakespeare.txt",
    "gutenberg": "lm/gutenberg",
}
"""Local corpus name -> its path in the data mirror (`gutenberg` is a folder of books)."""
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF .*$", re.M)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF .*$", re.M)
_GUTENBERG_NOTE = re.compile(r"^(End of (the )?Project Gutenberg|Produced by )", re.I)
"""Transcribers' lines that sit inside the markers: the credit and the closing line."""


def wikitext_articles(text: str) -> list[str]:
    """WikiText raw text split into its articles (at the top-level ` = Title = ` lines)."""
    articles: list[list[str]] = []
    for line in text.split("\n"):
        if _WIKI_TITLE.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return [joined for lines in articles if (joined := "\n".join(lines).strip())]


def paragraphs(text: str) -> list[str]:
    """Blocks of text separated by blank lines (tiny-shakespeare's speeches)."""
    return [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]


def gutenberg_body(text: str, name: str = "book") -> str:
    """A Project Gutenberg file's text between its `*** START OF` and `*** END OF` lines (the
    header and the licence are not the book), without the transcriber's credit and closing
    line; line ends normalised to `\\n`."""
    text = text.replace("\r\n", "\n")
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start is None or end is None or end.start() < start.end():
        raise DataError(f"{name}: no '*** START OF' ... '*** END OF' lines around the book's text.")
    blocks = re.split(r"(\n\s*\n)", text[start.end() : end.start()])
    return "".join(b for b in blocks if not _GUTENBERG_NOTE.match(b.strip())).strip()


def prose_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with their hard line wraps joined by spaces."""
    return [" ".join(block.split()) for block in paragraphs(text)]


def load_lm_documents(corpus: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The documents of a local raw-text corpus: WikiText articles, `tinyshakespeare` speeches,
    or the paragraphs of every `gutenberg` book (books in file-name order)."""
    if corpus not in LM_FILES:
        raise DataError(f"corpus={corpus!r}: the local text corpora are {sorted(LM_FILES)}.")
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataError(
            f"corpus {corpus!r} is read from the data mirror: set KDLIB_DATA_DIR (or data_dir) to it."
        )
    path = root / LM_FILES[corpus]
    if corpus == "gutenberg":
        books = sorted(path.glob("*.txt")) if path.is_dir() else []
        if not books:
            raise DataError(f"{path} holds no books: the data directory lacks {LM_FILES[corpus]}/*.txt.")
        bodies = [gutenberg_body(book.read_text("utf-8"), book.name) for book in books]
        return [paragraph for body in bodies for paragraph in prose_paragraphs(body)]
    if not path.is_file():
        raise DataError(f"{path} does not exist: the data directory lacks {LM_FILES[corpus]}.")
    text = path.read_text(encoding="utf-8")
    documents = wikitext_articles(text) if corpus.startswith("wikitext") else paragraphs(text)
    if not documents:
        raise DataError(f"{path} holds no text.")
    return documents


def pad_truncate(
    token_lists: Sequence[Sequence[int]], max_length: int, min_length: int = 2
) -> list[list[int]]:
    """One row per document, cut to `max_length`; documents under `min_length` tokens are dropped."""
    if max_length < 2:
        raise DataError(f"max_length = {max_length}: a causal-LM row needs at least 2 tokens.")
    rows = [list(ids[:max_length]) for ids in token_lists if len(ids) >= min_length]
    if not rows:
        raise DataError(f"no document has {min_length} tokens or more: nothing to train on.")
    return rows


def pack(token_lists: Sequence[Sequence[int]], block_size: int, eos_token_id: int) -> list[list[int]]:
    """The documents joined, each followed by EOS, cut into rows of exactly `block_size` tokens.

    The incomplete last row is dropped (at most block_size - 1 tokens).
    """
    if block_size < 2:
        raise DataError(f"block_size = {block_size}: a causal-LM row needs at least 2 tokens.")
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_token_id)
    rows = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    if not rows:
        raise DataError(
            f"{len(stream)} tokens make no block of {block_size}: use more text or shorter blocks."
        )
    return rows
