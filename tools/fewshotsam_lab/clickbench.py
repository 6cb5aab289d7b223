"""The click benchmark (``evaluate --protocol clicks``): what a user gets from corrective clicks.

Each volume starts as in the product protocol (the target painted on the middle of its slices, the engine
propagating with automatic extent). Then, for ``rounds`` rounds, every slice whose answer differs from the
reference (segmented slices, slices the automatic extent missed, slices it overran; the painted slice
excluded) gets one corrective click (``clicks.corrective_click``: the most interior pixel of its largest
error region, foreground where the target was missed, background where SAM leaked), added to that slice's
prompts, and the clicked slices are re-run through ``VolumeSession.segment_from_prompts``: the path of an
edited prompts file and of a point edit in Slicer (the slice's box is kept; a missed slice has no box, only
its clicks), with the current segmentation as the answer being corrected (``previous``), as Slicer passes it. Reported per target: 3D Dice after each round, and per slice the number of clicks needed to
reach 85 % and 90 % Dice (NoC@85, NoC@90; a slice that never reaches it counts ``rounds`` clicks, as RITM
counts its maximum, and the share of such slices is reported).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from FewShotSAMLib.clicks import clicks_to_reach, corrective_click, dice
from FewShotSAMLib.engine import SlicePrompts
from FewShotSAMLib.volume import slice_to_volume_index

NOC_THRESHOLDS = (85.0, 90.0)


def _edit_entry(k: int, fg=(), bg=(), box=None) -> SlicePrompts:
    """An editable slice of ``segment_from_prompts`` (numpy-order voxel indices): points and box only (a
    target in pieces keeps its stacked boxes, each point going to the box that holds it)."""
    return SlicePrompts(int(k), np.asarray(fg, float).reshape(-1, 3), np.asarray(bg, float).reshape(-1, 3),
                        None if box is None else np.asarray(box, float).reshape(-1, 3))


def click_session(session, example: np.ndarray, truth: np.ndarray, generator, rounds: int, axis: int = 0,
                  shape=None) -> dict:
    """Run the click benchmark on one target: ``example`` (the painted slice), ``truth`` (the reference,
    image shape); ``shape``: the engine's ShapeRules (None: its defaults). Returns the 3D Dice per round,
    the per-slice Dice per round and the clicks made."""
    res = session.segment(example, generator=generator, extent="auto", axis=axis, shape=shape)
    mask = np.moveaxis(np.asarray(res.mask, bool), axis, 0).copy()
    ref = np.moveaxis(np.asarray(truth, bool), axis, 0)
    painted = set(int(p) for p in res.painted)
    entries = {int(k): _edit_entry(k, sp.fg, sp.bg, sp.box) for k, sp in res.prompts.items() if int(k) not in painted}
    slices = sorted((set(np.flatnonzero(ref.any((1, 2))).tolist()) | set(np.flatnonzero(mask.any((1, 2))).tolist()))
                    - painted)
    per_slice = {k: [dice(mask[k], ref[k])] for k in slices}
    dice_rounds = [dice(mask, ref)]
    clicks_made = 0
    for _ in range(rounds):
        edited = {}
        for k in slices:
            click = corrective_click(mask[k], ref[k])
            if click is None:
                continue
            entry = entries.setdefault(k, _edit_entry(k))
            point = slice_to_volume_index(axis, k, np.array([click.point], float))
            if click.foreground:
                entry.fg = np.vstack([entry.fg, point])
            else:
                entry.bg = np.vstack([entry.bg, point])
            edited[k] = entry
            clicks_made += 1
        if edited:
            out = session.segment_from_prompts(example, axis, edited, previous=np.moveaxis(mask, 0, axis))
            new = np.moveaxis(np.asarray(out.mask, bool), axis, 0)
            for k in edited:
                mask[k] = new[k]
        for k in slices:
            per_slice[k].append(dice(mask[k], ref[k]))
        dice_rounds.append(dice(mask, ref))
    return {"dice_per_round": dice_rounds, "per_slice": per_slice, "clicks": clicks_made}


def noc(per_slice: dict, rounds: int, threshold: float) -> tuple[float, float]:
    """(mean clicks to reach ``threshold`` per slice, failures counted as ``rounds``; share of slices that
    never reach it, %) over the slices of ``per_slice``."""
    needed = [clicks_to_reach(d, threshold) for d in per_slice.values()]
    if not needed:
        return 0.0, 0.0
    return (float(np.mean([rounds if n is None else n for n in needed])),
            100.0 * float(np.mean([n is None for n in needed])))


def record(volume, organ: str, run: dict, rounds: int) -> dict:
    """The JSON record of one target's run."""
    rec = {"volume": volume, "organ": organ, "dice_per_round": [round(d, 4) for d in run["dice_per_round"]],
           "slices": len(run["per_slice"]), "clicks": run["clicks"]}
    for t in NOC_THRESHOLDS:
        rec[f"noc{int(t)}"], rec[f"fail{int(t)}"] = [round(v, 4) for v in noc(run["per_slice"], rounds, t)]
    return rec


def summarise_clicks(records: Sequence[dict], organs: Sequence[str]) -> dict:
    """Mean Dice per round (over targets, and per organ), mean NoC and failure shares."""
    rounds = len(records[0]["dice_per_round"])
    per_round = [float(np.mean([r["dice_per_round"][i] for r in records])) for i in range(rounds)]
    per_organ = {o: [float(np.mean([r["dice_per_round"][i] for r in records if r["organ"] == o])) for i in range(rounds)]
                 for o in organs if any(r["organ"] == o for r in records)}
    out = {"dice_per_round": per_round, "per_organ_per_round": per_organ, "targets": len(records),
           "clicks_per_target": float(np.mean([r["clicks"] for r in records])), "volumes": list(records)}
    for t in NOC_THRESHOLDS:
        # per slice, so weighted by each target's slices
        n = np.array([r["slices"] for r in records], float)
        out[f"noc{int(t)}"] = float(np.sum(n * [r[f"noc{int(t)}"] for r in records]) / max(1.0, n.sum()))
        out[f"fail{int(t)}"] = float(np.sum(n * [r[f"fail{int(t)}"] for r in records]) / max(1.0, n.sum()))
    return out


def markdown_clicks(result: dict) -> str:
    """A table: backend and method x Dice per round, gain after the last round, NoC@85/90."""
    lines = []
    for name, m in result["methods"].items():
        rounds = len(m["dice_per_round"]) - 1
        head = ["SAM backend", "method"] + [f"round {i}" for i in range(rounds + 1)] + \
               [f"gain after {rounds}", "NoC@85", "NoC@90", "never 85 %", "never 90 %", "clicks/target"]
        if not lines:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        d = m["dice_per_round"]
        cells = [result["sam"], name] + [f"{v:.2f}" for v in d] + [f"{d[-1] - d[0]:+.2f}", f"{m['noc85']:.2f}",
                                                                    f"{m['noc90']:.2f}", f"{m['fail85']:.1f} %",
                                                                    f"{m['fail90']:.1f} %", f"{m['clicks_per_target']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Protocol `clicks` ({result['targets_desc']}); 3D Dice % after each round of one corrective click "
                 "per slice; NoC per slice, failures counted as the number of rounds.")
    return "\n".join(lines) + "\n"


def plot_clicks(results: Sequence[dict], path, title: str) -> None:
    """Mean Dice per round, one line per (backend, method) of ``results``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from FewShotSAMLib.volume import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        for name, m in res["methods"].items():
            d = m["dice_per_round"]
            ax.plot(range(len(d)), d, marker="o", label=f"{res['sam']} ({name}, {m['targets']} targets)")
            ax.set_xticks(range(len(d)))
    ax.set_xlabel("corrective clicks per slice")
    ax.set_ylabel("mean 3D Dice %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)

