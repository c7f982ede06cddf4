"""Text for calibration and evaluation: the built-in Wikipedia corpus, local files, or ``datasets`` hub names.

The built-in corpus is the shortened English Wikipedia dump shipped in the ``gensim==4.4.0`` wheel (CC BY-SA), read
straight from the wheel (gensim is never installed), reduced to prose paragraphs and split **by article** into a
calibration part and a held-out evaluation part. Rule: an article goes to evaluation when
``int(sha256(title)[:8], 16) % 8 == 0``; this gives 18 of 96 articles and ~12% of the characters.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slice2deploy.utils import (
    IntegrityError,
    UserInputError,
    atomic_directory,
    atomic_write_text,
    cache_dir,
    sha256_bytes,
    sha256_file,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLITS = ("calibration", "evaluation")
SEPARATOR = "\n\n"

# ---- built-in corpus: where it comes from and how it is processed (bump RULE_VERSION when processing changes)
CORPUS_VERSION = "builtin-v1"
RULE_VERSION = "prose-paragraphs-v2; evaluation if int(sha256(title)[:8],16) % 8 == 0"
GENSIM_REQUIREMENT = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
EVAL_MODULUS = 8
EVAL_SHARE_BOUNDS = (0.08, 0.20)
MIN_PARAGRAPH_CHARS = 80
MIN_ARTICLE_CHARS = 500
_MARKUP_STARTS = ("|", "{", "!", "*", "#", "=", ":", ";")
_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "imagemap", "syntaxhighlight", "source"}
_LIST_MARKUP = {"*", "#", ":", ";"}
_MEDIA_NAMESPACES = {"file", "image", "media", "category"}
_EMPTY_PARENS = re.compile(r"\(\s*(?:[;,]\s*)*\)|\(\s*(?:[;,]\s*)+")
# References can hide where the parser gives up (unbalanced quotes), so they also go by pattern, as do stray tags.
_REFS = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")


@dataclass(frozen=True)
class HubDataset:
    """How one ``datasets`` name maps onto calibration/evaluation splits."""

    path: str
    config: str | None
    splits: dict[str, str]
    text_field: str = "text"
    data_files: dict[str, str] = field(default_factory=dict)
    eval_tail_fraction: float | None = None  # one-split datasets: evaluation = the last rows, calibration = the rest


HUB_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset("wikitext", "wikitext-2-raw-v1", {"calibration": "train", "evaluation": "test"}),
    "ptb": HubDataset("ptb_text_only", "penn_treebank", {"calibration": "train", "evaluation": "test"}, "sentence"),
    "c4": HubDataset(
        "allenai/c4",
        None,
        {"calibration": "train", "evaluation": "validation"},
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
    "alpaca": HubDataset(
        "tatsu-lab/alpaca", None, {"calibration": "train", "evaluation": "train"}, eval_tail_fraction=0.1
    ),
}


@dataclass
class TextSource:
    """A list of documents; ``sha256`` is that of ``joined()`` encoded as UTF-8."""

    name: str
    split: str
    texts: list[str]
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)

    def joined(self) -> str:
        return SEPARATOR.join(self.texts)


def describe_text_sources() -> str:
    """One line of help on the accepted text specs."""
    return (
        "'builtin' (a Wikipedia sample fetched once from PyPI, split by article), a local .txt file (paragraphs) "
        f"or .jsonl file (field 'text'), or a datasets name ({', '.join(HUB_DATASETS)}; needs the hub)"
    )


def _make_source(name: str, split: str, texts: list[str], meta: dict[str, Any]) -> TextSource:
    digest = sha256_bytes(SEPARATOR.join(texts).encode("utf-8"))
    return TextSource(name=name, split=split, texts=texts, sha256=digest, meta=meta)


def load_text(spec: str, split: str) -> TextSource:
    """Load the ``split`` ("calibration" or "evaluation") of a text spec (see :func:`describe_text_sources`).

    A local file is used as given for both splits: the user chose it, so keeping it held out is up to them.
    """
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if spec == "builtin":
        return _load_builtin(split)
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_file(path, split)
    if spec.lower() in HUB_DATASETS:
        return _load_hub(spec.lower(), split)
    what = "no such file" if path.suffix or os.sep in spec else "unknown text source"
    raise UserInputError(f"{what}: {spec!r}; give {describe_text_sources()}")


# --------------------------------------------------------------------------------------------------- local files


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def _jsonl_text(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise UserInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if isinstance(record.get("text"), str):
        return record["text"]
    for value in record.values():
        if isinstance(value, str):
            return value
    raise UserInputError(f"{where}: the object has no 'text' field and no other string field")


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            texts.append(_jsonl_text(record, f"{path}:{number}"))
    return [t for t in texts if t.strip()]


def _load_file(path: Path, split: str) -> TextSource:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            texts = _paragraphs(path.read_text(encoding="utf-8"))
        elif suffix == ".jsonl":
            texts = _read_jsonl(path)
        else:
            raise UserInputError(f"{path}: unsupported file type {suffix or '(none)'}; use a .txt or .jsonl file")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not texts:
        raise UserInputError(f"{path} contains no text")
    meta = {"kind": "file", "path": str(path.resolve()), "file_sha256": sha256_file(path), "documents": len(texts)}
    return _make_source(str(path), split, texts, meta)


# --------------------------------------------------------------------------------------------------- hub datasets


def _hub_error(name: str, reason: str) -> UserInputError:
    return UserInputError(
        f"cannot load the {name!r} dataset: {reason}. The Hugging Face hub is not reachable (or datasets is missing); "
        "use 'builtin' for the built-in Wikipedia corpus, or a local .txt/.jsonl file"
    )


def _offline() -> bool:
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return any(f in {"1", "true", "yes", "on"} for f in flags)


def _load_hub(name: str, split: str) -> TextSource:
    spec = HUB_DATASETS[name]
    if _offline():
        raise _hub_error(name, "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set")
    try:
        import datasets
    except ImportError:
        raise _hub_error(name, "the datasets package is not installed (pip install datasets)") from None
    hub_split = spec.splits[split]
    kwargs: dict[str, Any] = {"split": hub_split}
    if spec.data_files:
        kwargs["data_files"] = {hub_split: spec.data_files[hub_split]}
    try:
        rows = datasets.load_dataset(spec.path, spec.config, **kwargs)[spec.text_field]
    except Exception as exc:  # any failure here means the hub (or its cache) could not provide the data
        raise _hub_error(name, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    rows = list(rows)
    if spec.eval_tail_fraction is not None:
        cut = len(rows) - max(1, int(len(rows) * spec.eval_tail_fraction))
        rows = rows[cut:] if split == "evaluation" else rows[:cut]
    meta = {"kind": "hub", "dataset": spec.path, "config": spec.config, "hub_split": hub_split, "rows": len(rows)}
    return _make_source(name, split, rows, meta)


# --------------------------------------------------------------------------------------------------- built-in corpus


def corpus_dir() -> Path:
    return cache_dir() / "corpus" / CORPUS_VERSION


def _download_wheel(dest: Path) -> Path:
    """The gensim wheel for this platform, else the manylinux cp311 one (the member is identical), else the sdist."""
    from slice2deploy.sources import pip_download

    attempts = (
        ("--only-binary=:all:",),
        ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"),
        (),
    )
    for extra in attempts[:-1]:
        try:
            return pip_download(GENSIM_REQUIREMENT, dest, *extra)
        except UserInputError:
            continue
    return pip_download(GENSIM_REQUIREMENT, dest, *attempts[-1])


def _read_member(archive: Path) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(WIKI_MEMBER)
    with tarfile.open(archive) as tf:
        member = next((m for m in tf.getmembers() if m.name.endswith("/" + WIKI_MEMBER)), None)
        if member is None:
            raise IntegrityError(f"{archive.name} has no member {WIKI_MEMBER}")
        return tf.extractfile(member).read()


def _fetch_dump() -> tuple[str, bytes]:
    """Return (archive name, bz2 bytes) of the Wikipedia dump, verified against the pinned sha256."""
    with tempfile.TemporaryDirectory(prefix="pip-", dir=cache_dir()) as tmp:
        archive = _download_wheel(Path(tmp))
        data = _read_member(archive)
    actual = sha256_bytes(data)
    if actual != WIKI_MEMBER_SHA256:
        raise IntegrityError(f"{archive.name}:{WIKI_MEMBER} has sha256 {actual}, expected {WIKI_MEMBER_SHA256}")
    return archive.name, data


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def iter_pages(xml_stream: io.BufferedIOBase) -> Iterator[dict[str, Any]]:
    """Yield ``{"title", "ns", "redirect", "text"}`` per ``<page>`` of a MediaWiki export (any schema version)."""
    for _, elem in ET.iterparse(xml_stream, events=("end",)):
        if _local(elem.tag) != "page":
            continue
        page: dict[str, Any] = {"title": "", "ns": "0", "redirect": False, "text": ""}
        for child in elem.iter():
            name = _local(child.tag)
            if name in ("title", "ns", "text"):
                page[name] = child.text or ""
            elif name == "redirect":
                page["redirect"] = True
        elem.clear()
        yield page


def _replace_node(node: Any) -> Any:
    """None to drop a node, a Text node to stand in for list markers, or the node itself."""
    from mwparserfromhell.nodes import Heading, Tag, Text, Wikilink

    if isinstance(node, Heading):
        return Text("\n\n")
    if isinstance(node, Tag):
        if str(node.tag).strip().lower() in _DROP_TAGS:
            return None
        return Text("* ") if node.wiki_markup in _LIST_MARKUP else node
    if isinstance(node, Wikilink):
        namespace, colon, _ = str(node.title).strip().partition(":")
        if colon and namespace.strip().lower() in _MEDIA_NAMESPACES:
            return None
    return node


def _prune(code: Any) -> None:
    """Drop references, tables, headings, media links and mark list items, recursively (bad italics nest deep)."""
    from mwparserfromhell.nodes import Tag

    kept = []
    for node in code.nodes:
        new = _replace_node(node)
        if new is None:
            continue
        if isinstance(new, Tag) and new.contents is not None:
            _prune(new.contents)
        kept.append(new)
    code.nodes = kept


def _keep_line(line: str) -> bool:
    line = line.strip()
    if not line or line.startswith(_MARKUP_STARTS) or "[[" in line or "]]" in line or "{{" in line:
        return False
    return sum(c.isalpha() for c in line) >= 0.5 * len(line)


def _prose(paragraph: str) -> str:
    text = " ".join(line.strip() for line in _HTML_TAG.sub("", paragraph).split("\n") if _keep_line(line))
    return " ".join(_EMPTY_PARENS.sub(lambda m: "" if m.group().endswith(")") else "(", text).split())


def article_text(wikitext: str) -> str:
    """Prose paragraphs of one article's wikitext, joined by blank lines."""
    import mwparserfromhell

    code = mwparserfromhell.parse(_REFS.sub("", wikitext))
    _prune(code)
    plain = code.strip_code(normalize=True, collapse=True)
    paragraphs = (_prose(p) for p in re.split(r"\n\s*\n", plain))
    return SEPARATOR.join(p for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS)


def parse_dump(bz2_data: bytes) -> dict[str, str]:
    """``{title: text}`` of the dump's articles (namespace 0, no redirects, at least MIN_ARTICLE_CHARS of prose)."""
    articles = {}
    for page in iter_pages(bz2.BZ2File(io.BytesIO(bz2_data))):
        if page["redirect"] or page["ns"].strip() != "0" or page["text"].lstrip().upper().startswith("#REDIRECT"):
            continue
        text = article_text(page["text"])
        if len(text) >= MIN_ARTICLE_CHARS:
            articles[page["title"]] = text
    return articles


def is_evaluation_title(title: str) -> bool:
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16) % EVAL_MODULUS == 0


def split_articles(articles: dict[str, str]) -> dict[str, list[str]]:
    """Sorted titles per split; checks the evaluation share of characters is within EVAL_SHARE_BOUNDS."""
    titles = sorted(articles)
    split = {"calibration": [t for t in titles if not is_evaluation_title(t)]}
    split["evaluation"] = [t for t in titles if is_evaluation_title(t)]
    share = sum(len(articles[t]) for t in split["evaluation"]) / max(1, sum(map(len, articles.values())))
    low, high = EVAL_SHARE_BOUNDS
    if not low <= share <= high:
        raise IntegrityError(f"evaluation split holds {share:.1%} of the corpus, outside [{low:.0%}, {high:.0%}]")
    return split


def _jsonl(articles: dict[str, str], titles: list[str]) -> str:
    return "".join(json.dumps({"title": t, "text": articles[t]}, ensure_ascii=False) + "\n" for t in titles)


def _build_corpus(target: Path) -> None:
    import mwparserfromhell

    archive_name, data = _fetch_dump()
    articles = parse_dump(data)
    split = split_articles(articles)
    manifest: dict[str, Any] = {
        "version": CORPUS_VERSION,
        "rule": RULE_VERSION,
        "source": {"archive": archive_name, "member": WIKI_MEMBER, "member_sha256": WIKI_MEMBER_SHA256},
        "licence": "CC BY-SA (Wikipedia)",
        "mwparserfromhell": mwparserfromhell.__version__,
        "splits": {},
    }
    with atomic_directory(target, overwrite=True) as tmp:
        for name, titles in split.items():
            atomic_write_text(tmp / f"{name}.jsonl", _jsonl(articles, titles))
            manifest["splits"][name] = {
                "file": f"{name}.jsonl",
                "sha256": sha256_file(tmp / f"{name}.jsonl"),
                "articles": len(titles),
                "chars": sum(len(articles[t]) for t in titles),
                "titles": titles,
            }
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def _verified_manifest(target: Path) -> dict[str, Any] | None:
    """The manifest if every split file matches its recorded sha256, else None."""
    try:
        manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
        for name in SPLITS:
            entry = manifest["splits"][name]
            if sha256_file(target / entry["file"]) != entry["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if manifest.get("rule") == RULE_VERSION else None


def builtin_corpus() -> tuple[Path, dict[str, Any]]:
    """The cached built-in corpus directory and its manifest, (re)building it when missing or not matching."""
    target = corpus_dir()
    manifest = _verified_manifest(target)
    if manifest is None:
        _build_corpus(target)
        manifest = _verified_manifest(target)
        if manifest is None:
            raise IntegrityError(f"the built-in corpus at {target} does not match its manifest right after building")
    return target, manifest


def _load_builtin(split: str) -> TextSource:
    target, manifest = builtin_corpus()
    entry = manifest["splits"][split]
    with open(target / entry["file"], encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    meta = {
        "kind": "builtin",
        "corpus": str(target),
        "rule": manifest["rule"],
        "source": manifest["source"],
        "file_sha256": entry["sha256"],
        "articles": len(records),
        "titles": [r["title"] for r in records],
        "chars": entry["chars"],
    }
    return _make_source("builtin", split, [r["text"] for r in records], meta)


# --------------------------------------------------------------------------------------------------- tokens

_STREAM_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_STREAM_CACHE_SIZE = 8


def _tokenizer_key(tokenizer: PreTrainedTokenizerBase) -> tuple:
    name = getattr(tokenizer, "name_or_path", "") or ""
    # An unnamed tokenizer (built in memory) is only safe to recognise by identity.
    return (type(tokenizer).__name__, name, len(tokenizer)) if name else ("object", id(tokenizer), len(tokenizer))


def _tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """Ids of ``SEPARATOR.join(texts)``, tokenized text by text (the separator leads each later text).

    Tokenizing per text keeps every call short of any length limit; ``verbose=False`` silences the
    "longer than model_max_length" warning, and nothing is truncated.
    """
    pieces = [text if i == 0 else SEPARATOR + text for i, text in enumerate(texts)]
    encoded = tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([i for ids in encoded for i in ids], dtype=torch.long)


def token_stream(tokenizer: PreTrainedTokenizerBase, source: TextSource) -> torch.LongTensor:
    """1-D ids of ``source.joined()`` without special tokens; cached in memory per (tokenizer, text)."""
    key = (*_tokenizer_key(tokenizer), source.sha256)
    if key not in _STREAM_CACHE:
        _STREAM_CACHE[key] = _tokenize(tokenizer, source.texts)
        while len(_STREAM_CACHE) > _STREAM_CACHE_SIZE:
            _STREAM_CACHE.popitem(last=False)
    _STREAM_CACHE.move_to_end(key)
    return _STREAM_CACHE[key].clone()  # callers may edit their copy; the cache stays intact


def calibration_batch(
    tokenizer: PreTrainedTokenizerBase, source: TextSource, n_samples: int, seqlen: int, seed: int
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """``n_samples`` random windows of exactly ``seqlen`` tokens: ``(input_ids, attention_mask)``, both (N, T).

    Windows start anywhere in the token stream (they may overlap), drawn with ``torch.Generator().manual_seed(seed)``,
    so the same tokenizer, text and seed give the same batch. A corpus shorter than ``seqlen`` tokens is an error
    rather than a padded batch: padding would only dilute the calibration statistics.
    """
    if n_samples < 1:
        raise UserInputError(f"n_samples must be at least 1, got {n_samples}")
    if seqlen < 2:
        raise UserInputError(f"seqlen must be at least 2, got {seqlen}")
    stream = token_stream(tokenizer, source)
    if stream.numel() < seqlen:
        raise UserInputError(
            f"{source.name} ({source.split}) has only {stream.numel()} tokens, fewer than seqlen={seqlen}; "
            "use more text or a shorter sequence length"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (n_samples,), generator=generator)
    input_ids = torch.stack([stream[s : s + seqlen] for s in starts.tolist()])  # (N, T)
    return input_ids, torch.ones_like(input_ids)


__all__ = [
    "HUB_DATASETS",
    "SPLITS",
    "HubDataset",
    "TextSource",
    "builtin_corpus",
    "calibration_batch",
    "describe_text_sources",
    "load_text",
    "token_stream",
]
