"""A tiny M-BEIR on disk, shaped like the released TIGER-Lab/M-BEIR files (see muco/eval/mbeir/data.py).

``write_mbeir(root, tasks)`` writes, under ``root``: ``query/test/mbeir_<name>_test.jsonl``,
``cand_pool/local/mbeir_<name>[_test]_cand_pool.jsonl``, ``cand_pool/global/mbeir_union_test_cand_pool.jsonl``
(the local pools concatenated and sorted by did, as UniIR's data generator builds it),
``qrels/test/mbeir_<name>_test_qrels.txt``, ``instructions/query_instructions.tsv`` and JPEG images under
``mbeir_images/``, plus a task list ``tasks.yaml``. Images are solid colours made with PIL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

MODALITY = {0: ("text", "image"), 1: ("text", "text"), 2: ("text", "image,text"), 3: ("image", "text"),
            4: ("image", "image"), 6: ("image,text", "text"), 7: ("image,text", "image"),
            8: ("image,text", "image,text")}


@dataclass
class FixtureTask:
    """One dataset-task pair: its dataset, the candidates (did number -> caption) and queries."""

    name: str
    dataset: str
    dataset_id: int
    task_id: int
    k: int = 5
    cands: dict[int, str] = field(default_factory=dict)  # did number -> caption (unused for image-only pools)
    queries: list[tuple[int, str, list[str]]] = field(default_factory=list)  # (qid number, text, positive dids)
    test_pool_name: bool = False  # MSCOCO: mbeir_mscoco_task<N>_test_cand_pool.jsonl

    @property
    def pool_file(self) -> str:
        middle = f"{self.name}_test" if self.test_pool_name else self.name
        return f"cand_pool/local/mbeir_{middle}_cand_pool.jsonl"

    @property
    def query_file(self) -> str:
        return f"query/test/mbeir_{self.name}_test.jsonl"

    @property
    def qrels_file(self) -> str:
        return f"qrels/test/mbeir_{self.name}_test_qrels.txt"


def image_rel(dataset: str, name: str) -> str:
    return f"mbeir_images/{dataset.lower()}_images/{name}.jpg"


def _image(root: Path, rel: str, seed: int) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        Image.new("RGB", (32, 28), ((37 * seed) % 256, (91 * seed) % 256, (53 * seed) % 256)).save(path, "JPEG")
    return rel


def pool_rows(root: Path, t: FixtureTask) -> list[dict]:
    """The pool lines of a task: text, image or image+text candidates by the task's candidate modality."""
    cm = MODALITY[t.task_id][1]
    rows = []
    for n, caption in t.cands.items():
        did = f"{t.dataset_id}:{n}"
        img = _image(root, image_rel(t.dataset, f"cand{n}"), t.dataset_id * 100 + n) if "image" in cm else None
        txt = caption if "text" in cm else ("" if n % 2 else None)  # released image candidates: "" or null
        rows.append({"did": did, "txt": txt, "img_path": img, "modality": cm,
                     "src_content": json.dumps({"id": n, "source": t.dataset})})
    return rows


def query_rows(root: Path, t: FixtureTask) -> list[dict]:
    qm = MODALITY[t.task_id][0]
    rows = []
    for n, text, pos in t.queries:
        img = _image(root, image_rel(t.dataset, f"query{n}"), t.dataset_id * 100 + 50 + n) if "image" in qm else None
        rows.append({"qid": f"{t.dataset_id}:{n}", "query_txt": text if "text" in qm else None,
                     "query_img_path": img, "query_modality": qm,
                     "query_src_content": json.dumps({"id": n}), "pos_cand_list": pos, "neg_cand_list": [],
                     "task_id": t.task_id})
    return rows


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


INSTRUCTIONS = {  # four per row, as released; the wording here is the fixture's own
    "text": "Find the {c} that matches this text", "image": "Find the {c} for this picture",
    "image,text": "Given the picture and the request, find the {c}",
}


def write_mbeir(root: Path, tasks: list[FixtureTask], global_pool: bool = True) -> Path:
    """Write the files of ``tasks`` under ``root``; returns the task list YAML."""
    everything = []
    for t in tasks:
        pool = pool_rows(root, t)
        everything += pool
        _jsonl(root / t.pool_file, pool)
        _jsonl(root / t.query_file, query_rows(root, t))
        qrels = root / t.qrels_file
        qrels.parent.mkdir(parents=True, exist_ok=True)
        qrels.write_text("".join(f"{t.dataset_id}:{n} 0 {did} 1 {t.task_id}\n" for n, _, pos in t.queries
                                 for did in pos))
    if global_pool:
        unique = {r["did"]: r for r in everything}
        ordered = sorted(unique.values(), key=lambda r: tuple(int(x) for x in r["did"].split(":")))
        _jsonl(root / "cand_pool/global/mbeir_union_test_cand_pool.jsonl", ordered)
    lines = ["query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1\tprompt_2\tprompt_3\tprompt_4"]
    for t in {(t.dataset, t.dataset_id, *MODALITY[t.task_id]): t for t in tasks}:
        dataset, did, qm, cm = t
        prompts = [INSTRUCTIONS[qm].format(c=cm.replace(",", " and ")) + suffix for suffix in ("", " please",
                                                                                              " now", "")]
        prompts[3] = ""  # an empty cell, as rows with fewer instructions have
        lines.append("\t".join([qm, cm, dataset, str(did), *prompts]))
    inst = root / "instructions" / "query_instructions.tsv"
    inst.parent.mkdir(parents=True, exist_ok=True)
    inst.write_text("\n".join(lines) + "\n")
    yaml = root / "tasks.yaml"
    entries = "".join(
        f"  - {{name: {t.name}, dataset: {t.dataset}, task_id: {t.task_id}, k: {t.k}, queries: {t.query_file}, "
        f"pool: {t.pool_file}, qrels: {t.qrels_file}}}\n" for t in tasks)
    glob = "global_pool: cand_pool/global/mbeir_union_test_cand_pool.jsonl\n" if global_pool else ""
    yaml.write_text(f"root: {root}\ninstructions: instructions/query_instructions.tsv\n{glob}tasks:\n{entries}")
    return yaml


def default_tasks() -> list[FixtureTask]:
    """Six tasks covering the four modality groups (S->S three times, S->M, M->S, M->M)."""
    return [
        FixtureTask("visualnews_task0", "VisualNews", 0, 0, cands={1: "", 2: "", 3: "", 4: "", 5: "", 6: ""},
                    queries=[(1, "Flooding closes the main road", ["0:1"]),
                             (2, "the mayor opens a new bridge", ["0:2"])]),
        FixtureTask("mscoco_task3", "MSCOCO", 9, 3, test_pool_name=True,
                    cands={1: "A cat sleeping on a sofa", 2: "two dogs running on a beach", 3: "A plate of food",
                           4: "a red bus in the street", 5: "people skiing down a hill"},
                    queries=[(1, "", ["9:1"]), (2, "", ["9:2", "9:5"])]),
        FixtureTask("fashion200k_task0", "Fashion200K", 1, 0, k=10, cands={1: "", 2: "", 3: "", 4: ""},
                    queries=[(1, "blue denim jacket", ["1:1"]), (2, "black leather boots", ["1:3"])]),
        FixtureTask("webqa_task2", "WebQA", 2, 2,
                    cands={1: "The Eiffel Tower at night", 2: "A map of the river delta", 3: "An old steam engine",
                           4: "Crowd at a football match"},
                    queries=[(1, "What colour is the tower lit at night?", ["2:1"]),
                             (2, "How many carriages did the engine pull?", ["2:3"])]),
        FixtureTask("cirr_task7", "CIRR", 8, 7, cands={1: "", 2: "", 3: "", 4: ""},
                    queries=[(1, "same dog but lying on grass", ["8:2"]), (2, "with more people in it", ["8:4"])]),
        FixtureTask("oven_task8", "OVEN", 5, 8,
                    cands={1: "Golden Gate Bridge. A suspension bridge", 2: "Boeing 747. A wide-body airliner",
                           3: "Red fox. A small canid", 4: "Mount Fuji. A volcano in Japan"},
                    queries=[(1, "what is this bridge called?", ["5:1"]), (2, "which mountain is this?", ["5:4"])]),
    ]
