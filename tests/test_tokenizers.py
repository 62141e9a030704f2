"""Tokenizers from local files (`--tokenizer`, a tokenizer beside the checkpoint) and the
tokenizer a UNITER checkpoint gets: the world's only for the world's vocabulary, else
bert-base-cased, never silently the wrong one. No test reaches a model hub."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
from torch import nn
from uniter_release import write_uniter_checkpoint

import vl_prune_plugins.backbones.uniter as uniter_module
from vl_prune.backbone import Inputs
from vl_prune.errors import VLPruneError
from vl_prune.tokenizers import beside, local_tokenizer
from vl_prune_plugins.backbones.uniter import Uniter
from vl_prune_plugins.world.vocabulary import words

# A WordPiece vocabulary with a cased and a lowercased word: which id "Hello" gets tells whether
# the text was lowercased.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello", "world", "##s", "!"]
CASED_HELLO, LOWER_HELLO = VOCAB.index("Hello"), VOCAB.index("hello")
# The released checkpoint's vocabulary (bert-base-cased) at tiny widths.
SMALL = dict(hidden=32, layers=1, heads=2, intermediate=64, img_dim=40, max_position=64)


def write_vocab(path: Path, tokens: list[str] = VOCAB) -> Path:
    path.write_text("\n".join(tokens) + "\n")
    return path


def ids(tokenizer, text: str = "Hello worlds!") -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty hub cache: nothing can come from the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def bert_sized(tmp_path_factory) -> Path:
    """A checkpoint in UNITER's release layout with bert-base-cased's 28996 words, alone in
    its folder."""
    path = tmp_path_factory.mktemp("bert-sized") / "uniter-small.pt"
    write_uniter_checkpoint(path, vocab=28996, **SMALL)
    return path


# local_tokenizer -----------------------------------------------------------------------------


def test_vocab_txt_is_read_cased_or_lowercased_as_asked(tmp_path):
    vocab = write_vocab(tmp_path / "vocab.txt")
    cased = local_tokenizer(vocab, lowercase=False)
    assert cased.vocab_size == len(VOCAB), "every word of vocab.txt, not only the specials"
    assert ids(cased) == [CASED_HELLO, 7, 8, 9]
    lowered = local_tokenizer(vocab, lowercase=True)
    assert ids(lowered) == [LOWER_HELLO, 7, 8, 9]
    # BERT's pair layout, with the vocabulary's own special ids.
    assert cased("Hello", "world")["input_ids"] == [2, CASED_HELLO, 3, 7, 3]
    assert cased.mask_token_id == 4


def test_folder_with_only_vocab_txt_is_read_like_the_file(tmp_path):
    write_vocab(tmp_path / "vocab.txt")
    assert ids(local_tokenizer(tmp_path, lowercase=False))[0] == CASED_HELLO
    assert ids(local_tokenizer(tmp_path, lowercase=True))[0] == LOWER_HELLO
    assert local_tokenizer(tmp_path, lowercase=False).vocab_size == len(VOCAB)


@pytest.mark.parametrize("lowercase", [False, True])
def test_saved_tokenizer_folder_keeps_its_own_settings(tmp_path, lowercase):
    from transformers import BertTokenizerFast

    built = BertTokenizerFast(
        vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=lowercase
    )
    built.save_pretrained(tmp_path / "saved")
    # The folder says how it tokenizes; the flag (how a bare vocab.txt is read) does not apply.
    loaded = local_tokenizer(tmp_path / "saved", lowercase=not lowercase)
    assert ids(loaded) == ids(built) == [LOWER_HELLO if lowercase else CASED_HELLO, 7, 8, 9]
    assert loaded("Hello", "world")["input_ids"] == built("Hello", "world")["input_ids"]


def test_folder_without_tokenizer_files_names_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(VLPruneError) as error:
        local_tokenizer(tmp_path, lowercase=False)
    message = str(error.value)
    assert message.startswith(f"--tokenizer {tmp_path}: no tokenizer.json")
    assert "vocab.txt" in message and "\n" not in message


def test_missing_tokenizer_path_is_a_clear_error(tmp_path):
    with pytest.raises(VLPruneError, match=r"^--tokenizer .*nothing-here: no such file or folder"):
        local_tokenizer(tmp_path / "nothing-here", lowercase=False)


def test_unreadable_tokenizer_file_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ not json")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    with pytest.raises(VLPruneError) as error:
        local_tokenizer(tmp_path, lowercase=False)
    assert str(error.value).startswith(f"--tokenizer {tmp_path}: not a readable tokenizer")
    assert "\n" not in str(error.value)


def test_beside_finds_a_tokenizer_kept_with_the_weights(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"")
    assert beside(weights) is None
    write_vocab(tmp_path / "vocab.txt")
    assert beside(weights) == tmp_path
    assert beside(tmp_path) == tmp_path


# The tokenizer of a UNITER checkpoint ----------------------------------------------------------


def test_bert_sized_checkpoint_never_gets_the_world_tokenizer(bert_sized, offline):
    backbone = Uniter.build(checkpoint=bert_sized)
    assert backbone.vocab_size == 28996
    with pytest.raises(VLPruneError) as error:
        backbone.tokenizer  # noqa: B018
    message = str(error.value)
    assert "--tokenizer" in message and "bert-base-cased" in message
    assert "\n" not in message


def test_vocab_beside_the_checkpoint_is_its_tokenizer(bert_sized, offline, tmp_path):
    folder = tmp_path / "with-vocab"
    folder.mkdir()
    checkpoint = folder / bert_sized.name
    checkpoint.write_bytes(bert_sized.read_bytes())
    write_vocab(folder / "vocab.txt")
    backbone = Uniter.build(checkpoint=checkpoint)
    assert backbone.tokenizer.vocab_size == len(VOCAB)
    assert ids(backbone.tokenizer)[0] == CASED_HELLO, "UNITER's vocabulary is cased"
    inputs = Uniter.inputs(checkpoint=checkpoint)
    assert ids(inputs.tokenizer) == ids(backbone.tokenizer)


def test_use_tokenizer_overrides_the_default(bert_sized, offline, tmp_path):
    other = write_vocab(tmp_path / "other.txt", [*VOCAB[:5], "Hi", "Hello"])
    backbone = Uniter.build(checkpoint=bert_sized)
    backbone.use_tokenizer(other)
    assert ids(backbone.tokenizer, "Hello") == [6]
    # Inputs read with the same tokenizer as the backbone that trains.
    inputs = Uniter.inputs(checkpoint=bert_sized, tokenizer=other)
    assert ids(inputs.tokenizer, "Hello") == [6]


def test_world_vocabulary_gets_the_world_tokenizer_and_nothing_else_does(offline, tmp_path):
    world = len(words())
    write_uniter_checkpoint(tmp_path / "world.pt", vocab=world, **SMALL)
    tokenizer = Uniter.build(checkpoint=tmp_path / "world.pt").tokenizer
    assert tokenizer.vocab_size == world
    assert tokenizer("circle square", add_special_tokens=False)["input_ids"] == [5, 6]
    write_uniter_checkpoint(tmp_path / "one-more.pt", vocab=world + 1, **SMALL)
    with pytest.raises(VLPruneError, match="--tokenizer"):
        Uniter.build(checkpoint=tmp_path / "one-more.pt").tokenizer  # noqa: B018


# Uniter.inputs: the checkpoint's shapes, no weights ----------------------------------------


def test_inputs_reads_only_the_checkpoints_shapes(bert_sized, offline, monkeypatch):
    reads = []
    read = uniter_module.read_state_dict

    def spy(path, shapes_only=False):
        state = read(path, shapes_only)
        reads.append((shapes_only, {v.device.type for v in state.values()}))
        return state

    def no_model(*args, **kwargs):
        raise AssertionError("inputs built a model")

    monkeypatch.setattr(uniter_module, "read_state_dict", spy)
    monkeypatch.setattr(Uniter, "__init__", no_model)
    inputs = Uniter.inputs(checkpoint=bert_sized)
    assert reads == [(True, {"meta"})]
    assert isinstance(inputs, Inputs) and not isinstance(inputs, nn.Module)
    assert (inputs.label, inputs.image_input) == ("uniter-base", "regions")
    assert (inputs.img_dim, inputs.vocab_size) == (SMALL["img_dim"], 28996)


def test_inputs_of_a_safetensors_checkpoint_and_of_a_preset(tmp_path, offline):
    from safetensors.torch import save_file

    state = write_uniter_checkpoint(tmp_path / "c.pt", vocab=300, **SMALL)
    save_file(state, tmp_path / "c.safetensors")
    inputs = Uniter.inputs(checkpoint=tmp_path / "c.safetensors")
    assert (inputs.img_dim, inputs.vocab_size) == (SMALL["img_dim"], 300)
    tiny = Uniter.inputs("tiny")
    assert (tiny.label, tiny.img_dim, tiny.vocab_size) == ("uniter-tiny", 64, len(words()))
    assert tiny.tokenizer.vocab_size == len(words())


def test_inputs_tokenizer_is_loaded_only_when_asked(bert_sized, offline, tmp_path):
    inputs = Uniter.inputs(checkpoint=bert_sized)  # no tokenizer anywhere: no error yet
    assert inputs.vocab_size == 28996
    with pytest.raises(VLPruneError, match="--tokenizer"):
        inputs.tokenizer  # noqa: B018
    missing = Uniter.inputs(checkpoint=bert_sized, tokenizer=tmp_path / "absent")
    with pytest.raises(VLPruneError, match=r"^--tokenizer .*absent: no such file or folder"):
        missing.tokenizer  # noqa: B018
