"""AUTOMATIC1111 webui's attention syntax: a prompt -> pieces of text with weights.

    >>> parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")  # doctest: +NORMALIZE_WHITESPACE
    [['a ', 1.0], ['house', 1.5730000000000004], [' ', 1.1], ['on', 1.0], [' a ', 1.1], ['hill', 0.55],
     [', sun, ', 1.1], ['sky', 1.4641000000000006], ['.', 1.1]]

The rules, as webui's modules/prompt_parser.py applies them (the same regex, the same order):
  - the text splits into escapes (\\( \\) \\[ \\] \\\\), "(", "[", ":<number>)", ")", "]", runs of other text,
    and a lone ":" (kept as text);
  - "(" and "[" remember the current position; ")" multiplies the weight of every piece since the
    matching "(" by 1.1, "]" by 1/1.1, ":1.3)" by 1.3 instead of 1.1; a ")" or "]" with nothing open is text;
  - brackets left open at the end are applied there (an unclosed "(" still weighs 1.1);
  - "BREAK" (a whole word, the spaces around it taken with it) becomes the marker ["BREAK", -1], which
    ends the current 75-token chunk (npdiff/prompt_chunks.py);
  - consecutive pieces of equal weight are merged; an empty prompt is [["", 1.0]];
  - a ":<number>)" whose number does not parse ("(x:1.2.3)", "(x:...)") is an NpdiffError naming it
    (webui's float() raises there).
Pure Python, no arrays.
"""

import re

from npdiff.errors import NpdiffError

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
BREAK_MARKER = ["BREAK", -1]

RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)

RE_BREAK_WORD = re.compile(r"\bBREAK\b")


def split_break(text):
    r"""text.split on the word BREAK with the whitespace around each taken away: webui's
    re.split(r"\s*\bBREAK\b\s*", text), whose leading \s* retries the rest of a whitespace run at every
    position (quadratic: 6 s for a run of 20,000 spaces, hours for a 1 MB prompt); this finds the words first."""
    parts = RE_BREAK_WORD.split(text)
    for index in range(len(parts) - 1):  # the whitespace on both sides of each BREAK goes with it
        parts[index] = parts[index].rstrip()
        parts[index + 1] = parts[index + 1].lstrip()
    return parts


def parse_weight(weight, match):
    """The number of a ":<number>)": webui's regex also takes "...", "1.2.3" or "." there, where its float()
    raises ValueError; here an NpdiffError names the weight in the prompt."""
    try:
        return float(weight)
    except ValueError:
        raise NpdiffError(f"prompt weight {match.group(0)!r} at character {match.start() + 1}: {weight!r} is not "
                          "a number (write e.g. (word:1.2))") from None


def parse_prompt_attention(text):
    """A prompt -> [[text, weight], ...] in order (see the module docstring); BREAK -> ["BREAK", -1]."""
    pieces = []
    round_brackets = []   # positions in `pieces` where an open "(" started
    square_brackets = []  # the same for "["

    def multiply_range(start, multiplier):
        for position in range(start, len(pieces)):
            pieces[position][1] *= multiplier

    # 1. walk the tokens of the syntax, weighting what each closing bracket closes
    for match in RE_ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(pieces))
        elif token == "[":
            square_brackets.append(len(pieces))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), parse_weight(weight, match))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for index, part in enumerate(split_break(token)):
                if index > 0:
                    pieces.append(list(BREAK_MARKER))
                pieces.append([part, 1.0])

    # 2. brackets still open weigh from where they opened to the end
    for position in round_brackets:
        multiply_range(position, ROUND_BRACKET_MULTIPLIER)
    for position in square_brackets:
        multiply_range(position, SQUARE_BRACKET_MULTIPLIER)

    if not pieces:
        pieces = [["", 1.0]]

    # 3. merge runs of equal weight
    index = 0
    while index + 1 < len(pieces):
        if pieces[index][1] == pieces[index + 1][1]:
            pieces[index][0] += pieces[index + 1][0]
            pieces.pop(index + 1)
        else:
            index += 1
    return pieces
