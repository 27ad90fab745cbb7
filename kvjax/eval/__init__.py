"""Evaluation of any kvjax model and cache setting: perplexity, zero-shot multiple choice and
seeded long-context tasks. `python -m kvjax.eval --help` is the command line."""

from kvjax.eval.long_context import evaluate_recall, evaluate_retrieval
from kvjax.eval.multiple_choice import evaluate_multiple_choice, load_questions
from kvjax.eval.perplexity import perplexity
from kvjax.eval.scoring import cached_logits, forward_logits, score_spans

__all__ = ["cached_logits", "evaluate_multiple_choice", "evaluate_recall", "evaluate_retrieval",
           "forward_logits", "load_questions", "perplexity", "score_spans"]
