"""Text sources: local files, hub names offline, the built-in Wikipedia corpus, and calibration batches."""

from __future__ import annotations

import bz2
import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slice2deploy import data
from slice2deploy.data import (
    TextSource,
    calibration_batch,
    describe_text_sources,
    load_text,
    token_stream,
)
from slice2deploy.utils import UserInputError, sha256_bytes, sha256_file

PROSE = (
    "The quick brown fox jumps over the lazy dog while the patient cat watches from the warm window sill.\n\n"
    "Calibration text should look like ordinary prose, with sentences of varied length and plenty of words.\n"
    "A second line in the same paragraph stays with it.\n\n\n"
    "Numbers such as 1234 and punctuation; commas, colons: all of them appear now and then in real text."
)


def _byte_bpe(text: str, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _byte_bpe(PROSE * 4)


@pytest.fixture()
def prose_source(tmp_path: Path) -> TextSource:
    path = tmp_path / "prose.txt"
    path.write_text(PROSE * 20, encoding="utf-8")
    return load_text(str(path), "calibration")


# ---------------------------------------------------------------------------------------------- local files


def test_txt_file_paragraphs_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "doc.txt"
    path.write_text(PROSE, encoding="utf-8")
    cal, ev = load_text(str(path), "calibration"), load_text(str(path), "evaluation")
    assert len(cal.texts) == 3
    assert cal.texts[1].endswith("stays with it.")
    assert cal.texts == ev.texts and cal.sha256 == ev.sha256  # a local file is the user's choice for both splits
    assert cal.sha256 == sha256_bytes(cal.joined().encode("utf-8"))
    assert cal.meta["file_sha256"] == sha256_file(path)
    assert path.read_text(encoding="utf-8") == PROSE  # the input is untouched


def test_jsonl_text_field_and_first_string_fallback(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    rows = [{"id": 1, "text": "first document"}, {"n": 2, "body": "second document", "x": "ignored"}, {"text": ""}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    source = load_text(str(path), "evaluation")
    assert source.texts == ["first document", "second document"]
    assert source.joined() == "first document\n\nsecond document"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": broken}\n', ":2: not valid JSON"),
        ('{"id": 3, "score": 0.5}\n', "no 'text' field"),
        ('["a list"]\n', "expected a JSON object"),
        ("\n\n", "contains no text"),
    ],
)
def test_bad_jsonl_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserInputError, match=message):
        load_text(str(path), "calibration")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(UserInputError, match="unsupported file type"):
        load_text(str(path), "calibration")


def test_unknown_name_lists_accepted_forms() -> None:
    with pytest.raises(UserInputError, match="unknown text source") as info:
        load_text("wikitext-103", "calibration")
    assert "builtin" in str(info.value) and ".jsonl" in str(info.value) and "wikitext2" in str(info.value)
    with pytest.raises(UserInputError, match="no such file"):
        load_text("missing/file.txt", "calibration")


def test_bad_split() -> None:
    with pytest.raises(UserInputError, match="unknown split"):
        load_text("builtin", "train")


@pytest.mark.parametrize("name", ["wikitext2", "c4", "ptb", "alpaca"])
def test_hub_name_offline_points_to_builtin(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="not reachable") as info:
        load_text(name, "evaluation")
    assert "builtin" in str(info.value) and ".txt" in str(info.value)


def test_describe_text_sources() -> None:
    text = describe_text_sources()
    assert "builtin" in text and ".txt" in text and "c4" in text


# ---------------------------------------------------------------------------------------------- wikitext cleaning

WIKITEXT = """{{Infobox thing
| name = Thing
| size = 3
}}
'''Thing''' is a small object that people have studied for a very long time, as described in many books.<ref>Some
book, p. 3.</ref> It is [[Object|often]] compared with other things of a similar shape and weight.

[[File:Thing.jpg|thumb|A thing, photographed in a museum near the sea with a lot of caption words]]
== History ==
The history of the thing begins in antiquity, when scholars first wrote about it in their long treatises on nature.

* A list item that is long enough to pass the length filter but is not prose at all, so it goes.
* Another list item that is also quite long but should be dropped from the article text entirely.

{| class="wikitable"
| cell one with enough words to be long || cell two with enough words to be long as well
|}
Short line.
"""


def _dump(pages: list[tuple[str, str, str]]) -> bytes:
    body = "".join(
        f"<page><title>{title}</title><ns>{ns}</ns><revision><text>{text}</text></revision></page>"
        for title, ns, text in pages
    )
    xml = f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}</mediawiki>'
    return bz2.compress(xml.encode("utf-8"))


def test_article_text_keeps_prose_only() -> None:
    text = data.article_text(WIKITEXT)
    paragraphs = text.split("\n\n")
    assert len(paragraphs) == 2
    assert paragraphs[0].startswith("Thing is a small object") and "often compared" in paragraphs[0]
    assert paragraphs[1].startswith("The history of the thing")
    for junk in ("Some book", "History", "list item", "cell one", "thumb", "Infobox", "Short line"):
        assert junk not in text


def test_parse_dump_skips_redirects_other_namespaces_and_short_articles() -> None:
    long_prose = ("This sentence is ordinary prose about a topic and it is long enough to be kept. " * 4 + "\n\n") * 3
    pages = [
        ("Kept", "0", long_prose),
        ("Redirected", "0", "#REDIRECT [[Kept]]"),
        ("Wikipedia:Policy", "4", long_prose),
        ("Tiny", "0", "Too short to keep, even though it is prose of a sort and ends with a full stop."),
    ]
    articles = data.parse_dump(_dump(pages))
    assert list(articles) == ["Kept"]
    assert len(articles["Kept"]) >= data.MIN_ARTICLE_CHARS


# ---------------------------------------------------------------------------------------------- built-in corpus


def test_builtin_corpus_split_and_manifest() -> None:
    cal, ev = load_text("builtin", "calibration"), load_text("builtin", "evaluation")
    assert set(cal.meta["titles"]).isdisjoint(ev.meta["titles"])
    assert all(data.is_evaluation_title(t) for t in ev.meta["titles"])
    assert not any(data.is_evaluation_title(t) for t in cal.meta["titles"])
    n_articles = len(cal.texts) + len(ev.texts)
    assert 80 <= n_articles <= 120
    chars = {s.split: sum(map(len, s.texts)) for s in (cal, ev)}
    share = chars["evaluation"] / (chars["evaluation"] + chars["calibration"])
    assert data.EVAL_SHARE_BOUNDS[0] <= share <= data.EVAL_SHARE_BOUNDS[1]
    assert 2_000_000 <= sum(chars.values()) <= 3_500_000

    root, manifest = data.builtin_corpus()
    assert manifest["source"]["member_sha256"] == data.WIKI_MEMBER_SHA256
    for source in (cal, ev):
        entry = manifest["splits"][source.split]
        assert sha256_file(root / entry["file"]) == entry["sha256"]
        assert entry["titles"] == source.meta["titles"] and entry["chars"] == chars[source.split]
        assert all(len(t) >= data.MIN_ARTICLE_CHARS for t in source.texts)


def test_builtin_corpus_rebuilds_when_a_split_file_is_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original, _ = data.builtin_corpus()  # the shared cache, built once for the suite
    monkeypatch.setenv("SLICE2DEPLOY_CACHE", str(tmp_path))
    copy = data.corpus_dir()
    shutil.copytree(original, copy)
    (copy / "evaluation.jsonl").write_text('{"title": "X", "text": "tampered"}\n', encoding="utf-8")
    rebuilt = []

    def fake_build(target: Path) -> None:  # stands in for the download + parse, which the test above covers
        rebuilt.append(target)
        shutil.rmtree(target)
        shutil.copytree(original, target)

    monkeypatch.setattr(data, "_build_corpus", fake_build)
    source = load_text("builtin", "evaluation")
    assert rebuilt == [copy]
    assert "tampered" not in source.joined()


# ---------------------------------------------------------------------------------------------- tokens and batches


def test_token_stream_matches_tokenizer_and_is_cached(tokenizer: PreTrainedTokenizerFast, prose_source) -> None:
    stream = token_stream(tokenizer, prose_source)
    assert stream.dtype == torch.long and stream.dim() == 1
    assert tokenizer.decode(stream) == prose_source.joined()
    stream[:] = 0  # the caller's copy; the cache must not change
    again = token_stream(tokenizer, prose_source)
    assert int(again.ne(0).sum()) > 0


def test_calibration_batch_shapes_and_determinism(tokenizer: PreTrainedTokenizerFast, prose_source) -> None:
    ids, mask = calibration_batch(tokenizer, prose_source, n_samples=4, seqlen=16, seed=0)
    assert ids.shape == mask.shape == (4, 16)
    assert ids.dtype == mask.dtype == torch.long and bool(mask.eq(1).all())
    same, _ = calibration_batch(tokenizer, prose_source, n_samples=4, seqlen=16, seed=0)
    other, _ = calibration_batch(tokenizer, prose_source, n_samples=4, seqlen=16, seed=1)
    assert torch.equal(ids, same)
    assert not torch.equal(ids, other)
    stream = token_stream(tokenizer, prose_source).tolist()
    for row in ids.tolist():  # every row is a contiguous window of the stream
        assert any(stream[s : s + 16] == row for s in range(len(stream) - 15))


def test_calibration_batch_rejects_bad_sizes(tokenizer: PreTrainedTokenizerFast, prose_source) -> None:
    with pytest.raises(UserInputError, match="n_samples"):
        calibration_batch(tokenizer, prose_source, n_samples=0, seqlen=16, seed=0)
    with pytest.raises(UserInputError, match="seqlen"):
        calibration_batch(tokenizer, prose_source, n_samples=1, seqlen=1, seed=0)
    n_tokens = token_stream(tokenizer, prose_source).numel()
    ids, _ = calibration_batch(tokenizer, prose_source, n_samples=2, seqlen=n_tokens, seed=0)
    assert ids.shape == (2, n_tokens)
    with pytest.raises(UserInputError, match="fewer than seqlen"):
        calibration_batch(tokenizer, prose_source, n_samples=1, seqlen=n_tokens + 1, seed=0)
