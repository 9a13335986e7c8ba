"""The reference's text cleanup, LM1B truncation, and per-group packing (no JAX compiles)."""
import numpy as np
import pytest

from pgm_jax.data import detokenizers, pipeline


def test_detokenizers_on_corpus_style_text():
  assert (detokenizers.lm1b('he said , " hello there " ( quietly ) . it \'s http : / / a.b ?')
          == 'he said, "hello there" (quietly) . it\'s http://a.b?')   # as the reference
  assert detokenizers.lm1b("costs $ 5 or £ 4 !") == "costs $5 or £4!"
  assert (detokenizers.wikitext(" = = Early life = = \n The 1 @,@ 000 @-@ year storm , "
                                "( 3 @.@ 5 ° ) 's end . ")
          == " == Early life ==\nThe 1,000-year storm, (3.5 °)'s end. ")
  assert (detokenizers.ptb("the company 's N N shares ca n't rise <unk> \\/ year")
          == "the company's 1 1 shares can't rise ? / year")
  assert detokenizers.lambada("  \u201cYes,\u201d she said. ") == '\n"Yes," she said.'
  text = "a @-@ b , ( c ) . "
  assert detokenizers.scientific_papers(text) == detokenizers.lm1b(detokenizers.wikitext(text))
  assert detokenizers.detokenize("none", " a , b ") == " a , b "
  with pytest.raises(ValueError, match="config.data.detokenizer"):
    detokenizers.get("wiki")


class _Chars:
  """A tokenizer with one id per character (ids = ord), enough to count tokens."""
  bos_id, eos_id, pad_id, mask_id = 1, 2, 0, 3

  def encode(self, text):
    return [ord(c) for c in text]


def test_lm1b_truncation_keeps_the_final_sep_and_detokenizes():
  to_example = pipeline.TextToPaddedExample(_Chars(), 8, detokenizer="lm1b")
  ex = to_example({"text": "a , b"})                      # "a, b" -> 4 tokens
  assert ex["tokens"].tolist() == [1, ord("a"), ord(","), ord(" "), ord("b"), 2, 0, 0]
  assert ex["valid"].tolist() == [True] * 6 + [False] * 2
  ex = to_example({"text": "abcdefghijk"})                # longer than L - 2 = 6
  assert ex["tokens"].tolist() == [1] + [ord(c) for c in "abcdef"] + [2]
  assert ex["valid"].all()


def test_group_docs_packing_drops_each_groups_remainder():
  docs = [[10] * 5, [11] * 3, [12] * 4, [13] * 6, [14] * 2]   # + EOS each
  blocks = pipeline.pack_documents(docs, 6, 1, 2, group_docs=2)
  # group 1: 6 + 4 = 10 tokens -> 2 chunks of 4 (remainder 2 dropped); group 2: 5 + 7 = 12
  # -> 3 chunks; group 3: 3 tokens -> none.
  assert blocks.shape == (5, 6)
  assert blocks[2].tolist() == [1, 12, 12, 12, 12, 2]
  stream = pipeline.StreamingPacker(6, 1, 2, group_docs=2)
  streamed = np.concatenate([stream.add(d) for d in docs])
  np.testing.assert_array_equal(streamed, blocks)
  assert pipeline.pack_documents(docs, 6, 1, 2).shape == (6, 6)   # one stream: 25 // 4
