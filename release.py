"""The conventions of the paper's release (lrlbbzl/Qwen-AVAR), which trains with LLaMA-Factory (SFT)
and EasyR1 (GRPO), read here so that its files work unchanged:

    read_format_prompt   EasyR1's `format_prompt` (a jinja file such as the release's math.jinja or
                         r1v.jinja), for train_grpo.py and evaluate.py --format-prompt

EasyR1's format prompt (verl/utils/dataset.py, _build_messages): the file's text, stripped, is a
jinja2 template rendered with one variable, `content`, the record's prompt string (its `<image>`
placeholders included); the rendered text is then cut at each `<image>` into the user turn's
image and text parts. math.jinja, for one, renders "{{ content | trim }} You FIRST think about ...".
Here `content` is the question with its "A. text" option lines (data.build_prompt), and the
rendered text replaces this project's answer instruction.

jinja2 (--format-prompt) is imported only when asked for.
"""

from __future__ import annotations

import os

from data import UserError


class FormatPrompt:
    """An EasyR1 format prompt: `fp(content)` is the user turn's text; `source` its template text."""

    def __init__(self, path: str, source: str, template):
        self.path, self.source, self.template = path, source, template

    def __call__(self, content: str) -> str:
        return self.template.render(content=content)


def read_format_prompt(path: str) -> FormatPrompt:
    """The jinja file at `path` as EasyR1 reads it (UTF-8, stripped, jinja2's default Template). A
    missing file, a syntax error (file:line) or a template that uses anything but `content` (EasyR1
    renders only that: the question would be lost, or a name left empty) is a UserError."""
    try:
        import jinja2
        import jinja2.meta
    except ImportError:
        raise UserError("--format-prompt needs jinja2 (pip install jinja2)") from None
    if not os.path.isfile(path):
        raise UserError(f"{path}: format prompt file does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read().strip()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 ({e.reason})") from None
    env = jinja2.Environment()  # the settings of jinja2.Template(source), which EasyR1 calls
    try:
        names = jinja2.meta.find_undeclared_variables(env.parse(source))
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: jinja syntax error: {e.message}") from None
    if names != {"content"}:
        raise UserError(f"{path}: a format prompt renders {{{{ content }}}} (the question) and nothing else; "
                        f"this one uses {sorted(names) or 'no variable'}")
    return FormatPrompt(path, source, jinja2.Template(source))
