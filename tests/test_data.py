"""Tests of the data pipeline: tokenizers, embedded corpus, prepare_data CLI, GPT datasets, batches.

Everything runs on CPU in one process except one short CLI subprocess; megatron.core is imported
once (about 5 s), the datasets are a few hundred documents.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from launch import prepare_data
from launch.data.prepare import import_megatron_indexed_dataset
from launch.data.corpus import build_embedded_corpus, write_embedded_jsonl
from launch.data.datasets import BatchIterator, build_datasets, ensure_embedded_dataset
from launch.data.tokenizer import ByteTokenizer, TokenizerError, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_indexed(prefix):
    indexed_dataset = import_megatron_indexed_dataset()
    ds = indexed_dataset.IndexedDataset(prefix)
    return ds, [np.asarray(ds[i]).tolist() for i in range(len(ds))]


def run_main(argv, capsys):
    rc = prepare_data.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---- tokenizers -------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_megatron_attributes():
    tok = load_tokenizer("byte")
    text = "Hello, wörld! 17+25=42.\n\u4e2d\u6587 \U0001F600"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.vocab_size == 256 and tok.eod == 255
    # 0xFF never occurs in UTF-8, so the eod id cannot collide with text.
    assert tok.eod not in ids
    assert tok.decode(ids + [tok.eod]) == text
    assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.unique_identifiers["class"] == "ByteTokenizer"
    assert len(tok.vocab) == 256 and tok.inv_vocab[255] == "<eod>"
    assert not hasattr(tok, "pad")  # GPTDataset then uses its own -1 sentinel


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer spec 'gpt2'"):
        load_tokenizer("gpt2")
    with pytest.raises(TokenizerError, match="tokenizer file not found"):
        load_tokenizer(str(tmp_path / "nope" / "tokenizer.json"))


def test_hf_tokenizer_missing_package_message(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(TokenizerError, match=r"pip install tokenizers"):
        load_tokenizer(str(path))


def test_hf_tokenizer_with_tiny_bpe(tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(build_embedded_corpus(100, seed=5), trainer)
    path = str(tmp_path / "tokenizer.json")
    hf.save(path)

    tok = load_tokenizer(path)
    assert tok.eod == hf.token_to_id("<|endoftext|>") and tok.vocab_size == 300
    text = "The red fox sees 12+30=42. \u00fc"
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(TokenizerError, match="no token '<nope>'"):
        load_tokenizer(path, eod_token="<nope>")

    docs = build_embedded_corpus(20, seed=6)
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    rc, _, err = run_main(["--input", str(src), "--output-prefix", str(tmp_path / "hf"),
                           "--tokenizer", path, "--append-eod", "--quiet"], capsys)
    assert rc == 0, err
    _, got = read_indexed(str(tmp_path / "hf"))
    assert got == [tok.encode(d) + [tok.eod] for d in docs]


# ---- embedded corpus --------------------------------------------------------------------------

def test_embedded_corpus_is_deterministic(tmp_path):
    a = build_embedded_corpus(50, seed=7)
    assert a == build_embedded_corpus(50, seed=7)
    assert a != build_embedded_corpus(50, seed=8)
    assert build_embedded_corpus(10, seed=7) == a[:10]  # document i depends on (seed, i) only
    assert len(set(a)) == len(a) and all(a)
    p1 = write_embedded_jsonl(str(tmp_path / "a.jsonl"), 50, seed=7)
    p2 = write_embedded_jsonl(str(tmp_path / "b.jsonl"), 50, seed=7)
    p3 = write_embedded_jsonl(str(tmp_path / "c.jsonl"), 50, seed=9)
    assert open(p1, "rb").read() == open(p2, "rb").read() != open(p3, "rb").read()
    assert [json.loads(line)["text"] for line in open(p1)] == a


def test_embedded_corpus_has_correct_facts():
    text = " ".join(build_embedded_corpus(200, seed=3))
    sums = [tok for tok in text.replace("\n", " ").split() if "+" in tok and tok.endswith(".")]
    assert len(sums) > 50
    for fact in sums:
        lhs, rhs = fact[:-1].split("=")
        a, b = lhs.split("+")
        assert int(a) + int(b) == int(rhs)
    # Fixed facts agree across seeds: they are learnable across documents.
    colors = {}
    for seed in (1, 2):
        for doc in build_embedded_corpus(200, seed=seed):
            for sentence in doc.replace("\n", " ").split(". "):
                if sentence.startswith("The color of the "):
                    thing, color = sentence[len("The color of the "):].rstrip(".").split(" is ")
                    assert colors.setdefault(thing, color) == color
    assert len(colors) > 5


def test_prepare_embedded_is_byte_identical(tmp_path, capsys):
    def build(name, seed):
        prefix = str(tmp_path / name)
        rc, out, err = run_main(["--embedded", "40", "--seed", str(seed), "--output-prefix", prefix,
                                 "--append-eod"], capsys)
        assert rc == 0, err
        assert "40 documents" in out
        return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()

    assert build("a", 1) == build("b", 1)
    assert build("c", 2)[0] != build("a", 1)[0]


# ---- prepare_data round trips -----------------------------------------------------------------

def test_txt_round_trip(tmp_path, capsys):
    paragraphs = ["First document.\nIt has two lines.", "Second: 17+25=42.", "Dritte \u00fcbung \u2713"]
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(paragraphs) + "\n\n\n", encoding="utf-8")
    prefix = str(tmp_path / "out" / "corpus")
    rc, out, err = run_main(["--input", str(src), "--output-prefix", prefix, "--tokenizer", "byte",
                             "--append-eod"], capsys)
    assert rc == 0, err
    ds, got = read_indexed(prefix)
    tok = ByteTokenizer()
    assert got == [tok.encode(p) + [tok.eod] for p in paragraphs]
    assert [tok.decode(ids) for ids in got] == paragraphs
    assert ds.index.dtype == np.uint16
    assert list(ds.document_indices) == [0, 1, 2, 3]
    assert "3 documents" in out
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus.bin", "corpus.idx"]  # no temp files

    # --txt-split file keeps the file byte for byte as one document.
    rc, _, err = run_main(["--input", str(src), "--output-prefix", str(tmp_path / "whole"),
                           "--txt-split", "file", "--quiet"], capsys)
    assert rc == 0, err
    _, got = read_indexed(str(tmp_path / "whole"))
    assert len(got) == 1 and tok.decode(got[0]) == src.read_text(encoding="utf-8")


def test_jsonl_custom_key(tmp_path, capsys):
    rows = [{"id": 1, "body": "alpha beta"}, {"body": "\u00e9t\u00e9 \u2603", "meta": {"x": 1}},
            {"body": ""}, {"body": "gamma"}]
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n"
                   + "\n".join(json.dumps(r) for r in rows[2:]) + "\n")
    prefix = str(tmp_path / "rows")
    rc, out, err = run_main(["--input", str(src), "--json-key", "body", "--output-prefix", prefix],
                            capsys)
    assert rc == 0, err
    _, got = read_indexed(prefix)
    # Without --append-eod the empty document has no tokens and is skipped.
    assert got == [list(r["body"].encode()) for r in rows if r["body"]]
    assert "3 documents" in out and "skipped 1 empty" in out


BAD_CASES = {
    "missing_file": (None, [], "input file not found"),
    "bad_json": ('{"text": "ok"}\n{"text": "fine"}\n{"text": broken}\n', [],
                 "bad.jsonl:3: invalid JSON"),
    "missing_key": ('{"text": "ok"}\n{"body": "x"}\n', [],
                    "bad.jsonl:2: no key 'text' in the JSON object (its keys: 'body')"),
    "wrong_key": ('{"text": "ok"}\n', ["--json-key", "content"], "bad.jsonl:1: no key 'content'"),
    "not_string": ('{"text": ["a"]}\n', [], "bad.jsonl:1: the value of 'text' is list, expected a string"),
    "not_object": ('["text"]\n', [], "bad.jsonl:1: expected a JSON object per line, got list"),
    "empty": ("", [], "no documents to write: the input is empty"),
    "only_blank_lines": ("\n  \n\n", [], "no documents to write"),
    "bad_utf8": (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', [], "bad.jsonl:2: not valid UTF-8"),
    "unknown_tokenizer": ('{"text": "ok"}\n', ["--tokenizer", "llama"], "unknown tokenizer spec 'llama'"),
    "missing_tokenizer_file": ('{"text": "ok"}\n', ["--tokenizer", "nope/tokenizer.json"],
                               "tokenizer file not found: nope/tokenizer.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gives_one_clear_error_and_no_output(case, tmp_path, capsys):
    content, extra, message = BAD_CASES[case]
    src = tmp_path / "bad.jsonl"
    if content is not None:
        src.write_bytes(content if isinstance(content, bytes) else content.encode())
    out_dir = tmp_path / "out" / "nested"
    rc, out, err = run_main(["--input", str(src), "--output-prefix", str(out_dir / "ds"), *extra],
                            capsys)
    assert rc == 2
    assert message in err, err
    assert err.startswith("prepare_data: error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # not even the directories it would have created


def test_failed_run_keeps_previous_dataset(tmp_path, capsys):
    prefix = str(tmp_path / "ds")
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "keep me"}\n')
    assert run_main(["--input", str(good), "--output-prefix", prefix, "--quiet"], capsys)[0] == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("ds.bin", "ds.idx")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n' * 300 + "{oops\n")  # fails after a batch was already written
    rc, _, err = run_main(["--input", str(bad), "--output-prefix", prefix], capsys)
    assert rc == 2 and "bad.jsonl:301: invalid JSON" in err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "ds.bin", "ds.idx", "good.jsonl"]
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_cli_exit_status(tmp_path):
    cmd = [sys.executable, "-m", "launch.prepare_data", "--output-prefix", str(tmp_path / "x")]
    res = subprocess.run(cmd + ["--input", str(tmp_path / "missing.jsonl")], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == f"prepare_data: error: input file not found: {tmp_path / 'missing.jsonl'}"
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "one of the arguments --input --embedded is required" in res.stderr


# ---- GPT datasets and batches -----------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded_prefix(tmp_path_factory):
    return ensure_embedded_dataset(str(tmp_path_factory.mktemp("embedded")), num_docs=300, seed=11)


def test_ensure_embedded_dataset_is_cached_and_concurrency_safe(tmp_path):
    results, errors = [], []

    def call():
        try:
            results.append(ensure_embedded_dataset(str(tmp_path), num_docs=120, seed=2))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    prefix = results[0]
    assert sorted(os.listdir(tmp_path)) == [".embedded.lock"] + sorted(
        os.path.basename(prefix) + ext for ext in (".bin", ".idx"))
    mtime = os.path.getmtime(prefix + ".bin")
    assert ensure_embedded_dataset(str(tmp_path), num_docs=120, seed=2) == prefix
    assert os.path.getmtime(prefix + ".bin") == mtime
    _, docs = read_indexed(prefix)
    tok = ByteTokenizer()
    assert [tok.decode(d) for d in docs] == build_embedded_corpus(120, seed=2)
    assert all(d[-1] == tok.eod for d in docs)


def test_gpt_dataset_samples(embedded_prefix):
    seq_len = 32
    train, valid = build_datasets(embedded_prefix, seq_len, {"train": 100, "valid": 20}, seed=5,
                                  tokenizer="byte")
    assert len(train) >= 100 and len(valid) >= 20
    for ds in (train, valid):
        for i in (0, 1, len(ds) - 1):
            s = ds[i]
            assert s["tokens"].shape == (seq_len,) and s["labels"].shape == (seq_len,)
            assert s["tokens"].dtype == torch.int64 and s["labels"].dtype == torch.int64
            assert torch.equal(s["tokens"][1:], s["labels"][:-1])
            assert int(s["tokens"].max()) < 256 and bool((s["loss_mask"] == 1).all())

    # Same arguments (now from Megatron's index cache): same samples; another seed: another order.
    again, _ = build_datasets(embedded_prefix, seq_len, {"train": 100, "valid": 20}, seed=5,
                              tokenizer=ByteTokenizer())
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(10))
    other, _ = build_datasets(embedded_prefix, seq_len, {"train": 100, "valid": 20}, seed=6)
    assert any(not torch.equal(train[i]["tokens"], other[i]["tokens"]) for i in range(10))
    cache = os.path.join(os.path.dirname(embedded_prefix), "index-cache")
    assert any(name.endswith("GPTDataset-train-shuffle_index.npy") for name in os.listdir(cache))

    masked, none = build_datasets(embedded_prefix, seq_len, {"train": 10}, seed=5, eod_mask_loss=True)
    assert none is None
    # Megatron masks the positions whose *input* is EOD (the guess of the next document's start).
    s = next(masked[i] for i in range(len(masked)) if (masked[i]["tokens"] == 255).any())
    assert torch.equal(s["loss_mask"] == 0, s["tokens"] == 255)


def test_build_datasets_errors(tmp_path, embedded_prefix):
    with pytest.raises(FileNotFoundError, match=r"nope\.idx not found; write one with"):
        build_datasets(str(tmp_path / "nope"), 16, {"train": 4}, seed=0)
    tiny = ensure_embedded_dataset(str(tmp_path), num_docs=10, seed=0)
    with pytest.raises(ValueError, match="the valid split gets no tokens"):
        build_datasets(tiny, 16, {"train": 4, "valid": 4}, seed=0)
    with pytest.raises(ValueError, match="keys 'train' and optionally 'valid'"):
        build_datasets(embedded_prefix, 16, {"train": 4, "test": 1}, seed=0)


def test_batch_iterator_resume_and_data_parallel(embedded_prefix):
    train, valid = build_datasets(embedded_prefix, 16, {"train": 64, "valid": 8}, seed=1)
    it = BatchIterator(train, micro_batch_size=2)
    batches = [next(it) for _ in range(5)]
    assert it.next_sample == 10
    b = batches[0]
    assert set(b) == {"tokens", "labels", "loss_mask"}
    assert b["tokens"].shape == (2, 16) and b["tokens"].dtype == torch.long
    assert torch.equal(b["tokens"], torch.stack([train[0]["tokens"], train[1]["tokens"]]))
    assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])

    # Resume from a saved position gives exactly the batches that followed.
    resumed = BatchIterator(train, 2, start_sample=6)
    for expected in batches[3:]:
        got = next(resumed)
        assert all(torch.equal(got[k], expected[k]) for k in expected)

    # Data-parallel ranks together see the single-process batch of micro_batch * world samples.
    ranks = [BatchIterator(train, 1, rank=r, world=2) for r in range(2)]
    for expected in batches[:3]:
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p["tokens"] for p in parts]), expected["tokens"])
    assert ranks[0].next_sample == ranks[1].next_sample == 6

    # loop=False stops before an incomplete batch; loop=True wraps around deterministically.
    n = len(valid)
    finite = list(BatchIterator(valid, 3, loop=False))
    assert len(finite) == n // 3
    wrap = BatchIterator(valid, 3, start_sample=n - 1)
    assert torch.equal(next(wrap)["tokens"][1], valid[0]["tokens"])
    with pytest.raises(ValueError, match="rank < world"):
        BatchIterator(train, 2, rank=2, world=2)
