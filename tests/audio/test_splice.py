"""Splicing a segment's audio from successive decodes (early audio)."""

import numpy as np
import pytest

from stream_engine.audio.splice import Splicer


def test_pieces_and_last_add_up_to_the_final_decode():
    rng = np.random.default_rng(0)
    final = rng.uniform(-1, 1, 10_000).astype(np.float32)
    # earlier decodes agree with the final one only roughly
    first = final[:3_000] + 0.1
    second = final[:6_000] - 0.1
    sp = Splicer(hold=100)
    a = sp.piece(first)
    b = sp.piece(second)
    c = sp.last(final)
    assert (a.size, b.size, c.size) == (2_900, 3_000, 4_100)
    out = np.concatenate([a, b, c])
    assert out.size == final.size  # every sample once
    np.testing.assert_array_equal(a, first[:2_900])  # the first piece: as decoded
    np.testing.assert_array_equal(c[100:], final[6_000:])  # after the fade: the final decode


def test_the_seam_fades_from_the_old_decode_into_the_new():
    sp = Splicer(hold=4)
    sp.piece(np.zeros(10, np.float32))  # sends 6, holds 4 zeros
    rest = sp.last(np.ones(12, np.float32))
    np.testing.assert_allclose(rest[:4], [0.2, 0.4, 0.6, 0.8], rtol=1e-6)  # no jump 0 -> 1
    np.testing.assert_array_equal(rest[4:], np.ones(2))


def test_a_decode_that_adds_nothing_sends_nothing():
    sp = Splicer(hold=50)
    assert sp.piece(np.ones(40, np.float32)).size == 0  # shorter than the hold
    assert sp.piece(np.ones(200, np.float32)).size == 150
    assert sp.piece(np.ones(180, np.float32)).size == 0  # not past what was sent
    assert sp.sent == 150


def test_without_hold_pieces_are_plain_slices():
    sp = Splicer(hold=0)
    x = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(sp.piece(x[:4]), x[:4])
    np.testing.assert_array_equal(sp.last(x), x[4:])


def test_negative_hold_is_an_error():
    with pytest.raises(ValueError, match="hold"):
        Splicer(hold=-1)
