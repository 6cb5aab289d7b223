"""The evaluation harness: the standard 1-shot protocol on CHAOS (``fewshot``) and what a user gets
(``product``), every method on one SAM backend and one persistent embedding cache.

Protocols (see docs/RESULTS.md for the numbers):
- Folds, organs and files: ``datasets.py`` (volumes sorted by numeric id; positions {0-4}, {4-8}, {8-12},
  {12-16}, {16-19, 0}).
- ``fewshot``: the support is the fold's volume at position 2 (removed from the queries). From its slices
  holding the organ (a sorted list of n slices) the supports are the slices at list positions
  floor(n/6), floor(n/2), floor(5n/6) (fractions 1/6, 1/2, 5/6). Each query volume keeps only its slices
  holding the organ, split into 3 equal chunks (``numpy.array_split``); chunk j is segmented with support
  j, each slice independently (no propagation). Dice is 3D over the evaluated slices of each query volume.
- ``product``: each test volume of the fold is painted on one slice (the middle of the organ's slices in
  that volume; the engine needs the example on the image it segments), then the engine propagates with
  automatic extent over the whole volume. Dice is 3D over the whole volume (painted slice included; the
  Dice without it is reported too), with the number of slices segmented outside the true extent and of
  true slices missed.
- Aggregation: mean over volumes per organ, then over the four organs = the fold's score; mean and
  standard deviation (population) over folds. Dice in percent.
- ``clicks``: the product protocol's start, then rounds of one simulated corrective click per slice
  (``clickbench.py``); every volume once (no folds: nothing here is trained on these labels). With
  ``--image``/``--label`` a single labelled volume (e.g. the TotalSegmentator CT) and any label numbers.
- Settings (for methods that train, i.e. FoB): 1 = training may see the test organs unlabeled; 2 = the
  training slices holding any of the four test organs are excluded. Training-free methods ignore it.
- FoB: ``FoBGenerator(weights=path)`` from ``prompts/fob.py`` with the fold's model at
  ``FOB_WEIGHTS_PATTERN`` (``--fob-weights`` overrides); skipped with a message when absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from FewShotSAMLib.clicks import dice  # noqa: F401 - the harness's Dice (E.dice)
from FewShotSAMLib.errors import UserInputError
from FewShotSAMLib.sam.names import BACKEND_NAMES, DEFAULT_SAM
from FewShotSAMLib.slices import OUTSIDE_LOGIT
from FewShotSAMLib.threads import single_threaded_blas
from FewShotSAMLib.volume import atomic_write, atomic_write_text

from .datasets import (ORGANS, fold_volume_ids, list_cases, organ_name, organ_slices, parse_folds,
                       parse_organs, target_mask)

log = logging.getLogger(__name__)

SUPPORT_POSITION = 2
SUPPORT_FRACTIONS = (1 / 6, 1 / 2, 5 / 6)
TRAINING_FREE = ("persam", "p2sam", "synpo", "boxprop", "coarse")
FOB_WEIGHTS_PATTERN = ".cache/fob/setting{setting}/fold{fold}/fob.pt"
SETTINGS = {
    1: "Setting 1: training may see the test organs (unlabeled, e.g. as superpixel pseudo-labels).",
    2: "Setting 2: training slices that contain any of the four test organs are excluded.",
}


# ----------------------------------------------------------------------------------------------------
# Supports and chunks (the fewshot protocol; folds, organs and files: datasets.py)
# ----------------------------------------------------------------------------------------------------
def support_slice_indices(slices: Sequence[int]) -> list[int]:
    """The 3 support slices at fractions 1/6, 1/2, 5/6 of the organ's sorted slice list."""
    s = list(slices)
    if not s:
        raise ValueError("the support volume does not hold the organ")
    return [s[min(len(s) - 1, int(np.floor(f * len(s))))] for f in SUPPORT_FRACTIONS]


def query_chunks(slices: Sequence[int], n: int = 3) -> list[list[int]]:
    """The organ's slices of a query volume split into ``n`` equal (contiguous) chunks."""
    return [list(map(int, c)) for c in np.array_split(np.asarray(list(slices), int), n)]


# ----------------------------------------------------------------------------------------------------
# Data access (one backend, one cache)
# ----------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One volume prepared for the backend: image geometry, label map, PreparedVolume along axis 0."""

    id: int
    label: np.ndarray
    prepared: object  # slices.PreparedVolume
    image: np.ndarray
    spacing: np.ndarray


class CaseStore:
    """Loads volumes lazily and keeps them; all share one backend and one embedding cache."""

    def __init__(self, cases: Sequence[tuple[int, Path, Path]], backend, cache) -> None:
        self.paths = {cid: (img, lab) for cid, img, lab in cases}
        self.backend = backend
        self.cache = cache
        self.local_corrections = True  # what a session does with a corrective re-run (corrections.changes_at_points)
        self.shape = None  # the engine's ShapeRules for every segmentation (None: its defaults)
        self.generic_labels = False  # targets named label_<n> (any labelled image) instead of CHAOS organs
        self._cases: dict[int, Case] = {}

    @property
    def ids(self) -> list[int]:
        """Sorted case ids."""
        return sorted(self.paths)

    def get(self, cid: int) -> Case:
        """The case ``cid`` (read once)."""
        if cid not in self._cases:
            from FewShotSAMLib.slices import PreparedVolume
            from FewShotSAMLib.volume import choose_intensity, label_on_image_grid, read_volume

            img, lab = self.paths[cid]
            vol = read_volume(img)
            label = label_on_image_grid(vol, read_volume(lab, "label map")).astype(np.uint8)
            pv = PreparedVolume(vol.array, vol.spacing, 0, choose_intensity(vol.array, vol.metadata),
                                self.backend.input_size)
            self._cases[cid] = Case(cid, label, pv, vol.array, vol.spacing)
        return self._cases[cid]

    def session(self, case: Case):
        """A VolumeSession of ``case`` on the store's backend, cache and intensities."""
        from FewShotSAMLib.engine import VolumeSession

        session = VolumeSession(case.image, case.spacing, sam=self.backend, intensity=case.prepared.intensity,
                                cache=self.cache)
        session.local_corrections = self.local_corrections
        return session

    def embedding(self, case: Case, index: int):
        """The cached embedding of slice ``index`` of ``case`` (encoded once if missing)."""
        pv = case.prepared
        return self.cache.get(pv.key(index), pv.frame_for_key)


# ----------------------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------------------
def fob_weights_path(pattern: str, fold: int, setting: int) -> Path:
    """The FoB weights of ``fold`` and ``setting`` from a pattern with {fold} and {setting}."""
    return Path(pattern.format(fold=fold, setting=setting))


def make_method(name: str, fold: int, setting: int, fob_pattern: str = FOB_WEIGHTS_PATTERN,
                fob_mode: Optional[str] = None):
    """The generator for ``name`` on ``fold``; for fob the fold's model (prompt mode ``fob_mode``, None for
    the one recorded with the weights), or None when its weights are absent."""
    from FewShotSAMLib.prompts import make_generator

    if name == "fob":
        path = fob_weights_path(fob_pattern, fold, setting)
        if not path.exists():
            return None
        from FewShotSAMLib.prompts.fob import FoBGenerator

        return FoBGenerator(weights=str(path), mode=fob_mode)
    return make_generator(name)


# ----------------------------------------------------------------------------------------------------
# Protocols
# ----------------------------------------------------------------------------------------------------
def _decode_model_mask(backend, emb, prompts, valid) -> np.ndarray:
    if prompts.is_empty:
        return np.zeros(valid.shape, bool)
    return backend.decode(emb, prompts).logits > 0


def fewshot_volume(store: CaseStore, generator, support_case: Case, query_case: Case, organ: int
                   ) -> tuple[float, int, float]:
    """Dice (%) of one query volume for one organ under the fewshot protocol, the number of evaluated
    slices and the seconds spent generating and decoding."""
    from FewShotSAMLib.prompts.base import QueryContext, Support

    backend = store.backend
    spv, qpv = support_case.prepared, query_case.prepared
    sup_idx = support_slice_indices(organ_slices(support_case.label, organ))
    supports = [Support(store.embedding(support_case, i), spv.mask_to_model(target_mask(support_case.label[i], organ)), i)
                for i in sup_idx]
    q_slices = organ_slices(query_case.label, organ)
    pred = np.zeros((len(q_slices),) + query_case.label.shape[1:], bool)
    truth = target_mask(query_case.label[q_slices], organ)
    seconds = 0.0
    k = 0
    for j, chunk in enumerate(query_chunks(q_slices)):
        for q in chunk:
            emb = store.embedding(query_case, q)
            t0 = time.perf_counter()
            ctx = QueryContext(None, qpv.valid, q, 0)
            prompts = generator.generate(supports[j], emb, ctx, backend)
            if prompts.is_empty:
                logits = np.full(qpv.valid.shape, OUTSIDE_LOGIT, np.float32)
            else:
                logits = np.where(qpv.valid, backend.decode(emb, prompts).logits, OUTSIDE_LOGIT)
            pred[k] = qpv.frame.to_native(logits) > 0
            seconds += time.perf_counter() - t0
            k += 1
    return dice(pred, truth), len(q_slices), seconds


def middle_slice_example(label: np.ndarray, organ: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(reference mask, example painted on the middle of the organ's slices, that slice's index): the start
    of the product and clicks protocols."""
    sl = organ_slices(label, organ)
    painted = int(sl[len(sl) // 2])
    truth = target_mask(label, organ)
    example = np.zeros_like(truth)
    example[painted] = truth[painted]
    return truth, example, painted


def target_name(store: CaseStore, organ: int) -> str:
    """A target's name in results: the CHAOS organ's, or ``label_<n>`` on any other labelled image."""
    return f"label_{organ}" if store.generic_labels else organ_name(organ)


def product_volume(store: CaseStore, generator, case: Case, organ: int) -> dict:
    """Product protocol on one volume and organ: Dice (%), slices outside the true extent, missed slices."""
    sl = organ_slices(case.label, organ)
    truth, example, painted = middle_slice_example(case.label, organ)
    session = store.session(case)
    t0 = time.perf_counter()
    res = session.segment(example, generator=generator, extent="auto", axis=0, shape=store.shape)
    seconds = time.perf_counter() - t0
    seg = set(res.segmented_slices)
    true = set(int(s) for s in sl)
    others = np.ones(len(truth), bool)
    others[painted] = False
    return {"dice": dice(res.mask, truth), "dice_without_painted": dice(res.mask[others], truth[others]),
            "outside": len(seg - true), "missed": len(true - seg), "slices": len(seg | true),
            "seconds": seconds, "painted": painted}


@single_threaded_blas()
def evaluate(store: CaseStore, protocol: str, methods: Sequence[str], folds: dict[int, list[int]], setting: int,
             organs: Sequence[int] = tuple(ORGANS), fob_pattern: str = FOB_WEIGHTS_PATTERN,
             progress: Optional[Callable[[str], None]] = None,
             on_fold: Optional[Callable[[dict], None]] = None, fob_mode: Optional[str] = None) -> dict:
    """Run ``protocol`` for ``methods`` over ``folds`` ({fold: [volume ids], support at position 2}).

    Folds are the outer loop (every method on fold k before fold k+1), so ``on_fold(partial_result)``
    can save the folds finished so far. Returns the JSON-ready result (see ``summarise``).
    """
    if protocol not in ("fewshot", "product"):
        raise UserInputError(f"Unknown protocol '{protocol}'; use fewshot or product.")
    out = {"protocol": protocol, "setting": int(setting), "sam": store.backend.name,
           "folds": {str(k): v for k, v in folds.items()}, "organs": [target_name(store, o) for o in organs],
           "methods": {}, "skipped": {}, "complete": False}
    records: dict[str, list] = {m: [] for m in methods}
    seconds = {m: 0.0 for m in methods}
    n_slices = {m: 0 for m in methods}
    for fold, ids in folds.items():
        for name in methods:
            if name in out["skipped"]:
                continue
            gen = make_method(name, fold, setting, fob_pattern, fob_mode)
            if gen is None:
                msg = (f"no FoB weights at {fob_weights_path(fob_pattern, fold, setting)} (train the fold's model "
                       "first or pass --fob-weights)")
                log.warning("skipping %s: %s", name, msg)
                out["skipped"][name] = msg
                continue
            if protocol == "fewshot":
                support = store.get(ids[SUPPORT_POSITION])
                queries = [i for k, i in enumerate(ids) if k != SUPPORT_POSITION]
                for organ in organs:
                    for qid in queries:
                        d, n, sec = fewshot_volume(store, gen, support, store.get(qid), organ)
                        records[name].append({"fold": fold, "volume": qid, "support": support.id,
                                              "organ": target_name(store, organ), "dice": round(d, 4), "slices": n})
                        seconds[name] += sec
                        n_slices[name] += n
                        if progress:
                            progress(f"{name} fold {fold} {target_name(store, organ)} volume {qid}: Dice {d:.2f}")
            else:
                for organ in organs:
                    for vid in ids:
                        r = product_volume(store, gen, store.get(vid), organ)
                        seconds[name] += r.pop("seconds")
                        n_slices[name] += r["slices"]
                        records[name].append({"fold": fold, "volume": vid, "organ": target_name(store, organ),
                                              **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}})
                        if progress:
                            progress(f"{name} fold {fold} {target_name(store, organ)} volume {vid}: Dice {r['dice']:.2f}")
        out["methods"] = {m: summarise(records[m], seconds[m] / max(1, n_slices[m]), out["organs"])
                          for m in methods if records[m]}
        out["folds_done"] = sorted({r["fold"] for rs in records.values() for r in rs})
        if on_fold:
            on_fold(out)
    out["complete"] = True
    return out


@single_threaded_blas()
def evaluate_clicks(store: CaseStore, methods: Sequence[str], organs: Sequence[int], rounds: int,
                    progress: Optional[Callable[[str], None]] = None, targets_desc: str = "") -> dict:
    """The click benchmark (``clickbench.py``) for ``methods`` on every volume of ``store`` and ``organs``
    (FoB with the shipped weights for the backend, which saw no label)."""
    from FewShotSAMLib.prompts import make_generator

    from . import clickbench

    names = [target_name(store, o) for o in organs]
    out = {"protocol": "clicks", "sam": store.backend.name, "rounds": int(rounds), "organs": names,
           "volumes_ids": store.ids, "targets_desc": targets_desc, "methods": {}, "complete": False}
    for name in methods:
        gen = make_generator(name, sam=store.backend.name)
        records = []
        for organ, oname in zip(organs, names):
            for vid in store.ids:
                case = store.get(vid)
                if not len(organ_slices(case.label, organ)):
                    continue
                truth, example, _ = middle_slice_example(case.label, organ)
                result = clickbench.click_session(store.session(case), example, truth, gen, rounds, shape=store.shape)
                if progress:
                    progress(f"{store.backend.name} {name} volume {vid} {oname}: Dice per round "
                             + " -> ".join(f"{v:.1f}" for v in result["dice_per_round"]))
                records.append(clickbench.record(vid, oname, result, rounds))
        out["methods"][name] = clickbench.summarise_clicks(records, names)
    out["complete"] = True
    return out


def summarise(records: list[dict], s_per_slice: float, organ_names: Sequence[str]) -> dict:
    """Per-fold, per-organ and overall means (Dice %) of per-volume records, std over folds."""
    folds = sorted({r["fold"] for r in records})
    fold_rows = []
    for f in folds:
        per = {}
        for o in organ_names:
            v = [r["dice"] for r in records if r["fold"] == f and r["organ"] == o]
            if v:
                per[o] = float(np.mean(v))
        row = {"fold": f, "mean": float(np.mean(list(per.values()))), "per_organ": per}
        if "outside" in records[0]:
            sel = [r for r in records if r["fold"] == f]
            row["outside_per_volume"] = float(np.mean([r["outside"] for r in sel]))
            row["missed_per_volume"] = float(np.mean([r["missed"] for r in sel]))
        fold_rows.append(row)
    means = [r["mean"] for r in fold_rows]
    per_organ = {o: float(np.mean([r["per_organ"][o] for r in fold_rows if o in r["per_organ"]]))
                 for o in organ_names}
    per_organ_std = {o: float(np.std([r["per_organ"][o] for r in fold_rows if o in r["per_organ"]]))
                     for o in organ_names}
    res = {"mean": float(np.mean(means)), "std_over_folds": float(np.std(means)), "per_organ": per_organ,
           "per_organ_std_over_folds": per_organ_std, "folds": fold_rows, "volumes": records,
           "s_per_slice": float(s_per_slice)}
    if "outside" in records[0]:
        res["outside_per_volume"] = float(np.mean([r["outside"] for r in records]))
        res["missed_per_volume"] = float(np.mean([r["missed"] for r in records]))
    return res


# ----------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------
def markdown_table(result: dict) -> str:
    """Method x organ table (mean +- std over folds), with the mean, seconds per slice and, for the
    product protocol, slices outside the extent and missed per volume."""
    organs = result["organs"]
    product = result["protocol"] == "product"
    head = ["Method"] + [o.replace("_", " ") for o in organs] + ["Mean", "s/slice"]
    if product:
        head += ["outside/vol", "missed/vol"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in result["methods"].items():
        cells = [name] + [f"{m['per_organ'][o]:.2f} ± {m['per_organ_std_over_folds'][o]:.2f}" for o in organs]
        cells += [f"**{m['mean']:.2f} ± {m['std_over_folds']:.2f}**", f"{m['s_per_slice']:.3f}"]
        if product:
            cells += [f"{m['outside_per_volume']:.2f}", f"{m['missed_per_volume']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    folds = ", ".join(f"fold {k}: {v}" for k, v in result["folds"].items())
    lines.append("")
    lines.append(f"Protocol `{result['protocol']}`, setting {result['setting']}, SAM backend `{result['sam']}`; "
                 f"Dice % (mean ± std over folds); volumes per fold (support at position 2): {folds}.")
    if not result.get("complete", True):
        lines.append(f"**Partial run**: only fold(s) {result.get('folds_done')} of {list(result['folds'])} finished; "
                     "the ± is over those folds only.")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"Skipped `{name}`: {why}.")
    per_fold = ["", "| Method | " + " | ".join(f"fold {r['fold']}" for r in next(iter(result["methods"].values()))["folds"])
                + " |" if result["methods"] else ""]
    if result["methods"]:
        first = next(iter(result["methods"].values()))
        per_fold.append("|" + "---|" * (1 + len(first["folds"])))
        for name, m in result["methods"].items():
            per_fold.append(f"| {name} | " + " | ".join(f"{r['mean']:.2f}" for r in m["folds"]) + " |")
        lines += per_fold
    return "\n".join(lines) + "\n"


def write_report_section(path: str | Path, result: dict) -> None:
    """Replace (or append) the marked section of this protocol/setting in a Markdown file."""
    where = result.get("image") or f"setting{result['setting']}"
    _replace_section(Path(path), f"evaluate:{result['protocol']}:{where}", markdown_table(result))


def _replace_section(p: Path, tag: str, table: str) -> None:
    """Replace (or append) the section between ``<!-- tag -->`` and ``<!-- /tag -->`` of a Markdown file."""
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    block = f"{start}\n{table}{end}\n"
    text = p.read_text() if p.exists() else ""
    if start in text and end in text:
        a = text.index(start)
        b = text.index(end) + len(end)
        text = text[:a] + block.rstrip("\n") + text[b:]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block
    atomic_write_text(p, text)


def plot(result: dict, path: str | Path) -> None:
    """Grouped bar chart (method x organ + mean, with std over folds) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    organs = result["organs"]
    names = list(result["methods"])
    groups = organs + ["mean"]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(groups), 4.5))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        m = result["methods"][n]
        vals = [m["per_organ"][o] for o in organs] + [m["mean"]]
        errs = [m["per_organ_std_over_folds"][o] for o in organs] + [m["std_over_folds"]]
        ax.bar(np.arange(len(groups)) + (i - (len(names) - 1) / 2) * width, vals, width, yerr=errs, capsize=2,
               label=n)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels([g.replace("_", " ") for g in groups])
    ax.set_ylabel("Dice %")
    ax.set_ylim(0, 100)
    ax.set_title(f"CHAOS, {result['protocol']} protocol, setting {result['setting']}, {result['sam']}")
    ax.legend(fontsize=8, ncol=min(3, len(names)))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python tools/lab.py evaluate``."""
    parser.add_argument("--data", help="folder with image_<id>.nii.gz and label_<id>.nii.gz (CHAOS T2)")
    parser.add_argument("--image", help="instead of --data (protocols product, clicks): one image file ...")
    parser.add_argument("--label", help="... and its label map; --organs then takes any label numbers")
    parser.add_argument("--protocol", default="fewshot", choices=["fewshot", "product", "clicks"])
    parser.add_argument("--rounds", type=int, default=3, help="corrective click rounds (protocol clicks)")
    parser.add_argument("--corrections", default="local", choices=["local", "whole"],
                        help="protocol clicks: a click changes the answer only where it asks (the product's "
                             "rule, corrections.changes_at_points) or SAM's new answer replaces the slice")
    parser.add_argument("--hole-points", action="store_true",
                        help="protocols product, clicks: a background point in each hole of the target "
                             "(ShapeRules.hole_points; off by default in the product)")
    parser.add_argument("--volumes", default=None, help="protocol clicks with --data: only these volume ids, e.g. 2,15")
    parser.add_argument("--plot-with", nargs="*", default=[], metavar="JSON",
                        help="protocol clicks: earlier click results (other backends) drawn in the same --plot")
    parser.add_argument("--methods", default=",".join(TRAINING_FREE),
                        help="comma-separated generators: fob,persam,p2sam,synpo,boxprop,coarse")
    parser.add_argument("--folds", default="0-4", help="folds to run, e.g. 0-4 or 0,2")
    parser.add_argument("--setting", type=int, default=1, choices=[1, 2], help="1 or 2 (which FoB models)")
    parser.add_argument("--organs", default="1,2,3,4", help="labels to evaluate (1 liver, 2 right kidney, 3 left "
                        "kidney, 4 spleen; 2+3 = both kidneys painted and scored as one target)")
    parser.add_argument("--sam", default=DEFAULT_SAM, help=f"SAM backend: {', '.join(BACKEND_NAMES)} or a checkpoint")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--cache-dir", default=".cache/embeddings", help="persistent embedding cache")
    parser.add_argument("--fob-weights", default=FOB_WEIGHTS_PATTERN,
                        help="FoB weights path pattern with {fold} and {setting}")
    parser.add_argument("--fob-mode", choices=["points", "box", "box+bg", "box+points"],
                        help="FoB prompt mode (default: the one recorded with the weights for the backend)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--decoder-threads", type=int, default=0,
                        help="threads of the exported (ONNX Runtime or OpenVINO) mask decoder (0: as --threads); "
                        "e.g. --threads 1 --decoder-threads 2 keeps the small per-slice torch work single-threaded")
    parser.add_argument("--json", required=True, help="output JSON with every per-volume Dice")
    parser.add_argument("--report", help="Markdown file whose marked table section is written/replaced")
    parser.add_argument("--plot", help="output PNG bar chart")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other methods already in the --json file (same protocol, setting, SAM and "
                        "folds) and add or replace this run's methods; the report and plot show them all")


def load_for_merge(path: str | Path, protocol: str, setting: int, sam: str, folds: str) -> Optional[dict]:
    """The earlier result in ``path`` that a ``--merge`` run adds to (None when there is no file yet);
    a result of another protocol, setting, backend or fold list is a UserInputError."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        old = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"--merge: {p} is not a JSON file written by evaluate ({exc}); remove it or drop --merge.") from None
    want = {"protocol": protocol, "setting": int(setting), "sam": sam,
            "folds": [str(f) for f in parse_folds(folds)]}
    have = {"protocol": old.get("protocol"), "setting": old.get("setting"), "sam": old.get("sam"),
            "folds": list(old.get("folds", {}))}
    if want != have or not old.get("complete", False):
        raise UserInputError(f"--merge: {p} holds a different or unfinished run ({have}) than this one ({want}); "
                             "write to another file or drop --merge.")
    return old


def merge_results(previous: dict, result: dict) -> dict:
    """``result`` with the methods of ``previous`` that it does not re-run (kept first, in their order);
    the wall time and run records of both are kept under ``runs``."""
    merged = dict(result)
    merged["methods"] = {**{k: v for k, v in previous["methods"].items() if k not in result["methods"]},
                         **result["methods"]}
    merged["skipped"] = {k: v for k, v in {**previous.get("skipped", {}), **result.get("skipped", {})}.items()
                         if k not in merged["methods"]}
    runs = previous.get("runs") or [{"methods": list(previous["methods"]), "wall_seconds": previous.get("wall_seconds"),
                                     "encoded_slices": previous.get("encoded_slices")}]
    merged["runs"] = runs + [{"methods": list(result["methods"]), "wall_seconds": result.get("wall_seconds"),
                              "encoded_slices": result.get("encoded_slices")}]
    return merged


def run(args: argparse.Namespace) -> int:
    """Run the evaluation described by ``args``; returns the exit code."""
    import torch

    from FewShotSAMLib.prompts import GENERATORS
    from FewShotSAMLib.volume import check_output_path

    if args.threads:
        torch.set_num_threads(int(args.threads))
    methods = [m.strip().lower() for m in str(args.methods).split(",") if m.strip()]
    unknown = [m for m in methods if m not in GENERATORS]
    if unknown or not methods:
        raise UserInputError(f"Unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(GENERATORS)}.")
    single = bool(args.image or args.label)
    if single and (args.protocol == "fewshot" or not (args.image and args.label) or args.data):
        raise UserInputError("--image and --label go together, with --protocol product or clicks and without --data.")
    if not single and not args.data:
        raise UserInputError("Pass --data (a CHAOS-style folder), or --image and --label with --protocol product or clicks.")
    organs = parse_organs(args.organs, any_label=single)
    check_output_path(args.json, "JSON output")
    for extra in (args.report, args.plot):
        if extra:
            check_output_path(extra)
    if args.protocol == "clicks":
        return _run_clicks(args, methods, organs)
    previous = load_for_merge(args.json, args.protocol, args.setting, args.sam, args.folds) if args.merge else None
    if single:  # one image: one "fold" holding it
        cases = _image_case(args)
        folds = {0: [0]}
    else:
        cases = list_cases(args.data)
        ids = [c[0] for c in cases]
        folds = {f: fold_volume_ids(ids, f) for f in parse_folds(args.folds)}
    store = _open_store(args, cases)
    cache = store.cache
    t0 = time.perf_counter()
    def save_partial(partial: dict) -> None:
        partial = merge_results(previous, partial) if previous else partial
        atomic_write_text(args.json, json.dumps({**partial, "wall_seconds": round(time.perf_counter() - t0, 1)}, indent=1))
        log.info("folds done: %s (partial results in %s)", partial["folds_done"], args.json)

    result = evaluate(store, args.protocol, methods, folds, args.setting, organs, args.fob_weights,
                      progress=lambda msg: log.info("%s", msg), on_fold=save_partial, fob_mode=args.fob_mode)
    result["encoded_slices"] = cache.encoded
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["setting_definition"] = SETTINGS[int(args.setting)]
    result["hole_points"] = bool(args.hole_points)
    if single:
        result["image"] = Path(args.image).name
    if args.fob_mode:
        result["fob_mode"] = args.fob_mode
    if previous:
        result = merge_results(previous, result)
    atomic_write_text(args.json, json.dumps(result, indent=1))
    if args.report:
        write_report_section(args.report, result)
    if args.plot and result["methods"]:
        plot(result, args.plot)
    for name, m in result["methods"].items():
        log.info("%s: %.2f ± %.2f Dice %% (%s), %.3f s/slice", name, m["mean"], m["std_over_folds"],
                 ", ".join(f"{k} {v:.1f}" for k, v in m["per_organ"].items()), m["s_per_slice"])
    log.info("wall time %.1f s, %d slices encoded", result["wall_seconds"], result["encoded_slices"])
    return 0


def _image_case(args: argparse.Namespace) -> list[tuple[int, Path, Path]]:
    """The one case of ``--image`` / ``--label`` (id 0); both files must exist."""
    for path in (args.image, args.label):
        if not Path(path).is_file():
            raise UserInputError(f"{path} does not exist; pass an image and its label map.")
    return [(0, Path(args.image), Path(args.label))]


def _open_store(args: argparse.Namespace, cases: Sequence[tuple[int, Path, Path]]) -> CaseStore:
    """The cases on the backend ``args.sam`` with the persistent embedding cache ``args.cache_dir``."""
    from dataclasses import replace

    from FewShotSAMLib.options import RuntimeOptions
    from FewShotSAMLib.sam import load_backend
    from FewShotSAMLib.sam.cache import EmbeddingCache

    options = RuntimeOptions.from_environment()
    if args.decoder_threads:
        options = replace(options, decoder_threads=int(args.decoder_threads))
    backend = load_backend(args.sam, args.device, options=options)
    store = CaseStore(cases, backend, EmbeddingCache(backend, cap_bytes=256 << 20, persist_dir=args.cache_dir))
    store.generic_labels = bool(getattr(args, "image", None))
    if getattr(args, "hole_points", False):
        from FewShotSAMLib.shape import ShapeRules

        store.shape = ShapeRules(hole_points=True)
    return store


def _run_clicks(args: argparse.Namespace, methods: Sequence[str], organs: Sequence[int]) -> int:
    """``evaluate --protocol clicks``: JSON, and the Markdown table / chart when asked (output paths
    checked by ``run``)."""
    from . import clickbench

    if args.rounds < 1:
        raise UserInputError("--rounds must be at least 1.")
    others = []
    for path in args.plot_with:
        try:
            others.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise UserInputError(f"--plot-with: {path} is not a click result written by evaluate ({exc}).") from None
        if others[-1].get("protocol") != "clicks":
            raise UserInputError(f"--plot-with: {path} is not a click result (protocol {others[-1].get('protocol')}).")
    if args.image:
        cases = _image_case(args)
        desc = f"{Path(args.image).name}, labels {', '.join(str(o) for o in organs)}"
    else:
        cases = list_cases(args.data)
        if args.volumes:
            wanted = {int(v) for v in args.volumes.split(",")}
            cases = [c for c in cases if c[0] in wanted]
        desc = f"{len(cases)} volumes of {Path(args.data).name}, every volume once"
    store = _open_store(args, cases)
    store.local_corrections = args.corrections == "local"
    t0 = time.perf_counter()
    result = evaluate_clicks(store, methods, organs, args.rounds, progress=lambda msg: log.info("%s", msg),
                             targets_desc=desc)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["corrections"] = args.corrections
    result["hole_points"] = bool(args.hole_points)
    atomic_write_text(args.json, json.dumps(result, indent=1))
    if args.report:
        p = Path(args.report)
        tag = f"evaluate:clicks:{result['sam']}:{Path(args.image).name if args.image else Path(args.data).name}"
        _replace_section(p, tag, clickbench.markdown_clicks(result))
    if args.plot:
        clickbench.plot_clicks(others + [result], args.plot, f"corrective clicks, {desc}")
    for name, m in result["methods"].items():
        log.info("%s %s: Dice per round %s; NoC@85 %.2f, NoC@90 %.2f", result["sam"], name,
                 " -> ".join(f"{d:.2f}" for d in m["dice_per_round"]), m["noc85"], m["noc90"])
    return 0

