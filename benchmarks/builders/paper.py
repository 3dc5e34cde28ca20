"""Data builders for the paper's fine-tuning sets (Li et al. 2024): hub datasets in Alpaca prompts.

``alpaca``    rows with instruction / optional input / output columns (Open-Platypus, MetaMathQA, Alpaca itself)
``sharegpt``  ShareGPT conversations, a ``conversations`` list of ``{from, value}`` turns, flattened to pairs

Both take ``load:``, the ``datasets.load_dataset`` arguments (a hub id or local json/csv/parquet files, exactly as
a task's ``source:``), and return a ``train`` split of ``prompt``/``target`` rows; the stream holds out its eval rows
(``eval_size:``). Prompts are Stanford Alpaca's templates, as the Alpaca-tuned base model was trained on; the
target is the response (the engine appends EOS). ``n`` keeps a seeded random subset (None: every row).
"""
from __future__ import annotations

from typing import Any

from datasets import Dataset

from clsuite.errors import UserError
from clsuite.streams import data_builder, load_hf

ALPACA_HEAD = "Below is an instruction that describes a task"
ALPACA_NO_INPUT = (f"{ALPACA_HEAD}. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = (f"{ALPACA_HEAD}, paired with an input that provides further context. Write a response that "
                "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
                "### Response:\n")
HUMAN = ("human", "user")
ASSISTANT = ("gpt", "assistant", "chatgpt", "bing", "bard")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """Stanford Alpaca's prompt: the with-input template when ``input`` is not blank."""
    if input.strip():
        return ALPACA_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def _train_split(name: str, load: Any, seed: int, n: int | None) -> Dataset:
    """The ``train`` split of ``load_dataset(**load)`` (``split:`` picks another), a seeded subset of ``n`` rows."""
    if not isinstance(load, dict) or not load:
        raise UserError(f"data builder {name!r}: 'load:' must be load_dataset arguments, e.g. "
                        f"{{path: json, data_files: my.json}} or {{path: org/dataset, split: train}}, got {load!r:.60}")
    splits = load_hf(load, f"data builder {name!r}")
    if "train" not in splits:
        raise UserError(f"data builder {name!r}: the data has splits {list(splits)}, no 'train': "
                        "pick one with load: {split: NAME}")
    ds = splits["train"]
    if n is not None:
        if not isinstance(n, int) or n < 1:
            raise UserError(f"data builder {name!r}: n must be a positive number of rows, got {n!r}")
        ds = ds.shuffle(seed=seed).select(range(min(n, len(ds))))
    return ds


def _need_columns(name: str, ds: Dataset, columns: list[str | None]) -> None:
    missing = [c for c in columns if c is not None and c not in ds.column_names]
    if missing:
        raise UserError(f"data builder {name!r}: column(s) {', '.join(missing)} not in the data (columns: "
                        f"{', '.join(ds.column_names)}); name the right ones in the builder's options")


@data_builder("alpaca")
def alpaca(seed: int, load: dict, instruction: str = "instruction", output: str = "output",
           input: str | None = None, n: int | None = None) -> dict[str, Dataset]:
    """Instruction rows in Alpaca prompts: column ``instruction`` (+ ``input`` if given, not blank) -> ``output``."""
    ds = _train_split("alpaca", load, seed, n)
    _need_columns("alpaca", ds, [instruction, output, input])

    def fmt(row: dict) -> dict:
        return {"prompt": alpaca_prompt(str(row[instruction]), str(row[input] or "") if input else ""),
                "target": str(row[output])}

    return {"train": ds.map(fmt, remove_columns=ds.column_names)}


def conversation_pairs(turns: list[dict], text: str, all_turns: bool) -> list[tuple[str, str]]:
    """(prompt, target) pairs of one conversation; roles other than human/assistant (e.g. system) are skipped.

    First mode: the first human turn answered by an assistant turn. All mode: every assistant turn that answers
    a human turn, its prompt holding the earlier exchanges as alternating Instruction/Response sections.
    """
    msgs = [(t.get("from"), t.get(text)) for t in turns if t.get("from") in HUMAN + ASSISTANT]
    pairs, history = [], ""
    for (r1, h), (r2, g) in zip(msgs, msgs[1:]):
        if r1 in HUMAN and r2 in ASSISTANT and isinstance(h, str) and isinstance(g, str):
            prompt = alpaca_prompt(h)
            pairs.append((prompt.replace("### Instruction:", history + "### Instruction:", 1), g))
            if not all_turns:
                break
            history += f"### Instruction:\n{h}\n\n### Response:\n{g}\n\n"
    return pairs


@data_builder("sharegpt")
def sharegpt(seed: int, load: dict, turns: str = "first", column: str = "conversations", text: str = "value",
             n: int | None = None) -> dict[str, Dataset]:
    """ShareGPT conversations as Alpaca prompts: ``turns: first`` (one pair per conversation) or ``all``."""
    if turns not in ("first", "all"):
        raise UserError(f"data builder 'sharegpt': turns must be 'first' or 'all', got {turns!r}")
    ds = _train_split("sharegpt", load, seed, n)
    _need_columns("sharegpt", ds, [column])

    def flatten(batch: dict) -> dict:
        out: dict[str, list[str]] = {"prompt": [], "target": []}
        for conv in batch[column]:
            if not isinstance(conv, list) or not all(isinstance(t, dict) for t in conv):
                raise UserError(f"data builder 'sharegpt': column {column!r} must hold lists of "
                                f"{{from, {text}}} turns, got {conv!r:.80}")
            for p, t in conversation_pairs(conv, text, turns == "all"):
                out["prompt"].append(p)
                out["target"].append(t)
        return out

    rows = ds.map(flatten, batched=True, remove_columns=ds.column_names)
    if len(rows) == 0:
        raise UserError(f"data builder 'sharegpt': no human turn answered by an assistant turn in {len(ds)} "
                        f"conversations (roles read from 'from', text from {text!r}: {', '.join(HUMAN + ASSISTANT)})")
    return {"train": rows}
