"""Turn one row of a given format into token ids and labels (-100 on tokens that carry no loss).

The prompt and the completion are tokenized separately and concatenated, so the loss mask boundary is
exact (no re-tokenization drift at the seam) and the completion always ends with EOS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sft_dist.data.templates import render_completion, render_prompt
from sft_dist.errors import BadRow, DataError

IGNORE = -100

REQUIRED: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
OPTIONAL: dict[str, tuple[str, ...]] = {"alpaca": ("input",)}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's role names (`from`), as ShareGPT dumps, LLaMA-Factory and Axolotl write them: function_call is the
# assistant calling a tool (it carries loss), observation the tool's answer.
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "model": "assistant", "function_call": "assistant", "observation": "tool", "tool": "tool",
}

Segments = list[tuple[str, bool]]  # (text, carries loss)


@dataclass(frozen=True)
class ChatSpec:
    """Where a conversation is and how its turns are spelled: the column, each turn's role and content keys,
    and the data's role names mapped to ours (ROLES)."""

    column: str
    role_key: str
    content_key: str
    roles: dict[str, str]


CHAT_FORMATS: dict[str, ChatSpec] = {
    "messages": ChatSpec("messages", "role", "content", {r: r for r in ROLES}),
    "sharegpt": ChatSpec("conversations", "from", "value", SHAREGPT_ROLES),
}


def chat_spec(fmt: str, *, role_key: str | None = None, content_key: str | None = None,
              roles: dict[str, str] | None = None) -> ChatSpec:
    """The format's ChatSpec with `data.role_key` / `data.content_key` / `data.roles` (merged) applied."""
    base = CHAT_FORMATS[fmt]
    return ChatSpec(base.column, role_key or base.role_key, content_key or base.content_key,
                    {**base.roles, **(roles or {})})


def _text(row: dict[str, Any], col: str, where: str, *, optional: bool = False) -> str:
    value = row.get(col)
    if value is None:
        if optional:
            return ""
        raise BadRow(f"{where}: column {col!r} is missing or null; fill it or drop the row", "null value")
    if not isinstance(value, str):
        raise BadRow(f"{where}: column {col!r} must be text, got {type(value).__name__} {value!r:.60}", "wrong type")
    return value


def _response(row: dict[str, Any], col: str, where: str) -> str:
    value = _text(row, col, where)
    if not value.strip():
        raise BadRow(f"{where}: empty response (column {col!r} is blank), so nothing to learn from", "empty response")
    return value


def alpaca_segments(row: dict[str, Any], where: str, *, template: str) -> Segments:
    prompt = render_prompt(
        template,
        instruction=_text(row, "instruction", where),
        input=_text(row, "input", where, optional=True),
    )
    return [(prompt, False), (render_completion(template, _response(row, "output", where)), True)]


def prompt_completion_segments(row: dict[str, Any], where: str) -> Segments:
    return [(_text(row, "prompt", where), False), (_response(row, "completion", where), True)]


def text_segments(row: dict[str, Any], where: str) -> Segments:
    return [(_text(row, "text", where), True)]


def chat_messages(row: dict[str, Any], where: str, spec: ChatSpec) -> list[dict[str, Any]]:
    """A row's conversation as [{role, content}] with our role names. Raises BadRow naming the turn."""
    col, rk, ck = spec.column, spec.role_key, spec.content_key
    turns = row.get(col)
    if turns is None:
        raise BadRow(f"{where}: column {col!r} is missing or null; fill it or drop the row", "null value")
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"{where}: column {col!r} must be a non-empty list of {{{rk}, {ck}}} objects", "wrong type")
    out = []
    for j, m in enumerate(turns):
        if not isinstance(m, dict) or not isinstance(m.get(rk), str) or not isinstance(m.get(ck), str):
            raise BadRow(f"{where}: {col}[{j}] must be an object with text {rk!r} and {ck!r}", "wrong type")
        role = spec.roles.get(m[rk])
        if role is None:
            guess = SHAREGPT_ROLES.get(m[rk], "assistant")
            raise BadRow(f"{where}: {col}[{j}] has unknown role {m[rk]!r}; allowed: {', '.join(spec.roles)} "
                         f"(map others to {', '.join(ROLES)} with data.roles, e.g. data.roles.{m[rk]}={guess})",
                         "unknown role")
        if role == "assistant" and not m[ck].strip():
            raise BadRow(f"{where}: empty response ({col}[{j}], an assistant turn, is blank)", "empty response")
        if (rk, ck) == ("role", "content"):  # other keys (name, tool_calls, ...) stay for templates that use them
            out.append({**m, "role": role} if role != m[rk] else m)
        else:
            out.append({"role": role, "content": m[ck]})
    if not any(m["role"] == "assistant" for m in out):
        raise BadRow(f"{where}: the conversation has no assistant turn, so nothing to learn from",
                     "no assistant turn")
    return out


def segment_function(fmt: str, *, template: str = "") -> Callable[[dict, str], Segments] | None:
    """The row -> segments function of a plain format; None for a chat format."""
    return {
        "alpaca": lambda r, w: alpaca_segments(r, w, template=template),
        "prompt_completion": prompt_completion_segments,
        "text": text_segments,
    }.get(fmt)


def row_check(fmt: str, *, template: str = "", chat: ChatSpec | None = None) -> Callable[[dict, str], object]:
    """The check a row of `fmt` must pass to be tokenized (raises BadRow), without a tokenizer: the same
    functions the Tokenizer calls first."""
    segments = segment_function(fmt, template=template)
    if segments is not None:
        return segments
    spec = chat or CHAT_FORMATS[fmt]
    return lambda r, w: chat_messages(r, w, spec)


class Tokenizer:
    """Tokenizes rows of one format into {input_ids, labels}, with the loss mask the format implies.

    With `max_length`, rows are also fit to it (`truncation`: right / left_prompt / drop, see `_fit`; `split`
    leaves a longer row whole, for data/build.py to make windows of) and the output has `_length` (tokens before
    fitting) and `_cut` ("", "right", "prompt" or "split")."""

    def __init__(self, tokenizer, *, fmt: str, template: str, completion_only_loss: bool, chat: ChatSpec | None = None,
                 max_length: int | None = None, truncation: str = "right"):
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token; set one (EOS ends every completion)")
        self.tok = tokenizer
        self.fmt = fmt
        self.template = template
        self.completion_only_loss = completion_only_loss
        self.max_length, self.truncation = max_length, truncation
        self._segments = segment_function(fmt, template=template)
        self.chat = None if self._segments is not None else chat or CHAT_FORMATS[fmt]
        if self.chat is not None:
            check_chat_template(tokenizer, fmt)
        self._head, self._tail = self._prompt_frame() if truncation == "left_prompt" else ([], [])

    def __call__(self, row: dict[str, Any], where: str) -> dict[str, list[int]]:
        if self.chat is not None:
            return self._chat(row, where)
        out = self.batch([row], [where])[0]
        if isinstance(out, BadRow):
            raise out
        return out

    def batch(self, rows: list[dict[str, Any]], wheres: list[str]) -> list[dict[str, list[int]] | BadRow]:
        """`self(row, where)` for many rows, the bad ones as their BadRow. Plain formats tokenize every row's
        segments in two batched tokenizer calls (a fast tokenizer encodes a list in parallel, in Rust): the
        same ids as one call per segment, ~3x faster on short rows."""
        if self._segments is None:
            return [self._one(row, where) for row, where in zip(rows, wheres)]
        out: list[dict[str, list[int]] | BadRow] = []
        segments: list[Segments] = []
        for row, where in zip(rows, wheres):
            try:
                segments.append(self._segments(row, where))
                out.append({})
            except BadRow as e:
                segments.append([])
                out.append(e)
        # add_special_tokens only for a row's first segment: BOS once per row
        first = [s[0][0] for s in segments if s]
        rest = [text for s in segments for text, _ in s[1:]]
        first_ids = iter(self.tok(first, add_special_tokens=True)["input_ids"] if first else [])
        rest_ids = iter(self.tok(rest, add_special_tokens=False)["input_ids"] if rest else [])
        for i, segs in enumerate(segments):
            if not segs:
                continue
            ids: list[int] = []
            loss: list[bool] = []
            prompt = 0
            for j, (_, carries) in enumerate(segs):
                part = next(first_ids) if j == 0 else next(rest_ids)
                ids += part
                loss += [carries] * len(part)
                if j == 0 and not carries:
                    prompt = len(part)
            ids.append(self.tok.eos_token_id)
            loss.append(True)
            out[i] = self._fit(ids, loss, prompt=prompt)
        return out

    def _one(self, row: dict[str, Any], where: str) -> dict[str, list[int]] | BadRow:
        try:
            return self(row, where)
        except BadRow as e:
            return e

    def _labels(self, ids: list[int], loss: list[bool]) -> dict[str, list[int]]:
        if not self.completion_only_loss:
            loss = [True] * len(ids)
        return {"input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, loss)]}

    def _fit(self, ids: list[int], loss: list[bool], *, prompt: int) -> dict:
        """Fit a plain row (its first `prompt` tokens the prompt) to max_length. `left_prompt` removes prompt tokens
        from the left, after the head (BOS, and the template's text before the first field when the prompt starts
        with it) and before the tail (the template's text between the last field and the response), so the whole
        completion stays; when even that cannot make room, the row is cut on the right like `right`."""
        if self.max_length is None:
            return self._labels(ids, loss)
        n, m, cut = len(ids), self.max_length, ""
        if n > m:
            head = _match_prefix(ids, self._head) or _leading_specials(ids, self.tok)
            t = len(self._tail)
            tail = t if 0 < t <= prompt - head and ids[prompt - t : prompt] == self._tail else 0
            k = n - m
            if self.truncation == "split":
                cut = "split"  # whole: data/build.py makes it windows of max_length (split_windows)
            elif self.truncation == "left_prompt" and 0 < k <= prompt - head - tail:
                ids, loss, cut = ids[:head] + ids[head + k:], loss[:head] + loss[head + k:], "prompt"
            else:
                ids, loss, cut = ids[:m], loss[:m], "right"
        return {**self._labels(ids, loss), "_length": n, "_cut": cut}

    def _prompt_frame(self) -> tuple[list[int], list[int]]:
        """Token ids of the alpaca template's fixed text before the first field (with BOS) and after the last."""
        if self.fmt != "alpaca":
            return [], []
        prompt_part = self.template[: self.template.index("{output}")]
        head_text = prompt_part[: prompt_part.index("{")]
        tail_text = prompt_part[prompt_part.rindex("}") + 1 :]
        head = self.tok(head_text, add_special_tokens=True)["input_ids"] if head_text else []
        tail = self.tok(tail_text, add_special_tokens=False)["input_ids"] if tail_text else []
        return head, tail

    def _chat(self, row: dict[str, Any], where: str) -> dict:
        messages = chat_messages(row, where, self.chat)
        ids, loss = self._chat_ids(messages, where)
        if self.max_length is None:
            return self._labels(ids, loss)
        n, m, cut = len(ids), self.max_length, ""
        if n > m and self.truncation == "split":
            return {**self._labels(ids, loss), "_length": n, "_cut": "split"}  # windows: data/build.py
        if n > m:
            cut = "right"
            if self.truncation == "left_prompt":
                # Drop whole earliest exchanges (each from a user turn to the next), keeping a system turn.
                keep = 1 if messages[0]["role"] == "system" else 0
                for s in range(keep + 1, len(messages)):
                    if messages[s]["role"] != "user" or not any(x["role"] == "assistant" for x in messages[s:]):
                        continue
                    sub_ids, sub_loss = self._chat_ids(messages[:keep] + messages[s:], where)
                    if len(sub_ids) <= m:
                        ids, loss, cut = sub_ids, sub_loss, "prompt"
                        break
            if cut == "right":
                ids, loss = ids[:m], loss[:m]
        return {**self._labels(ids, loss), "_length": n, "_cut": cut}

    def _chat_ids(self, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
        if has_generation_markers(self.tok):
            out = self.tok.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            return list(out["input_ids"]), [bool(b) for b in out["assistant_masks"]]
        return self._messages_by_prefix(messages, where)

    def _messages_by_prefix(self, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
        # Without {% generation %} markers, find each assistant turn as the text that rendering it adds to the
        # conversation so far. Valid only when renders of prefixes are prefixes of the full render.
        render = self.tok.apply_chat_template
        full = render(messages, tokenize=False)
        segments: Segments = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = render(messages[: i + 1], tokenize=False)
            if not (full.startswith(upto) and upto.startswith(before) and len(before) >= pos):
                raise DataError(
                    f"{where}: the tokenizer's chat template cannot mark assistant turns (rendering a prefix of the "
                    "conversation does not give a prefix of the whole); set `data.chat_template` to a template "
                    "with {% generation %} markers around assistant content, or to a preset (chatml, llama3, ...)"
                )
            segments += [(full[pos : len(before)], False), (full[len(before) : len(upto)], True)]
            pos = len(upto)
        segments.append((full[pos:], False))
        ids: list[int] = []
        loss: list[bool] = []
        for text, carries in segments:
            if text:
                part = self.tok(text, add_special_tokens=False)["input_ids"]
                ids += part
                loss += [carries] * len(part)
        return ids, loss


def _match_prefix(ids: list[int], prefix: list[int]) -> int:
    return len(prefix) if prefix and ids[: len(prefix)] == prefix else 0


def _leading_specials(ids: list[int], tokenizer) -> int:
    special = set(tokenizer.all_special_ids)
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def has_generation_markers(tokenizer) -> bool:
    template = tokenizer.chat_template or ""
    return "{% generation %}" in template or "{%- generation %}" in template


def check_chat_template(tokenizer, fmt: str = "messages") -> None:
    if not tokenizer.chat_template:
        raise DataError(
            f"data.format is {fmt!r} but the tokenizer has no chat template; set `data.chat_template` to a preset "
            "(chatml, llama3, mistral, gemma, qwen, phi3), a Jinja template, or a path to a .jinja file"
        )
