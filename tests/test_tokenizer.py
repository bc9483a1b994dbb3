from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtool.errors import LmtoolError
from lmtool.tokenizer import EOS, EOS_ID, UNK, UNK_ID, Tokenizer


def test_char_level_tokens_are_code_points_and_lines_end_with_eos():
    tok = Tokenizer.build(["héllo", "wörld 🙂"], level="char")
    ids = tok.encode_line("hé🙂")
    assert ids[-1] == EOS_ID
    assert [tok.tokens[i] for i in ids[:-1]] == ["h", "é", "🙂"]  # one token per code point, not per byte


def test_word_level_splits_on_whitespace_and_decodes_eos_as_newline():
    tok = Tokenizer.build(["the cat sat", "the  dog\tran"], level="word")
    ids = tok.encode("the cat\nthe dog")
    assert ids[2] == EOS_ID
    assert tok.decode(ids) == "the cat\nthe dog"
    assert tok.split("a  b\tc") == ["a", "b", "c"]


def test_unknown_tokens_become_unk_and_lowercasing_is_optional():
    tok = Tokenizer.build(["The cat"], level="word", lowercase=True)
    assert tok.encode("THE dog") == [tok.token_id("the"), UNK_ID]
    cased = Tokenizer.build(["The cat"], level="word")
    assert cased.encode("the") == [UNK_ID]


def test_min_freq_and_max_size_limit_the_vocabulary():
    lines = ["a a a b b c"]
    assert Tokenizer.build(lines, level="word", min_freq=2).tokens == (EOS, UNK, "a", "b")
    assert Tokenizer.build(lines, level="word", max_size=3).tokens == (EOS, UNK, "a")
    # frequency order, ties broken by the token so the ids are reproducible
    assert Tokenizer.build(["z y x x"], level="word").tokens == (EOS, UNK, "x", "y", "z")


def test_literal_unknown_marker_maps_to_unk_and_is_not_a_type():
    tok = Tokenizer.build(["the <unk> sat", "a <unk>"], level="word", unk_marker="<unk>")
    assert "<unk>" not in tok.tokens
    assert tok.encode("the <unk>") == [tok.token_id("the"), UNK_ID]
    plain = Tokenizer.build(["the <unk> sat"], level="word", unk_marker=None)
    assert "<unk>" in plain.tokens


def test_round_trip_through_plain_dict():
    tok = Tokenizer.build(["to be or not"], level="word", lowercase=True, unk_marker="<unk>")
    again = Tokenizer.from_dict(tok.to_dict())
    assert again == tok
    assert again.encode("to be <unk>") == tok.encode("to be <unk>")


@pytest.mark.parametrize("bad", [{}, {"level": "char", "tokens": ["a"]}, {"level": "byte", "tokens": [EOS, UNK]}, None])
def test_malformed_vocabulary_is_refused(bad):
    with pytest.raises(LmtoolError, match="vocabulary is malformed"):
        Tokenizer.from_dict(bad)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_char_decode_encode_is_identity_for_in_vocabulary_text(text):
    tok = Tokenizer.build(text.split("\n"), level="char")
    assert tok.decode(tok.encode(text)) == text


words = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(words, max_size=6), min_size=1, max_size=6))
def test_word_decode_encode_is_identity_for_normalised_text(lines):
    lines = [[w for w in line if w.split() == [w] and w not in (EOS, UNK)] for line in lines]
    text = "\n".join(" ".join(line) for line in lines)
    tok = Tokenizer.build(text.split("\n"), level="word")
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("lowercase", [False, True])
def test_literal_special_words_are_unknown_not_line_ends(lowercase):
    # lowercased, "<EOS>" was the ordinary word "<eos>": in the vocabulary, scored as known, sampled
    tok = Tokenizer.build(["a <EOS> b <UNK>", "A <EOS>"], level="word", lowercase=lowercase)
    assert tok.tokens[2:] == (("a",) if lowercase else ("A", "a")) + ("b",)
    assert tok.encode("a <EOS> b") == [tok.token_id("a"), UNK_ID, tok.token_id("b")]
    assert tok.encode_lines_text("a <EOS> b\n").tolist() == [tok.token_id("a"), UNK_ID, tok.token_id("b"), EOS_ID]
    assert tok.token_id("<EOS>") == tok.token_id("<eos>" if lowercase else "<UNK>") == UNK_ID


def test_a_vocabulary_saved_with_a_lowercased_special_as_a_word_keeps_it():
    # built before lowercased specials were read as <UNK>: its "<eos>" has an id and a trained embedding
    old = Tokenizer.from_dict({"level": "word", "lowercase": True, "tokens": [EOS, UNK, "the", "<eos>", "cat"]})
    assert old.encode_line("the <EOS> cat") == [2, 3, 4, EOS_ID]
    assert old.encode_lines_text("THE <EOS> <UNK>\n").tolist() == [2, 3, UNK_ID, EOS_ID]


def test_char_vocabulary_with_a_multi_character_token_is_refused():
    with pytest.raises(LmtoolError, match="malformed"):
        Tokenizer.from_dict({"level": "char", "tokens": [EOS, UNK, "ab"]})


@settings(max_examples=60)
@given(
    st.text(alphabet=st.characters(max_codepoint=0x7F, blacklist_categories=("Cs",)), max_size=40),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200),
    st.booleans(),
)
def test_vectorised_char_encoding_equals_the_per_token_encoding(vocabulary_text, text, lowercase):
    # ASCII pieces take a byte-translation path and the others a code-point table: both must agree with
    # the plain per-character lookup, unknown characters and lowercasing included.
    tok = Tokenizer.build([vocabulary_text], level="char", lowercase=lowercase)
    for piece in (text, text.encode("ascii", "ignore").decode()):
        piece = piece.replace("\r", "") + "\n"
        expected = tok.encode(piece)
        assert tok.encode_lines_text(piece).tolist() == expected
        counts = Counter()
        tok.count_into(counts, piece)
        assert counts == Counter(c for c in (piece.lower() if lowercase else piece) if c != "\n")


def test_the_unknown_marker_is_lowercased_with_the_text():
    """With data.lowercase on, a marker written in capitals still marks unknown words, in the vocabulary and in
    both encoders."""
    tok = Tokenizer.build(["the <UNK> sat", "the cat"], level="word", lowercase=True, unk_marker="<UNK>")
    assert "<unk>" not in tok.tokens and "<UNK>" not in tok.tokens[2:]
    assert tok.encode_line("The <UNK> cat") == [tok.token_id("the"), UNK_ID, tok.token_id("cat"), EOS_ID]
    assert tok.encode_lines_text("The <UNK> cat\n").tolist() == tok.encode_line("The <UNK> cat")
