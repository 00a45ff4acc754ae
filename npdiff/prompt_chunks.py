"""A prompt in webui's syntax -> 77-token chunks of ids with a weight per token, as AUTOMATIC1111's webui
makes them (modules/sd_hijack_clip.py, tokenize_line).

    chunks = prompt_chunks(tokenizer, "(masterpiece:1.2), a cat BREAK blue sky")
    chunks[0].ids          # 77 ints: start, up to 75 prompt ids, end, padding
    chunks[0].multipliers  # 77 floats: 1.0 for start, end and padding, the piece's weight elsewhere

The rules:
  1. the prompt is parsed into weighted pieces (npdiff/prompt_parser.py); each piece is tokenized on its
     own, without start and end tokens;
  2. the ids fill chunks of 75; a full chunk becomes [start] + 75 ids + [end] = 77;
  3. comma backtrack: when a chunk is full and its last comma is at most 20 ids back, the ids after that
     comma move to the next chunk, so that a phrase is not cut in two;
  4. BREAK closes the current chunk, padded, and starts a new one;
  5. the last chunk is padded to 77 with the end id; a prompt always has at least one chunk;
  6. every id after a chunk's first end id becomes the tokenizer's pad id ("!", id 0, for SD 2.x and
     SDXL's second tokenizer; the end id itself for SD 1.x, where nothing changes).
Padding and start/end tokens weigh 1.0. A textual-inversion token of several vectors is expanded in each
piece as in plain prompts (tokenizer.expand_multi_vector_tokens) and, as webui places an embedding, never
split: when its vectors do not fit in the current chunk they start the next one (one of more than 75
vectors fits no chunk: an NpdiffError naming it).
"""

from dataclasses import dataclass, field

from npdiff.errors import NpdiffError
from npdiff.prompt_parser import BREAK_MARKER, parse_prompt_attention

CHUNK_LENGTH = 75  # prompt ids per chunk, between the start and the end id
COMMA_BACKTRACK = 20  # webui's comma_padding_backtrack setting, default 20
COMMA_TOKEN = ",</w>"


@dataclass
class PromptChunk:
    ids: list = field(default_factory=list)
    multipliers: list = field(default_factory=list)


def prompt_chunks(tokenizer, prompt):
    """One prompt (webui syntax) -> [PromptChunk] of 77 ids and 77 multipliers each (rules 1-6 above)."""
    # 1. weighted pieces, each tokenized on its own
    pieces = parse_prompt_attention(prompt)
    comma_id = tokenizer.get_vocab().get(COMMA_TOKEN)
    groups = multi_vector_groups(tokenizer)  # first id -> the ids of one multi-vector embedding
    chunks = []
    chunk = PromptChunk()
    last_comma = -1  # position in chunk.ids of the last comma, -1 when none

    def close_chunk():
        # 2./4./5. pad with the end id to 75, then wrap in start and end
        nonlocal chunk, last_comma
        padding = CHUNK_LENGTH - len(chunk.ids)
        end = tokenizer.eos_token_id
        chunk.ids = [tokenizer.bos_token_id] + chunk.ids + [end] * padding + [end]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * padding + [1.0]
        chunks.append(chunk)
        chunk = PromptChunk()
        last_comma = -1

    for text, weight in pieces:
        if [text, weight] == BREAK_MARKER:
            close_chunk()
            continue
        ids = tokenizer.encode(tokenizer.expand_multi_vector_tokens(text))
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma_id:
                last_comma = len(chunk.ids)
            # 3. a full chunk with a comma near its end: the ids after the comma go to the next chunk
            elif (len(chunk.ids) == CHUNK_LENGTH and last_comma != -1
                  and len(chunk.ids) - last_comma <= COMMA_BACKTRACK):
                moved_ids = chunk.ids[last_comma + 1:]
                moved_multipliers = chunk.multipliers[last_comma + 1:]
                chunk.ids = chunk.ids[:last_comma + 1]
                chunk.multipliers = chunk.multipliers[:last_comma + 1]
                close_chunk()
                chunk.ids, chunk.multipliers = moved_ids, moved_multipliers
            if len(chunk.ids) == CHUNK_LENGTH:
                close_chunk()
            group = groups.get(token)
            if group is None or ids[position:position + len(group)] != group:
                group = [token]
            elif len(group) > CHUNK_LENGTH:  # webui's chunk would pass 77 ids, which CLIP cannot read
                word = next(word for word, names in tokenizer.multi_vector_tokens.items()
                            if tokenizer.convert_tokens_to_ids(names) == group)
                raise NpdiffError(f"the textual inversion word {word!r} has "
                                  f"{len(group)} vectors; a prompt chunk holds {CHUNK_LENGTH} tokens, so it cannot "
                                  "be used in a prompt")
            elif len(chunk.ids) + len(group) > CHUNK_LENGTH:  # an embedding's vectors stay in one chunk
                close_chunk()
            chunk.ids += group
            chunk.multipliers += [weight] * len(group)
            position += len(group)
    if chunk.ids or not chunks:
        close_chunk()
    # 6. ids after the first end id -> the pad id
    for closed in chunks:
        first_end = closed.ids.index(tokenizer.eos_token_id)
        closed.ids[first_end + 1:] = [tokenizer.pad_token_id] * (len(closed.ids) - first_end - 1)
    return chunks


def multi_vector_groups(tokenizer):
    """{id of a multi-vector token's first vector: the ids of all its vectors} (textual inversion)."""
    groups = {}
    for names in getattr(tokenizer, "multi_vector_tokens", {}).values():
        ids = tokenizer.convert_tokens_to_ids(names)
        groups[ids[0]] = ids
    return groups

