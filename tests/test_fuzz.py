"""Bounded fuzzing of what weightsteer reads from disk: adapter_config.json, the base's config.json, its shard
index and its safetensors headers. Whatever the bytes, a merge either succeeds or raises a WeightsteerError
with a message, never another exception; a refused merge writes nothing, and the base is never touched.

A fixed number of examples per target and no example database keep the run short and reproducible."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from safetensors.torch import load_file

import weightsteer
from conftest import make_adapter
from test_trust import fingerprint

EXAMPLES = 25
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))

scalars = st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=6)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def world(bases, tmp_path_factory):
    """A base with a shard index and an adapter on it; each example damages one file and puts it back."""
    root = tmp_path_factory.mktemp("fuzz")
    base = root / "base"
    shutil.copytree(bases("llama"), base)
    shard = (base / "model.safetensors").rename(base / "model-00001-of-00001.safetensors")  # read through the index
    names = list(load_file(shard))
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": {n: shard.name for n in names}})
    )
    adapter = make_adapter(base, root / "adapter", LoraConfig(r=4, target_modules=["q_proj"]))
    return root, base, adapter


def mutated(document: dict) -> st.SearchStrategy:
    """A JSON document replaced whole, or one of its keys (existing or new) set to any JSON value, or removed."""
    keys = st.sampled_from(sorted(document)) | st.text(max_size=6)
    changed = st.tuples(keys, json_values).map(lambda kv: {**document, kv[0]: kv[1]})
    removed = st.sampled_from(sorted(document)).map(lambda k: {n: v for n, v in document.items() if n != k})
    return json_values | changed | removed


def run_damaged(world, path: Path, content: bytes) -> None:
    root, base, adapter = world
    original = path.read_bytes()
    before = fingerprint(base)
    out = root / "out"
    path.write_bytes(content)
    try:
        weightsteer.merge(adapter, out, overwrite=True)
    except weightsteer.WeightsteerError as e:
        assert str(e).strip(), "an error without a message"
        assert not out.exists() and [p.name for p in root.iterdir() if p.name.startswith(".")] == []
    finally:
        path.write_bytes(original)
        shutil.rmtree(out, ignore_errors=True)
    assert fingerprint(base) == before


def _json_bytes(value) -> bytes:
    return json.dumps(value).encode()


def _document(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize(("folder", "name"), [(2, "adapter_config.json"), (1, "config.json")])
def test_fuzz_config(world, folder, name):
    path = world[folder] / name

    @FUZZ
    @given(mutated(_document(path)))
    def check(config):
        run_damaged(world, path, _json_bytes(config))

    check()


def test_fuzz_shard_index(world):
    path = world[1] / "model.safetensors.index.json"
    index = _document(path)
    weight_maps = mutated(index["weight_map"]).map(lambda m: {**index, "weight_map": m})

    @FUZZ
    @given(mutated(index) | weight_maps)
    def check(document):
        run_damaged(world, path, _json_bytes(document))

    check()


def test_fuzz_safetensors_header(world):
    path = world[1] / "model-00001-of-00001.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    entries = st.sampled_from(sorted(k for k in header if k != "__metadata__"))
    entry_changes = st.tuples(entries, mutated({"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})).map(
        lambda kv: {**header, kv[0]: {**header[kv[0]], **kv[1]} if isinstance(kv[1], dict) else kv[1]}
    )
    lengths = st.integers(0, 2**64 - 1)

    @FUZZ
    @given(mutated(header) | entry_changes, st.none() | lengths)
    def check(new_header, claimed_length):
        encoded = _json_bytes(new_header)
        prefix = struct.pack("<Q", len(encoded) if claimed_length is None else claimed_length)
        run_damaged(world, path, prefix + encoded + data[8 + length :])

    check()
