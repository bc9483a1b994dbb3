import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmtool.data import batchify, encode_lines, fit_batch_size, held_out_lines, load_corpus, windows
from lmtool.text_files import read_text
from lmtool.errors import LmtoolError
from lmtool.tokenizer import EOS_ID, UNK_ID, Tokenizer


def test_batchify_makes_contiguous_rows_and_trims_only_the_tail():
    stream = torch.arange(23, dtype=torch.int32)
    rows = batchify(stream, 4)
    assert rows.shape == (4, 5)
    assert rows[1].tolist() == [5, 6, 7, 8, 9]  # each row is a contiguous piece of the stream
    assert rows.flatten().tolist() == list(range(20))  # nothing lost but the last 23 % 4 tokens


def test_windows_targets_are_inputs_shifted_by_one_and_cover_every_position():
    rows = batchify(torch.arange(2 * 11, dtype=torch.int32), 2)  # (2, 11)
    seen_x, seen_y = [], []
    for x, y in windows(rows, bptt=4):
        assert x.shape == y.shape and x.shape[1] <= 4
        assert torch.equal(x + 1, y)
        for view in (x, y):  # views, not copies: the rows' own memory
            assert view.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()
        seen_x.append(x)
        seen_y.append(y)
    assert torch.cat(seen_x, 1)[0].tolist() == list(range(10))
    assert torch.cat(seen_y, 1)[0].tolist() == list(range(1, 11))
    assert [x.shape[1] for x in seen_x] == [4, 4, 2]


def test_vocabulary_comes_from_training_split_only(tmp_path):
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("the cat sat\nthe dog\n")
    valid.write_text("the zebra\n")
    corpus = load_corpus(train, valid, None, "word", 1, None, False, None, 0.1)
    assert "zebra" not in corpus.tokenizer.tokens
    assert corpus.valid.tolist() == [EOS_ID, corpus.tokenizer.token_id("the"), UNK_ID, EOS_ID]
    assert corpus.valid.dtype == torch.uint8  # 6 types: one byte a token


def test_held_out_validation_is_the_contiguous_tail_and_rare_train_words_become_unk(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a a b\na a c\na a d\nlast line\n")
    with pytest.warns(UserWarning, match=r"^33% of the training split's words are outside its vocabulary"):
        corpus = load_corpus(path, None, None, "word", 2, None, False, None, 0.25)
    assert corpus.tokenizer.tokens[2:] == ("a",)
    assert corpus.train.tolist().count(UNK_ID) == 3  # b, c, d: <UNK> gets a trained probability
    assert corpus.valid.tolist() == [EOS_ID, UNK_ID, UNK_ID, EOS_ID]  # "last line" held out at the end
    assert held_out_lines(10, 0.2) == 2 and held_out_lines(10, 0.001) == 1 and held_out_lines(2, 0.9) == 1


def test_a_blank_validation_tail_is_refused_for_a_new_run_but_kept_by_one_resumed(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a b\nb a\na a\n\n")
    with pytest.raises(LmtoolError, match=r"validation split of .* \(its last 1 line\) holds only blank lines"):
        load_corpus(path, None, None, "word", 1, None, False, None, 0.25)
    # a run started before the check (its tokenizer saved) still resumes on the same splits
    tokenizer = Tokenizer.build(["a b", "b a", "a a"], level="word")
    corpus = load_corpus(path, None, None, "word", 1, None, False, None, 0.25, tokenizer=tokenizer)
    assert corpus.valid.tolist() == [EOS_ID, EOS_ID]


def test_lone_carriage_returns_are_not_line_ends_and_say_so(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"a b\rb a\ra a\r\nb b\rb a\ra b\r\n")  # CRLF ends two lines; the lone CRs end none
    with pytest.warns(UserWarning, match=r"reads as 2 lines; it holds 4 lone carriage returns \(\\r, old Mac"):
        corpus = load_corpus(path, None, None, "word", 1, None, False, None, 0.5)
    assert corpus.valid.tolist().count(EOS_ID) == 2  # the sentence start and one line end: one line held out
    path.write_bytes(b"a b\r\nb a\r\n")  # Windows line ends alone: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_corpus(path, None, None, "word", 1, None, False, None, 0.5)


def test_a_vocabulary_that_leaves_most_tokens_out_is_warned_about(tmp_path):
    """data.min_freq or data.max_size leaving over a quarter of the training tokens outside the vocabulary: a
    warning naming the share and both settings (training goes on). The text's own unknown markers do not count."""
    path = tmp_path / "w.txt"
    path.write_text("the a the b the c the d the e\n" * 4 + "the the\n")  # 'the' 22 times, a-e 4 times each
    for min_freq, max_size in ((5, None), (1, 3)):  # a vocabulary of <EOS>, <UNK> and 'the'
        expected = (rf"^48% of the training split's words are outside its vocabulary of 3 entries "
                    rf"\(data.min_freq={min_freq}, data.max_size={max_size or 'null'}\) and read as <UNK>; if that is "
                    r"not meant, lower data.min_freq or raise data.max_size$")
        with pytest.warns(UserWarning, match=expected):
            corpus = load_corpus(path, path, None, "word", min_freq, max_size, False, None, 0.0)
        assert len(corpus.tokenizer) == 3
    # the text's own <unk> markers (and written-out specials) count neither way: min_freq leaving out x, 3 of the
    # 15 other words, is nothing to say; leaving out x and z, 6 of 15, is (with the markers: 3 and 6 of 27)
    path.write_text("<unk> <unk> <unk> <UNK> x y y y y\n" * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corpus = load_corpus(path, path, None, "word", 4, None, False, "<unk>", 0.0)
    assert corpus.tokenizer.tokens[2:] == ("y",)
    path.write_text("<unk> <unk> <unk> <UNK> x y y y z\n" * 3)
    with pytest.warns(UserWarning, match="^40% of the training split's words are outside its vocabulary of 3 entries"):
        load_corpus(path, path, None, "word", 4, None, False, "<unk>", 0.0)


def test_an_empty_vocabulary_is_refused_before_the_text_is_encoded(tmp_path, monkeypatch):
    import lmtool.data

    path = tmp_path / "c.txt"
    path.write_text("a b\nb a\n<unk> <EOS>\n" * 20)
    monkeypatch.setattr(lmtool.data, "encode_stream", lambda *args: pytest.fail("encoded a corpus it refuses"))
    with pytest.raises(LmtoolError, match="empty vocabulary .*: every word occurs fewer than data.min_freq=100 times"):
        load_corpus(path, None, None, "word", 100, None, False, "<unk>", 0.1)
    path.write_text("<unk> <EOS>\n<UNK>\n" * 20)
    with pytest.raises(LmtoolError, match="its only words are literal <EOS>, <UNK> or data.unk_marker"):
        load_corpus(path, None, None, "word", 1, None, False, "<unk>", 0.1)


def test_encode_lines_appends_eos_per_line():
    tok = Tokenizer.build(["ab"], level="char")
    a, b = tok.token_id("a"), tok.token_id("b")
    # a leading <EOS>: the first token is predicted from the sentence-start context
    assert encode_lines(tok, ["ab", "b"]).tolist() == [EOS_ID, a, b, EOS_ID, b, EOS_ID]


def test_non_utf8_error_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf".encode() + b"\xe9 au lait\n")
    with pytest.raises(LmtoolError, match=r"latin1.txt.*not UTF-8.*0xe9 at offset 3"):
        read_text(path)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"  \n\t\n", "is empty"), (b"ab\x00cd", "binary")],
)
def test_unusable_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(LmtoolError, match=message):
        read_text(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LmtoolError, match="not found"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(LmtoolError, match="is a directory"):
        read_text(tmp_path)


def test_short_stream_shrinks_the_batch_with_a_warning_or_fails_with_the_minimum():
    assert fit_batch_size(1000, 8, 16, "training") == 8
    with pytest.warns(UserWarning, match="batch size 3 instead of 8"):
        assert fit_batch_size(7, 8, 16, "training") == 3
    with pytest.raises(LmtoolError, match=r"at least 2 are needed \(and 136"):
        fit_batch_size(1, 8, 16, "training")


def test_id_dtype_is_the_smallest_that_fits():
    from lmtool.tokenizer import id_dtype

    assert [id_dtype(n) for n in (66, 256, 257, 10_000, 32767, 33_278)] == [
        torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int16, torch.int32]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(alphabet="ab c\u00e9\U0001f600<>", max_size=12), max_size=8), st.sampled_from(["char", "word"]))
def test_vectorised_encoding_equals_line_by_line(lines, level):
    tok = Tokenizer.build(lines[: len(lines) // 2], level=level, unk_marker="<u>")
    text = "".join(line + "\n" for line in lines)
    expected = [i for line in lines for i in tok.encode_line(line)]
    assert tok.encode_lines_text(text).tolist() == expected


def test_chunked_reading_gives_the_same_corpus(tmp_path, monkeypatch):
    import lmtool.text_files as text_files

    path = tmp_path / "c.txt"
    path.write_text("".join(f"line {i} with words {i % 7}\r\n" for i in range(500)))
    whole = load_corpus(path, None, None, "word", 1, None, False, None, 0.1)
    monkeypatch.setattr(text_files, "CHUNK_BYTES", 64)  # many small pieces, split points inside pieces
    assert len(list(text_files.iter_text_chunks(path))) > 100
    chunked = load_corpus(path, None, None, "word", 1, None, False, None, 0.1)
    assert chunked.tokenizer == whole.tokenizer
    assert torch.equal(chunked.train, whole.train) and torch.equal(chunked.valid, whole.valid)
    assert whole.valid.tolist().count(EOS_ID) == 51  # 50 held-out lines + the leading <EOS>


def test_a_line_longer_than_many_blocks_is_read_whole(tmp_path):
    from lmtool.text_files import iter_text_chunks

    path = tmp_path / "long.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"x" * 50 + b"\r\nshort\nlast")  # BOM, CRLF, no final newline
    pieces = list(iter_text_chunks(path, "text", chunk_bytes=4))
    assert "".join(pieces) == "x" * 50 + "\nshort\nlast\n"
    assert all(p.endswith("\n") for p in pieces)


def test_a_binary_stream_is_refused_at_its_first_block_even_without_newlines():
    """A 1 GB file of zeros holds no newline: it must be refused from the first block, not read whole."""
    import io

    from lmtool.text_files import checked_chunks

    class Zeros(io.RawIOBase):
        reads = 0

        def read(self, size=-1):
            self.reads += 1
            assert self.reads == 1, "read past the first block"
            return b"text without a newline\x00" + bytes(size - 23)

    with pytest.raises(LmtoolError, match=r"zeros looks binary \(NUL byte at offset 22\)"):
        list(checked_chunks(Zeros(), "zeros", chunk_bytes=1 << 20))
