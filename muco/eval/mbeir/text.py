"""M-BEIR query and candidate texts: the M-BEIR string conventions, then the MuCo single-turn template.

M-BEIR's loaders (UniIR's ``MBEIRMainDataset`` and ``MBEIRCandidatePoolDataset``, reused by LamRA) build a query
as ``format(format(instruction) + " " + query_txt)`` and a candidate as ``format(txt)``, where ``format`` strips
the string (and surrounding double quotes), drops carriage returns, capitalises the first character and appends
a period unless it ends in ``.``, ``?`` or ``!``. Candidates get no instruction. The instruction is the row of
``query_instructions.tsv`` for the query's dataset id (the qid prefix), query modality and the task's candidate
modality.

MuCo (docs/method.md §12b: "a per-dataset/task instruction table that prefixes each query") encodes the result
with its evaluation template ``BASE(u)`` and one ``<|emb|>``, like every other item (method.md §4):
``u = IMG + "\\n" + text + "\\n"`` with an image, ``text + "\\n"`` without, ``IMG + "\\n"`` for an image alone.

UniIR and LamRA draw the instruction with ``random.choice`` for every query, so their scores move a little from
run to run. ``per_query`` (the default) keeps that uniform spread over the table's instructions but makes the
choice a fixed function of the qid (CRC-32), so a rerun gives the same texts; ``first`` always takes the first
instruction, ``none`` leaves instructions out (UniIR's "no instruct" setting).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from muco.eval.mbeir.data import InstructionTable, MBeirCandidate, MBeirQuery
from muco.inputs.templates import IMG, find_reserved, single_turn_user_text


def format_string(s: str | None) -> str:
    """M-BEIR's text normalisation: stripped, no CR, first character upper-case, ending in ``.``/``?``/``!``."""
    s = (s or "").replace("\r", "").strip().strip('"')
    if not s:
        return s
    s = s[0].upper() + s[1:]
    return s if s[-1] in ".?!" else s + "."


def pick_instruction(prompts: Sequence[str], qid: str, choice: str = "per_query") -> str:
    """One of ``prompts`` for the query ``qid`` (see the module docstring), or "" with ``choice="none"``."""
    if choice == "none":
        return ""
    if not prompts:
        raise ValueError("no instruction to choose from")
    if choice == "first":
        return prompts[0]
    if choice == "per_query":
        return prompts[zlib.crc32(qid.encode("utf-8")) % len(prompts)]
    raise ValueError(f"unknown instruction choice {choice!r}; use per_query, first or none")


def instruction_for(table: InstructionTable, query: MBeirQuery, cand_modality: str, choice: str) -> str:
    """The query's instruction from the table; a missing table row is a ValueError naming the key."""
    if choice == "none":
        return ""
    key = (query.dataset_id, query.modality, cand_modality)
    prompts = table.get(key)
    if not prompts:
        raise ValueError(f"the instruction table has no row for dataset id {key[0]}, query modality {key[1]!r}, "
                         f"candidate modality {key[2]!r}")
    return pick_instruction(prompts, query.qid, choice)


def _user_text(text: str, has_image: bool, what: str) -> str:
    bad = find_reserved(text)
    if bad is not None:
        raise ValueError(f"{what} contains the reserved string {bad!r}: {text[:80]!r}")
    if not text:
        if not has_image:
            raise ValueError(f"{what} has neither text (after normalisation) nor an image")
        return IMG + "\n"  # an image alone (the encoder's image-only form)
    return single_turn_user_text(text, has_image)


def query_user_text(query: MBeirQuery, instruction: str = "") -> str:
    """The user text ``u`` of ``BASE(u)`` for a query with its (raw) instruction."""
    text = format_string(f"{format_string(instruction)} {query.text}") if instruction else format_string(query.text)
    return _user_text(text, query.image_path is not None, f"query {query.qid}")


def candidate_user_text(cand: MBeirCandidate) -> str:
    """The user text ``u`` of ``BASE(u)`` for a pool candidate (no instruction)."""
    return _user_text(format_string(cand.text), cand.image_path is not None, f"candidate {cand.did}")
