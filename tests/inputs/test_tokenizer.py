import pytest

from muco.inputs.tokenizer import SpecialTokenIds, build_tokenizer, tokenizer_from_pretrained


def test_offline_qwen_vocab_ids(qwen_tok):
    assert qwen_tok("Hello world!", add_special_tokens=False).input_ids == [9707, 1879, 0]
    ids = SpecialTokenIds.from_tokenizer(qwen_tok)
    assert ids.image_pad == 151655
    assert ids.video_pad == 151656
    assert ids.vision_start == 151652 and ids.vision_end == 151653
    # the two MuCo tokens come right after the built-in vocabulary
    assert {ids.emb, ids.mask} == {151657, 151658}
    assert qwen_tok.convert_tokens_to_ids("<|endoftext|>") == 151643


def test_special_tokens_are_single_ids(qwen_tok, tiny_tok):
    for tok in (qwen_tok, tiny_tok):
        ids = SpecialTokenIds.from_tokenizer(tok)
        enc = tok("a<|emb|>b<|mask|>c<|image_pad|>", add_special_tokens=False).input_ids
        assert enc.count(ids.emb) == 1 and enc.count(ids.mask) == 1 and enc.count(ids.image_pad) == 1


def test_tiny_tokenizer_roundtrip(tiny_tok):
    text = "héllo <|emb|> wörld"
    ids = tiny_tok(text, add_special_tokens=False).input_ids
    assert tiny_tok.decode(ids) == text
    assert len(tiny_tok) < 300


def test_local_dir_route(tmp_path, tiny_tok):
    tiny_tok.save_pretrained(tmp_path / "tok")
    again = tokenizer_from_pretrained(tmp_path / "tok")
    assert SpecialTokenIds.from_tokenizer(again) == SpecialTokenIds.from_tokenizer(tiny_tok)
    assert build_tokenizer(str(tmp_path / "tok")).convert_tokens_to_ids("<|emb|>") == again.convert_tokens_to_ids(
        "<|emb|>"
    )


def test_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="local Qwen2-VL directory"):
        tokenizer_from_pretrained(tmp_path / "nope")
