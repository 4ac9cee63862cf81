"""What the loader reads from a model directory: EOS ids from every source, pad id, max length."""

from __future__ import annotations

import json
import shutil

import pytest

from tokenizer_svc.loader import load_tokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
         "generation_config.json")


@pytest.fixture
def model_copy(stories260k_dir, tmp_path):
    for name in FILES:
        shutil.copy(stories260k_dir / name, tmp_path / name)
    return tmp_path


def edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_eos_from_tokenizer_config_and_generation_config(model_copy):
    edit(model_copy / "config.json", eos_token_id=[2, 7], pad_token_id=0, max_position_embeddings=300)
    edit(model_copy / "generation_config.json", eos_token_id=[9, 2])
    # transformers' "no limit" sentinel: the model's context length applies instead.
    edit(model_copy / "tokenizer_config.json", model_max_length=int(1e30))
    tok = load_tokenizer(str(model_copy))
    assert tok.eos_token_ids == [2, 7, 9]  # tokenizer's </s>, then config.json, then generation_config
    assert tok.pad_token_id == 0 and tok.bos_token_id == 1 and tok.max_length == 300


def test_missing_directory_and_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises((OSError, ValueError)):
        load_tokenizer(str(tmp_path))
