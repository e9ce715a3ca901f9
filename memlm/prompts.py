"""Building the model's input ids for a request: plain prompts, chat messages and RAG prompts.

The context-length rule (the engine never fails on a long prompt):
  budget = context_length - max_new_tokens   (InvalidArgument when that leaves no room)
  * rag: retrieved chunks go in in rank order while the whole prompt fits the budget; the first
    chunk that does not fit and all after it are dropped and not cited.
  * if the prompt alone (no chunks) does not fit, its LAST `budget` tokens are kept (left
    truncation) and the number dropped is reported as `truncated_prompt_tokens`.

RAG formats are named presets; `DEFAULT_RAG_FORMAT` is the one measured best for the bundled
model by `benchmarks/rag_prompt_formats.py`. Chat `messages` always go through the tokenizer's
chat template; in rag mode the passages are put into the last user turn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from memlm.engine import ChatMessage
from memlm.errors import FailedPrecondition, InvalidArgument
from memlm.index.types import SearchHit


@dataclass(frozen=True)
class BuiltPrompt:
    input_ids: tuple[int, ...]  # what the model reads, already within the budget
    citations: tuple[SearchHit, ...]  # the chunks put into the prompt, in prompt order
    truncated_prompt_tokens: int  # tokens dropped from the start (0 when it fitted)


def prompt_budget(context_length: int, max_new_tokens: int) -> int:
    """Tokens the prompt may use: the context minus room for the new tokens."""
    if max_new_tokens >= context_length:
        raise InvalidArgument(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {context_length} tokens; expected max_new_tokens < {context_length}"
        )
    return context_length - max_new_tokens


# --- RAG formats ---------------------------------------------------------------------------
# Each takes the passages (in rank order) and the question and returns the prompt text; `chat`
# needs the tokenizer for its template. With no passages they reduce to asking the question.


def _numbered(passages: Sequence[str]) -> str:
    return "\n".join(f"[{i}] {p.strip()}" for i, p in enumerate(passages, 1))


def rag_completion(passages: Sequence[str], question: str, tokenizer=None) -> str:
    """Plain completion: "Context:\\n[1] ...\\n\\nQuestion: ...\\nAnswer:"."""
    context = f"Context:\n{_numbered(passages)}\n\n" if passages else ""
    return f"{context}Question: {question.strip()}\nAnswer:"


def rag_short_answer(passages: Sequence[str], question: str, tokenizer=None) -> str:
    """An instruction line asking for a short answer, then the completion format."""
    head = "Answer the question with a few words from the context.\n\n"
    return head + rag_completion(passages, question)


def rag_chat(passages: Sequence[str], question: str, tokenizer=None) -> str:
    """The chat template, with numbered passages and the question in the user turn."""
    return apply_chat_template(tokenizer, rag_user_messages((ChatMessage("user", question),), passages))


def rag_chat_question_first(passages: Sequence[str], question: str, tokenizer=None) -> str:
    """The chat template; the user turn asks the question first, then lists the passages."""
    if not passages:
        return apply_chat_template(tokenizer, (ChatMessage("user", question),))
    content = f"Question: {question.strip()}\n\nPassages:\n{_numbered(passages)}\n\nAnswer the question."
    return apply_chat_template(tokenizer, (ChatMessage("user", content),))


def rag_user_messages(messages: Sequence[ChatMessage], passages: Sequence[str]) -> tuple[ChatMessage, ...]:
    """Put the passages into the last user turn (chat requests in rag mode)."""
    if not passages:
        return tuple(messages)
    last_user = max(i for i, m in enumerate(messages) if m.role == "user")
    out = list(messages)
    content = f"Use these passages to answer.\n{_numbered(passages)}\n\nQuestion: {messages[last_user].content.strip()}"
    out[last_user] = ChatMessage("user", content)
    return tuple(out)


RAG_FORMATS: dict[str, Callable[..., str]] = {
    "completion": rag_completion,
    "short_answer": rag_short_answer,
    "chat": rag_chat,
    "chat_question_first": rag_chat_question_first,
}
# Measured with `.venv/bin/python benchmarks/rag_prompt_formats.py` (40 synthetic facts with 3
# same-kind distractor passages each, seed 0, greedy, 12 new tokens, answer in the first non-empty
# output line; SmolLM2-135M-Instruct fp32, 2 CPU cores shared with other jobs, so the times are
# rough):
#   completion           12/40 = 30%   752 ms/item   86 prompt tokens
#   short_answer          8/40 = 20%   819 ms/item   99 prompt tokens
#   chat                  9/40 = 22%  1759 ms/item  117 prompt tokens (longer answers: full sentences)
#   chat_question_first   8/40 = 20%  3800 ms/item  120 prompt tokens
# (An earlier "Answer the question using the passages below" + "Passage i:" format scored 1/40.)
# The 135M model is weak at picking one fact among near-identical ones; with a single relevant
# chunk (the pass-key test) it answers reliably.
DEFAULT_RAG_FORMAT = "completion"


# --- building ------------------------------------------------------------------------------


def apply_chat_template(tokenizer, messages: Sequence[ChatMessage]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition("this model's tokenizer has no chat template; send a plain `prompt` instead of `messages`")
    return tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
    )


def query_text(prompt: Optional[str], messages: Optional[Sequence[ChatMessage]]) -> str:
    """What retrieval searches for: the prompt, or the last user message."""
    if prompt is not None:
        return prompt
    users = [m.content for m in messages or () if m.role == "user"]
    if not users:
        raise InvalidArgument("messages have no 'user' message to answer or to search memory for")
    return users[-1]


def _encode(tokenizer, text: str, templated: bool) -> list[int]:
    # A chat template writes its own special tokens; a plain prompt gets whatever the tokenizer
    # adds by default (nothing for SmolLM2), as `tokenizer(prompt)` would for `model.generate`.
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]


def build_prompt(
    tokenizer,
    budget: int,
    prompt: Optional[str] = None,
    messages: Optional[Sequence[ChatMessage]] = None,
    hits: Sequence[SearchHit] = (),
    rag: bool = False,
    rag_format: str = DEFAULT_RAG_FORMAT,
) -> BuiltPrompt:
    """Input ids for exactly one of `prompt` / `messages`, within `budget` tokens.

    With `rag`, as many of `hits` (a rank-ordered prefix) go in as fit; see the module docstring.
    """
    if rag_format not in RAG_FORMATS:
        raise InvalidArgument(f"unknown rag format {rag_format!r}; expected one of {sorted(RAG_FORMATS)}")
    templated = messages is not None or (rag and rag_format.startswith("chat"))

    def render(n_hits: int) -> list[int]:
        passages = [h.text for h in hits[:n_hits]]
        if messages is not None:
            msgs = rag_user_messages(messages, passages) if rag else messages
            return _encode(tokenizer, apply_chat_template(tokenizer, msgs), templated=True)
        if rag:
            return _encode(tokenizer, RAG_FORMATS[rag_format](passages, prompt, tokenizer), templated)
        return _encode(tokenizer, prompt, templated=False)

    n = len(hits) if rag else 0
    ids = render(n)
    if len(ids) > budget and n > 0:
        # Token count grows with the number of chunks: binary-search the largest prefix that fits.
        lo, hi, best = 0, n - 1, None  # invariant: render(hi + 1) does not fit
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = render(mid)
            if len(candidate) <= budget:
                best, lo = (mid, candidate), mid + 1
            else:
                hi = mid - 1
        n, ids = best if best is not None else (0, render(0))
    truncated = max(0, len(ids) - budget)
    if truncated:
        ids = ids[truncated:]  # left truncation: the end of a prompt is what the model continues
    return BuiltPrompt(tuple(ids), tuple(hits[:n]), truncated)
