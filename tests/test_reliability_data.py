"""Data, tokenizer and device faults found at start-up (issue 10): nothing in the index cache is ever
unpickled, damaged datasets and missing devices are one line each before the process group and the
model exist, and silent surprises (a batch larger than the corpus, warm-up longer than the run, a
split that leaves validation empty) are a note or an error naming the setting."""
from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from config import ConfigError
from launch.data.datasets import build_datasets, ensure_embedded_dataset
from launch.data.indexed import DataError, read_index, split_documents
from launch.train import main
from launch.trainer import setup
from launch.trainer.preflight import preflight
from launch.trainer.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=256, hidden_size=32, num_layers=2, max_seq_len=64, num_heads=2, q_lora_rank=16,
             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, dense_ffn_size=64,
             num_experts=4, top_k=2, expert_ffn_size=16)


class _Plant:
    """Unpickling this creates `path`: the stand-in for code an attacker's pickle would run."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    d = str(tmp_path_factory.mktemp("corpora"))
    return {n: ensure_embedded_dataset(d, num_docs=n, seed=3) for n in (1, 10, 20, 300)}


def copy_dataset(prefix: str, dest: Path) -> str:
    for ext in (".bin", ".idx"):
        shutil.copyfile(prefix + ext, str(dest / "ds") + ext)
    return str(dest / "ds")


def write_recipe(tmp: Path, prefix: str, **over) -> Path:
    train = dict(steps=2, micro_batch_size=4, seq_len=32, device="cpu", out_dir=str(tmp / "run"), progress=False,
                 tensorboard=False, warmup_steps=1, eval_batches=1)
    data = dict(path=prefix, tokenizer="byte", cache_dir=str(tmp / "cache"))
    for key, value in over.items():
        section, name = key.split(".")
        (train if section == "train" else data)[name] = value
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "train": train, "data": data}))
    return path


# ---- item 1: the index cache is never unpickled -------------------------------------------------

def test_planted_pickle_in_the_index_cache_is_never_loaded(tmp_path, corpora):
    prefix, cache, marker = corpora[300], tmp_path / "cache", tmp_path / "pwned"
    build_datasets(prefix, 16, {"train": 8, "valid": 2}, seed=0, cache_dir=str(cache))
    planted = sorted(cache.glob("*.npy"))
    assert len(planted) == 6
    for path in planted:
        path.write_bytes(pickle.dumps(_Plant(str(marker))))
    with pytest.raises(DataError, match=r"-document_index\.npy: not a plain numpy index array \(it holds "
                                        r"pickled data\); refused unread"):
        build_datasets(prefix, 16, {"train": 8, "valid": 2}, seed=0, cache_dir=str(cache))
    assert not marker.exists()
    for path in planted:  # deleting the files, as the message says, rebuilds the cache
        path.unlink()
    train, _ = build_datasets(prefix, 16, {"train": 8, "valid": 2}, seed=0, cache_dir=str(cache))
    assert len(train) >= 8 and not marker.exists()


# ---- item 2: damaged data and missing devices, before anything runs -----------------------------

def test_a_bin_10_bytes_short_names_the_file_and_both_sizes(tmp_path, corpora):
    prefix = copy_dataset(corpora[300], tmp_path)
    size = os.path.getsize(prefix + ".bin")
    os.truncate(prefix + ".bin", size - 10)
    with pytest.raises(DataError) as e:  # Megatron itself would map the short file and train on it
        build_datasets(prefix, 16, {"train": 8, "valid": 2}, seed=0, cache_dir=str(tmp_path / "cache"))
    assert str(e.value).startswith(f"{prefix}.bin: {size - 10} bytes, but {prefix}.idx describes {size} ")


def test_data_is_checked_before_the_process_group_and_the_model(tmp_path, corpora, monkeypatch):
    reached = []
    monkeypatch.setattr(setup, "init_distributed", lambda *a, **k: reached.append("process group"))
    monkeypatch.setattr(setup, "build_model", lambda *a, **k: reached.append("model"))
    for over, field in [({"data.tokenizer": str(tmp_path / "missing.json")}, "data.tokenizer"),
                        ({"data.path": copy_dataset(corpora[10], tmp_path)}, "data.split")]:
        recipe = load_recipe(write_recipe(tmp_path, corpora[300], **over))
        with pytest.raises(ConfigError, match=f"^{field}: "):
            setup.build_context(recipe, log=False, measure_peak=False)
    assert reached == []


# ---- item 3: silent acceptance --------------------------------------------------------------------

def test_a_batch_larger_than_the_train_split_prints_how_often_it_repeats(tmp_path, corpora, capsys):
    lengths = read_index(corpora[20]).lengths
    beg, end = split_documents("50,50,0", 20)[0]
    tokens = int(lengths[beg:end].sum())
    mbs = 3 * tokens // 32 + 1  # just over three copies of the train split per step
    recipe = load_recipe(write_recipe(tmp_path, corpora[20], **{"data.split": "50,50,0",
                                                                "train.micro_batch_size": mbs}))
    setup.build_context(recipe, log=False, measure_peak=False)
    err = capsys.readouterr().err
    assert err == (f"note: one step reads {mbs * 32} tokens but the train split of {corpora[20]} holds {tokens}: "
                   f"each step repeats the data 3.0 times; use more data or a smaller train.micro_batch_size\n")
    preflight(load_recipe(write_recipe(tmp_path, corpora[20], **{"data.split": "50,50,0"})))
    assert capsys.readouterr().err == ""  # a batch inside the corpus: no note


def test_warmup_longer_than_the_run_is_rejected():
    recipe = ROOT / "configs" / "recipes" / "tiny_cpu.yaml"
    with pytest.raises(ConfigError, match=r"^train.warmup_steps: 11 exceeds steps=10; lower warmup_steps"):
        load_recipe(recipe, {"train.steps": 10, "train.warmup_steps": 11})
    assert load_recipe(recipe, {"train.steps": 10, "train.warmup_steps": 10}).train.warmup_steps == 10


def test_the_split_is_a_setting_and_errors_name_it(tmp_path, corpora):
    small = copy_dataset(corpora[10], tmp_path)
    with pytest.raises(ConfigError) as e:
        preflight(load_recipe(write_recipe(tmp_path, small)))
    message = str(e.value)
    assert message.startswith("data.split: '98,2,0': the valid split gets no tokens"), message
    suggested = re.search(r"use e\.g\. data\.split: (\S+),", message).group(1)
    recipe = load_recipe(write_recipe(tmp_path, small, **{"data.split": suggested}))
    preflight(recipe)
    _, valid = setup.build_data(recipe)
    assert len(valid().dataset) >= 1


@pytest.mark.parametrize("split", ["98,2,0", "94,6,0", "1,1,1", "100,0,0", "7.5,2.5", "969,30,1"])
@pytest.mark.parametrize("n", [1, 10, 37, 1000])
def test_split_documents_round_as_megatron_does(split, n):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    assert split_documents(split, n) == [None if b is None else (int(round(b[0] * float(n))),
                                                                 int(round(b[1] * float(n)))) for b in matrix]


# ---- the bad-input sweep: one line each, rc != 0 ---------------------------------------------------

class Case:
    """What a sweep case's set-up may use: its directory, its copy of the 300-document dataset,
    monkeypatch and the shared corpora."""

    def __init__(self, tmp: Path, ds: str, mp, corpora: dict) -> None:
        self.tmp, self.ds, self.mp, self.corpora = tmp, ds, mp, corpora


def _overwrite(path: str, offset: int, data: bytes) -> dict:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return {}


def _resize(path: str, delta: int) -> dict:
    os.truncate(path, os.path.getsize(path) + delta)
    return {}


def _random_file(path: Path, size: int) -> Path:
    path.write_bytes(np.random.default_rng(size).bytes(size))
    return path


def _hf_tokenizer(c: Case, vocab: dict) -> dict:
    from tokenizers import Tokenizer, models
    path = str(c.tmp / "tokenizer.json")
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(path)
    return {"data.tokenizer": path}


def _no_device(c: Case, device: str) -> dict:
    c.mp.setattr("parallel.device.npu_available", lambda: False)
    c.mp.setattr(torch.cuda, "is_available", lambda: False)
    return {"train.device": device}


def _planted_cache(c: Case) -> dict:
    setup.build_data(load_recipe(write_recipe(c.tmp, c.ds)))  # the cache the run itself will look up
    for path in (c.tmp / "cache").glob("*.npy"):
        path.write_bytes(pickle.dumps(_Plant(str(c.tmp / "pwned"))))
    return {}


SWEEP = {  # name: (set-up(Case) -> recipe overrides, start of the error line; {t} case dir, {d} dataset)
    "tokenizer_missing": (lambda c: {"data.tokenizer": str(c.tmp / "nope" / "tokenizer.json")},
                          "data.tokenizer: tokenizer file not found"),
    "tokenizer_garbage": (lambda c: {"data.tokenizer": str(_random_file(c.tmp / "tok.json", 300))},
                          "data.tokenizer: cannot load tokenizer file {t}/tok.json"),
    "tokenizer_dir_without_json": (lambda c: {"data.tokenizer": str(c.tmp)},
                                   "data.tokenizer: {t} is a directory without a tokenizer.json"),
    "tokenizer_unknown_spec": (lambda c: {"data.tokenizer": "gpt2"}, "data.tokenizer: unknown tokenizer spec 'gpt2'"),
    "tokenizer_without_eod": (lambda c: _hf_tokenizer(c, {"a": 0, "[UNK]": 1}),
                              "data.tokenizer: {t}/tokenizer.json: no end-of-document token found"),
    "tokenizer_bigger_than_model": (
        lambda c: _hf_tokenizer(c, {**{f"w{i}": i for i in range(298)}, "[UNK]": 298, "<|endoftext|>": 299}),
        "model.vocab_size: 256 is smaller than the tokenizer's 300 ids"),
    "bin_10_bytes_short": (lambda c: _resize(c.ds + ".bin", -10), "data.path: {d}.bin: "),
    "bin_10_bytes_long": (lambda c: _resize(c.ds + ".bin", 10), "data.path: {d}.bin: "),
    "bin_random": (lambda c: _random_file(Path(c.ds + ".bin"), 12345) and {}, "data.path: {d}.bin: 12345 bytes, but"),
    "idx_truncated": (lambda c: _resize(c.ds + ".idx", -100), "data.path: {d}.idx: "),
    "idx_random": (lambda c: _random_file(Path(c.ds + ".idx"), 5000) and {},
                   "data.path: {d}.idx: not a Megatron index file"),
    "idx_bad_token_type": (lambda c: _overwrite(c.ds + ".idx", 17, b"\x63"),
                           "data.path: {d}.idx: unknown index version 1 or token type code 99"),
    "idx_bad_version": (lambda c: _overwrite(c.ds + ".idx", 9, b"\x07"), "data.path: {d}.idx: unknown index version 7"),
    "idx_bad_offsets": (lambda c: _overwrite(c.ds + ".idx", 34 + 4 * 300 + 8, b"\x01"),
                        "data.path: {d}.idx: sequence lengths and byte offsets disagree"),
    "token_ids_beyond_the_tokenizer": (lambda c: _overwrite(c.ds + ".bin", 6, b"\xff\xff"),
                                       "data.path: {d}.bin: token id 65535 is outside the tokenizer's 256 ids"),
    "dataset_missing": (lambda c: {"data.path": str(c.tmp / "absent")},
                        "data.path: Megatron dataset {t}/absent.bin not found"),
    "npu_without_torch_npu": (lambda c: _no_device(c, "npu"), "train.device: npu, but torch_npu"),
    "cuda_without_cuda": (lambda c: _no_device(c, "cuda"), "train.device: cuda, but no CUDA device is visible"),
    "warmup_beyond_steps": (lambda c: {"train.warmup_steps": 3}, "train.warmup_steps: 3 exceeds steps=2"),
    "no_eval_batches": (lambda c: {"train.eval_batches": 0}, "train.eval_batches: must be >= 1, got 0"),
    "split_not_numbers": (lambda c: {"data.split": "abc"}, "data.split: 'abc': expected up to three"),
    "split_four_parts": (lambda c: {"data.split": "90,5,3,2"}, "data.split: '90,5,3,2': expected"),
    "split_negative": (lambda c: {"data.split": "-1,2,0"}, "data.split: '-1,2,0': expected"),
    "split_no_train": (lambda c: {"data.split": "0,100,0"}, "data.split: '0,100,0' gives the train part no weight"),
    "split_no_valid": (lambda c: {"data.split": "100,0,0"}, "data.split: '100,0,0': the valid split gets no tokens"),
    "corpus_of_10_documents": (lambda c: {"data.path": copy_dataset(c.corpora[10], c.tmp)},
                               "data.split: '98,2,0': the valid split gets no tokens ({t}/ds has 10 documents"),
    "corpus_of_1_document": (lambda c: {"data.path": copy_dataset(c.corpora[1], c.tmp)},
                             "data.split: '98,2,0': the valid split gets no tokens"),
    "cache_dir_under_a_file": (lambda c: (c.tmp / "f").write_text("x") and {"data.cache_dir": str(c.tmp / "f" / "c")},
                               "data.cache_dir: cannot create {t}/f/c"),
    "embedded_docs_zero": (lambda c: {"data.path": "embedded", "data.embedded_docs": 0},
                           "data.embedded_docs: must be >= 1, got 0"),
    "pickle_in_index_cache": (_planted_cache, "{t}/cache/"),
}


@pytest.mark.parametrize("case", sorted(SWEEP))
def test_bad_input_is_one_line(case, tmp_path, corpora, monkeypatch, capsys):
    prefix = copy_dataset(corpora[300], tmp_path)
    make, expected = SWEEP[case]
    path = write_recipe(tmp_path, prefix, **make(Case(tmp_path, prefix, monkeypatch, corpora)))
    capsys.readouterr()
    rc = main(["--recipe", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1, err
    assert err.startswith("error: " + expected.format(t=tmp_path, d=prefix)), err
    assert not (tmp_path / "pwned").exists()


def test_bf16_on_a_cpu_without_bf16_units_gets_one_note(monkeypatch, capsys):
    """bf16 autocast on a CPU without native bf16 GEMMs is several times slower than fp32: say so."""
    import moe_kernels.fast as fast
    from launch.trainer import preflight as pf
    monkeypatch.setattr(fast, "native_bf16_gemm", lambda device_type: False)
    pf._note_slow_bf16("bf16", "cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: train.dtype: bf16 on a CPU without native bf16")
    pf._note_slow_bf16("fp32", "cpu")
    monkeypatch.setattr(fast, "native_bf16_gemm", lambda device_type: True)
    pf._note_slow_bf16("bf16", "cpu")
    assert capsys.readouterr().err == ""
