"""Unit LMs: shapes, causality, hand-computed n-gram probabilities, log-likelihoods and batched scoring."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from spidr.lm.models import GptLM, LstmLM, NgramLM, token_log_likelihoods
from spidr.lm.score import score_sequences
from spidr.lm.tokens import LabelVocabulary, Vocabulary, read_unit_sequences

V = 12


def _models():
    torch.manual_seed(0)
    return [
        LstmLM(V, dim=16, num_layers=2, dropout=0.0, tie_embeddings=True),
        GptLM(V, dim=16, num_layers=2, num_heads=2, ffn_dim=32, context=32, dropout=0.0, activation="gelu",
              tie_embeddings=True),
    ]


@pytest.mark.parametrize("model", _models(), ids=["lstm", "gpt"])
def test_models_are_causal(model):
    model.eval()
    tokens = torch.randint(0, V, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % V
    logits, logits_changed = model(tokens), model(changed)
    assert logits.shape == (2, 10, V)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[:, :6], logits_changed[:, :6])
    assert not torch.allclose(logits[:, 6:], logits_changed[:, 6:])


@pytest.mark.parametrize("model", _models(), ids=["lstm", "gpt"])
def test_log_likelihoods_match_a_direct_computation_and_ignore_padding(model):
    model.eval()
    torch.manual_seed(1)
    short, long = torch.randint(0, V, (5,)), torch.randint(0, V, (9,))
    batch = torch.full((2, 9), V - 1)
    batch[0, :5], batch[1] = short, long
    values = token_log_likelihoods(model, batch, torch.tensor([5, 9]))
    alone = token_log_likelihoods(model, short[None], torch.tensor([5]))
    torch.testing.assert_close(values[0, :4], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.all(values[0, 4:] == 0)
    # log p(token_t | tokens_<t) by hand, one prefix at a time
    for t in range(1, 9):
        logits = model(long[None, :t])[0, -1]
        assert values[1, t - 1].item() == pytest.approx(logits.log_softmax(-1)[long[t]].item(), abs=1e-5)


def test_bigram_probabilities_by_hand():
    lm = NgramLM(4, order=2, add_k=0.5)
    lm.fit(torch.tensor([0, 1, 2, 0, 1, 3]))  # bigrams 01 12 20 01 13
    table = lm.log_probabilities().exp()
    # after 0: counts (0, 2, 0, 0) + 0.5 → 2.5 / 4 for token 1
    assert table[0, 1].item() == pytest.approx(2.5 / 4.0)
    assert table[1, 2].item() == pytest.approx(1.5 / 4.0)
    assert table[1, 3].item() == pytest.approx(1.5 / 4.0)
    assert table[3].sum().item() == pytest.approx(1.0)
    values = token_log_likelihoods(lm, torch.tensor([[0, 1, 3]]), torch.tensor([3]))
    assert values.sum().item() == pytest.approx(math.log(2.5 / 4) + math.log(1.5 / 4), abs=1e-6)
    unigram = NgramLM(4, order=1, add_k=1.0)
    unigram.fit(torch.tensor([0, 0, 1]))
    assert unigram.log_probabilities().exp()[0, 0].item() == pytest.approx(3 / 7)


class _HistoryLength(torch.nn.Module):
    """A 2-token "model" whose log p(token 0) at input position i tells i: logits (i / 2, 0)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        position = torch.arange(tokens.shape[1], dtype=torch.float32)
        return torch.stack([position / 2, torch.zeros_like(position)], dim=-1).expand(tokens.shape[0], -1, -1)


@pytest.mark.parametrize("context", [4, 7, 8])
def test_strided_scoring_gives_every_token_at_least_half_a_context_of_history(context):
    """Which window scores each target, read back from a model that reveals how many inputs it saw: the first
    window scores targets 1 … context with their whole history, every later target sees more than half a context
    and at most a whole one (a bigram, above, cannot tell how much history a window gave)."""
    length = 5 * context + 3
    values = token_log_likelihoods(_HistoryLength(), torch.zeros(1, length, dtype=torch.long),
                                   torch.tensor([length]), context=context)[0]
    probability = values.double().exp()
    history = ((probability / (1 - probability)).log() * 2).round().long() + 1  # inputs seen: position + 1
    targets = torch.arange(1, length)
    assert torch.equal(history[:context], targets[:context])
    assert (history[context:] > context // 2).all()
    assert (history[context:] <= context).all()


def test_strided_scoring_of_long_sequences_is_exact_for_a_bigram():
    """A bigram only looks one token back, so windowed scoring must equal scoring the whole sequence."""
    lm = NgramLM(V, order=2, add_k=0.1)
    lm.fit(torch.randint(0, V, (500,), generator=torch.Generator().manual_seed(0)))
    tokens = torch.randint(0, V, (2, 41), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([41, 30])
    whole = token_log_likelihoods(lm, tokens, lengths)
    for context in (4, 7, 16):
        torch.testing.assert_close(token_log_likelihoods(lm, tokens, lengths, context=context), whole)


def test_gpt_refuses_more_tokens_than_its_context():
    model = _models()[1]
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 33, dtype=torch.int64))


def test_scores_sum_and_mean_and_batching():
    torch.manual_seed(0)
    model = _models()[0].eval()
    vocab = Vocabulary(V - 3)
    rng = np.random.default_rng(0)
    sequences = {f"s{i}": rng.integers(0, V - 3, size=rng.integers(1, 30)) for i in range(40)}
    batched = score_sequences(model, vocab, sequences, batch_tokens=200)
    for stem in ("s0", "s7", "s31"):
        (alone,) = score_sequences(model, vocab, {stem: sequences[stem]}).values()
        assert batched[stem].logprob == pytest.approx(alone.logprob, abs=1e-4)
        assert batched[stem].num_tokens == len(sequences[stem]) + 1  # the units and EOS
        assert batched[stem].mean == pytest.approx(batched[stem].logprob / batched[stem].num_tokens)
        tokens = torch.from_numpy(vocab.encode(sequences[stem]))[None]
        direct = model(tokens[:, :-1]).log_softmax(-1).gather(-1, tokens[:, 1:, None]).sum().item()
        assert batched[stem].logprob == pytest.approx(direct, abs=1e-4)


@pytest.mark.parametrize("unit", [V - 3, V - 1, -1])
def test_scoring_refuses_a_unit_outside_the_lm_s_inventory(unit):
    """Ids num_units .. num_units + 2 are BOS/EOS/PAD: scored as units they gave a number with no error (and larger
    ids a bare IndexError)."""
    model = _models()[0].eval()
    vocab = Vocabulary(V - 3)
    with pytest.raises(ValueError, match=rf"item 'bad' holds unit {unit}: this LM knows units 0 to {V - 4}"):
        score_sequences(model, vocab, {"good": np.array([0, 1, 2]), "bad": np.array([1, unit, 2])})


def test_equal_sequences_tie_wherever_the_batches_are_cut():
    """A word and a nonword with the same units must tie (pair score ½): scored in two batches of different widths,
    the GPT's float rounding differed in the last digits (-5.616881461 vs -5.616881484), a pair score of 1."""
    torch.manual_seed(0)
    vocab = Vocabulary(200)
    model = GptLM(vocab.size, dim=64, num_layers=2, num_heads=4, ffn_dim=128, context=64, dropout=0.0,
                  activation="gelu", tie_embeddings=True).eval()
    rng = np.random.default_rng(1)
    same = rng.integers(0, 200, size=20)
    sequences = {f"a{i:02d}": rng.integers(0, 200, size=20) for i in range(15)}
    sequences |= {"b_nonword": same, "b_word": same.copy(), "z_word": same.copy()}
    sequences |= {f"c{i:02d}": rng.integers(0, 200, size=50) for i in range(15)}
    for dtype in ("float32", "bfloat16"):
        scores = score_sequences(model, vocab, sequences, context=64, batch_tokens=22 * 16, dtype=dtype)
        assert scores["b_word"] == scores["b_nonword"] == scores["z_word"]
        assert set(scores) == set(sequences)


def test_unit_files_are_read_keyed_by_stem_for_scoring_by_name_for_training_with_dedup(tmp_path):
    """Test items are keyed by file stem (a ZeroSpeech submission line's key); training data by the name as written:
    keyed by stem, the rows spk1/0001 and spk2/0001 that extract writes for two files of one id were refused."""
    units = tmp_path / "units.jsonl"
    units.write_text(json.dumps({"audio": "/data/spk/a.wav", "units": [3, 3, 1, 1, 1, 3]}) + "\n"
                     + json.dumps({"name": "spk/b", "units": [2]}) + "\n")
    read = read_unit_sequences(units, dedup=True, submission_names=True)
    assert read.kind == "units"
    assert sorted(read.sequences) == ["a", "b"]
    assert read.sequences["a"].tolist() == [3, 1, 3]
    assert read_unit_sequences(units, dedup=False, submission_names=True).sequences["a"].tolist() == [3, 3, 1, 1, 1,
                                                                                                       3]
    assert sorted(read_unit_sequences(units, dedup=True).sequences) == ["a", "spk/b"]  # (an audio row: its stem)
    with pytest.raises(ValueError, match="out of range"):
        read_unit_sequences(units, dedup=True, num_units=3)
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"name": "x", "phones": ["SIL", "K", "K", "AE", "SIL"]}) + "\n")
    read = read_unit_sequences(labels, dedup=True)
    # the file's labels and the ARPAbet-39 + SIL inventory, sorted
    assert len(read.labels.labels) == 40
    index = {label: i for i, label in enumerate(read.labels.labels)}
    assert read.sequences["x"].tolist() == [index["SIL"], index["K"], index["AE"], index["SIL"]]
    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"name": "y", "phones": ["spn", "K"]}) + "\n")
    assert "spn" in read_unit_sequences(custom, dedup=True).labels.labels
    with pytest.raises(ValueError, match="not in the LM's label set"):
        read_unit_sequences(labels, dedup=True, labels=LabelVocabulary(("K", "SIL")))
    with pytest.raises(ValueError, match="discrete units"):
        read_unit_sequences(units, dedup=True, labels=read.labels)
    twice = tmp_path / "twice.jsonl"
    twice.write_text(json.dumps({"name": "a/x", "units": [1]}) + "\n" + json.dumps({"name": "b/x", "units": [1]}))
    with pytest.raises(ValueError, match="appears twice"):
        read_unit_sequences(twice, dedup=True, submission_names=True)
    assert sorted(read_unit_sequences(twice, dedup=True).sequences) == ["a/x", "b/x"]
    twice.write_text(json.dumps({"name": "a/x", "units": [1]}) + "\n" + json.dumps({"name": "a/x", "units": [2]}))
    with pytest.raises(ValueError, match="appears twice"):
        read_unit_sequences(twice, dedup=True)


def test_unit_rows_are_checked_one_by_one_and_labels_numbered_as_the_sorted_vocabulary(tmp_path):
    """Rows are read as they stream by; the labels of a file are numbered by the sorted vocabulary in the end,
    whatever the order they first appear in (hand-computed), deduplicated the same either way."""
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps({"name": "b", "phones": ["Z", "Z", "AA", "SIL"]}) + "\n"
                    + json.dumps({"name": "a", "phones": ["SIL", "zz", "zz", "AA"]}) + "\n")
    read = read_unit_sequences(path, dedup=True)
    index = {label: i for i, label in enumerate(read.labels.labels)}
    assert read.labels.labels == tuple(sorted(read.labels.labels))
    assert read.sequences["b"].tolist() == [index["Z"], index["AA"], index["SIL"]]
    assert read.sequences["a"].tolist() == [index["SIL"], index["zz"], index["AA"]]
    assert read_unit_sequences(path, dedup=False).sequences["b"].tolist() == [index["Z"]] * 2 + [index["AA"],
                                                                                                 index["SIL"]]
    for bad in ([1, 2.5], [1, -1], ["1"], [[1]], [True], [1, True, 2], [1, 2**70], [2**64 - 1], [2**63]):
        units = tmp_path / "bad.jsonl"
        units.write_text(json.dumps({"name": "ok", "units": [1, 2]}) + "\n" + json.dumps({"name": "x", "units": bad}))
        with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: 'units' of 'x' must be non-negative integers"):
            read_unit_sequences(units, dedup=True)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"name": "a", "units": [1]}) + "\n" + json.dumps({"name": "b", "phones": ["K"]}))
    with pytest.raises(ValueError, match=r"mixed\.jsonl mixes 'units' and 'phones' rows \(.*line 2\)"):
        read_unit_sequences(mixed, dedup=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"name": "a", "units": []}) + "\n")
    assert read_unit_sequences(empty, dedup=True).sequences["a"].tolist() == []


def test_a_file_that_is_not_text_is_named(tmp_path):
    audio = tmp_path / "good.wav"
    audio.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80\x3e\x00\x00\xff\xfe")
    with pytest.raises(ValueError, match=r"good\.wav: line 1 is not UTF-8 text .*expected a JSONL file of units"):
        read_unit_sequences(audio, dedup=True)


@pytest.mark.parametrize(("largest", "dtype"), [(0, np.int16), (32767, np.int16), (32768, np.int32),
                                                 (2**31 - 1, np.int32), (2**31, np.int64)])
def test_unit_ids_are_held_in_the_smallest_integer_type(tmp_path, largest, dtype):
    """2 bytes a unit for codebooks and k-means; the values, and the data fingerprint an LM records, are those of
    int64 ids."""
    from spidr.lm.tokens import fingerprint

    path = tmp_path / "u.jsonl"
    rows = {"a": [largest, 0, 0, largest], "b": [1]}
    path.write_text("".join(json.dumps({"name": k, "units": v}) + "\n" for k, v in rows.items()))
    read = read_unit_sequences(path, dedup=False)
    assert read.sequences["a"].dtype == dtype
    assert read.sequences["a"].tolist() == rows["a"]
    assert read.max_unit == max(largest, 1)
    as_int64 = {k: np.asarray(v, dtype=np.int64) for k, v in rows.items()}
    assert fingerprint(read.sequences) == fingerprint(as_int64)


@pytest.mark.parametrize("num_units", [300, 40_000])
def test_a_compact_token_stream_gives_the_int64_windows(num_units):
    from spidr.lm.data import WindowSampler, token_stream, validation_windows

    rng = np.random.default_rng(0)
    sequences = {f"u{i}": rng.integers(0, num_units, size=rng.integers(0, 40)) for i in range(50)}
    vocab = Vocabulary(num_units)
    stream = token_stream(sequences, vocab)
    assert stream.dtype == (torch.int16 if num_units < 32_000 else torch.int32)
    reference = torch.from_numpy(np.concatenate([vocab.encode(sequences[k]) for k in sorted(sequences)]))
    assert torch.equal(stream.long(), reference)
    windows = WindowSampler(stream, 16, 8, seed=3).windows(5)
    assert windows.dtype == torch.int64
    assert torch.equal(windows, WindowSampler(reference, 16, 8, seed=3).windows(5))
    for got, expected in zip(validation_windows(stream, 16, 4), validation_windows(reference, 16, 4), strict=True):
        assert got.dtype == torch.int64
        assert torch.equal(got, expected)
    # a bigram fitted on the compact stream counts as on int64 (pair ids reach 300 × 303, past int16)
    if num_units == 300:
        compact_lm, wide_lm = NgramLM(vocab.size, order=2, add_k=0.5), NgramLM(vocab.size, order=2, add_k=0.5)
        compact_lm.fit(stream)
        wide_lm.fit(reference)
        assert torch.equal(compact_lm.counts, wide_lm.counts)
        assert compact_lm.counts.sum() == stream.numel() - 1


def test_the_data_fingerprint_covers_the_utterance_names():
    """The same units under another utterance name are other training data (another corpus, or the files
    renamed): an LM's recorded fingerprint tells them apart, as it tells other units apart."""
    from spidr.lm.tokens import fingerprint

    units = np.asarray([3, 1, 4, 1, 5], dtype=np.int64)
    assert fingerprint({"a": units}) != fingerprint({"b": units})
    assert fingerprint({"a": units}) != fingerprint({"a": units[::-1].copy()})
    assert fingerprint({"a": units}) == fingerprint({"a": units.copy()})


def test_only_a_test_item_without_units_is_refused_a_training_row_without_units_is_read(tmp_path):
    """The refusal of an empty row is for test items (its score would be log p(EOS | BOS) whatever the item): read as
    training data, the same file gives the empty row as an empty sequence, next to the others."""
    units = tmp_path / "units.jsonl"
    units.write_text(json.dumps({"name": "spk/a", "units": [3, 3, 1]}) + "\n"
                     + json.dumps({"name": "spk/b", "units": []}) + "\n")
    with pytest.raises(ValueError, match=r"units\.jsonl.*'b' has no units"):
        read_unit_sequences(units, dedup=True, submission_names=True)
    read = read_unit_sequences(units, dedup=True)
    assert read.sequences["spk/a"].tolist() == [3, 1]
    assert read.sequences["spk/b"].tolist() == []
