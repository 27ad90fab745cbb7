"""Text data: corpora (`corpus`), tokenizers (`tokenizers`) and grain pipelines (`pipeline`).

Only the tokenizers are imported here: loading a config reads their registry, and should not
pull in grain.
"""

from kvjax.data.tokenizers import (ByteTokenizer, Gpt2Tokenizer, Tokenizer, get_tokenizer,
                                   tokenizer_names, tokenizer_vocab_size)

__all__ = ["ByteTokenizer", "Gpt2Tokenizer", "Tokenizer", "get_tokenizer", "tokenizer_names",
           "tokenizer_vocab_size"]
