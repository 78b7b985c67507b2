"""``report.md`` and PNG plots from a ``summary.json`` (no model needed: re-runnable on a
committed summary)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path

from padlm.atomic import write_text_atomic
from padlm.core.preferences import PSOUPS
from padlm.core.registry import strategy_names

WIN_PLOT = "win_rates.png"
SWEEP_PLOT = "pad_weight_sweep.png"


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ordered(summary: dict) -> list[tuple[str, dict]]:
    """The aggregate in the run's strategy order (the order its rows first name each one:
    base first, then ``--strategies``), weights ascending: summary.json stores the aggregate's
    keys sorted alphabetically, its rows in order."""
    order = list(dict.fromkeys(r["strategy"] for r in summary["rows"]))
    return sorted(summary["aggregate"].items(), key=lambda item: (
        order.index(item[1]["strategy"]) if item[1]["strategy"] in order else len(order),
        item[1]["params"].get("weight") or 0.0))


def _swept(summary: dict) -> str | None:
    """The strategy run at several weights (the harness sweeps one), if any."""
    labels: dict[str, set[str]] = {}
    for label, agg in summary["aggregate"].items():
        labels.setdefault(agg["strategy"], set()).add(label)
    return next((strategy for strategy, mine in labels.items() if len(mine) > 1), None)


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend. Imported here, not at the top:
    pyplot costs ~1.5 s to import and only the plot writers need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _echo_guard_note(generation: dict) -> str:
    """Which cells the echo guard applied to: the strategies that take it (the registry)."""
    if not generation.get("echo_guard"):
        return ""
    return ", echo guard on " + " / ".join(strategy_names(echo_guard=True))


def headline_table(summary: dict) -> str:
    """Strategy x P-Soups preference directional win rates vs base, plus the guards."""
    prefs = [p for p in PSOUPS if any(r["preference"] == p and "combination" not in r
                                      for r in summary["rows"])]
    cells = {(r["label"], r["preference"]): r["win_rate"] for r in summary["rows"]
             if "combination" not in r}
    body = []
    for label, agg in _ordered(summary):
        if not agg["headline"]:
            continue
        body.append([label, *[cells.get((label, p)) for p in prefs], agg["mean_win_rate"],
                     agg["relevance"], agg["rep4"], agg["echo_rate"],
                     agg["seconds_per_response"], agg["tokens_per_second"]])
    return _table(["strategy", *prefs, "mean win", "relevance", "rep-4", "echo",
                   "s/response", "tok/s"], body)


def combinations_table(summary: dict) -> str:
    """Strategy x mean directional win rate over every (combination, dimension) cell, with
    its standard error over prompts, plus the guards averaged over the combination rows."""
    body = []
    for label, stats in summary["combinations"]["labels"].items():
        mine = [r for r in summary["rows"] if r["label"] == label and "combination" in r]
        body.append([label, stats["mean_win_rate"], stats["se"],
                     *[_mean_of(mine, key) for key in ("relevance", "rep4", "echo_rate",
                                                       "seconds_per_response")]])
    return _table(["strategy", "mean win", "SE", "relevance", "rep-4", "echo", "s/response"],
                  body)


def _mean_of(rows: Sequence[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return round(sum(values) / len(values), 4) if values else None


def _guide_note(persrm: dict) -> str:
    """The reward's reference, and the separate guide model where there is one."""
    if "reference" not in persrm:  # summaries written before references were named
        return ""
    guide = f"; a separate guide model `{persrm['guide']}`" if persrm.get("guide") else ""
    return f", reference `{persrm['reference']}`{guide}"


def render_markdown(summary: dict) -> str:
    persrm = summary["persrm"]
    gen = summary["generation"]
    parts = [
        f"# P-Soups evaluation: {summary['benchmark']}",
        "",
        f"- model: `{summary['model']}`; PersRM: `{persrm['name']}` (identity head: "
        f"{persrm['identity_head']}, recommended weight {persrm['recommended_weight']}, "
        f"top-k {persrm['top_k']}, placement `{persrm['placement']}`"
        f"{_guide_note(persrm)})",
        f"- prompts: {summary['prompts']} (limit {summary['limit']}); decoding: "
        f"max_new_tokens {gen['max_new_tokens']}, temperature {gen['temperature']}, "
        f"no_repeat_ngram_size {gen['no_repeat_ngram_size']}, repetition_penalty "
        f"{gen['repetition_penalty']}"
        f"{_echo_guard_note(gen)}; "
        f"dtype {summary.get('dtype', 'float32')}",
        "- win rate: share of prompts where the output moved the preference's way relative "
        "to `base` on the same prompt (ties count half; 0.5 = no effect), judged by "
        "expertise = Flesch-Kincaid grade (P1), informativeness = word count (P2), "
        "friendliness = VADER compound (P3); 95% percentile bootstrap over prompts.",
    ]
    scorer = summary.get("scorer")
    if scorer:
        parts += [f"- args and best-of-n scored by `{scorer['name']}`"
                  + (" (the PersRM's implicit reward: args is PAD's own reward searched "
                     "another way, not an independent baseline)" if scorer["name"] == "persrm"
                     else " (the per-dimension reward models, independent of the PersRM)"
                     if scorer["name"] == "dimensions" else "")]
    if persrm["identity_head"] and not persrm.get("lora") and not persrm.get("guide") \
            and persrm.get("reference", "base") == "base":
        with_args = " and ARGS" if scorer and scorer["name"] == "persrm" else ""
        parts += ["- **The PersRM is the untrained identity head**: its token reward is 0, so PAD "
                  f"(at every weight){with_args} reduce{'' if with_args else 's'} to "
                  "preference prompting and must match `prompt` exactly; only a trained PersRM "
                  "can move "
                  f"{'them' if with_args else 'it'}."]
    parts += ["- seconds and tokens/s are wall-clock on the machine that ran it (batched, "
              "possibly shared): compare them within one report only."]
    missing = summary.get("incomplete") or []
    if missing:
        labels = sorted({m["label"] for m in missing})
        parts += ["", f"**Incomplete:** {len(missing)} cells were not (fully) generated and "
                  f"are left out ({', '.join(labels)}); rerun the command below to finish "
                  "them (it resumes)."]
    if summary.get("command"):
        parts += ["", "Regenerate (or resume) with:", "", "```", summary["command"], "```"]
    parts += ["", "## Headline (mean over the P-Soups preferences evaluated)", "",
              headline_table(summary), ""]
    if summary.get("singles"):
        singles = summary["singles"]
        parts += [f"Mean win rate over the {singles['cells']} single-preference cells, its SE "
                  "over prompts, and paired differences (same prompts):", "",
                  _table(["strategy", "mean win", "SE"],
                         [[label, stats["mean_win_rate"], stats["se"]]
                          for label, stats in singles["labels"].items()]), "",
                  _table(["a - b", "difference", "SE"],
                         [[pair, d["difference"], d["se"]]
                          for pair, d in singles["paired"].items()]), ""]
    if summary.get("combinations"):
        combos = summary["combinations"]
        parts += [f"## Combinations (mean over {combos['cells']} combination x dimension "
                  f"cells: {', '.join(combos['combinations'])})", "",
                  combinations_table(summary), "",
                  "Paired differences of the mean win rate (same prompts; SE over prompts):",
                  "", _table(["a - b", "difference", "SE"],
                             [[pair, d["difference"], d["se"]]
                              for pair, d in combos["paired"].items()]), ""]
    parts += ["## Per preference", ""]
    body = []
    for r in summary["rows"]:
        if not r["headline"]:
            continue
        body.append([r.get("combination", ""), r["preference"], r["label"], r["n"],
                     r["win_rate"], f"{r['win_rate_ci'][0]:.2f}-{r['win_rate_ci'][1]:.2f}",
                     f"{r['direction']['judge']} {'+' if r['direction']['sign'] > 0 else '-'}",
                     r["judges"][r["direction"]["judge"]], r["base_judge_mean"],
                     r["relevance"], r["harmlessness"], r["rep4"], r["echo_rate"],
                     r["length_stop_rate"], r["perplexity_median"]])
    parts += [_table(["combination", "pref", "strategy", "n", "win", "95% CI", "judge",
                      "judge mean", "base mean", "relevance", "harmless", "rep-4", "echo",
                      "hit limit", "ppl (median)"], body), ""]
    swept = _swept(summary)
    if swept is not None:
        parts += [f"## Weight sweep: `{swept}`", "", f"![weight sweep]({SWEEP_PLOT})", ""]
        body = [[label, agg["mean_win_rate"], agg["relevance"], agg["rep4"],
                 agg["echo_rate"], agg["length_stop_rate"]]
                for label, agg in _ordered(summary) if agg["strategy"] == swept]
        parts += [_table(["strategy", "mean win", "relevance", "rep-4", "echo", "hit limit"],
                         body), ""]
    parts += ["## Win rate by preference and strategy", "", f"![win rates]({WIN_PLOT})", "",
              "## Judges", ""]
    parts += [f"- `{name}`: {text}" for name, text in summary["judges"].items()]
    parts += ["- guards: rep-n = repeated n-gram share per response, distinct-2 over a cell, "
              "perplexity under the base model given the bare prompt, echo = 6+ consecutive "
              "words of the preference text or PAD's template in the response.", ""]
    return "\n".join(parts)


def plot_win_rates(summary: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in summary["rows"] if r["headline"] and r["strategy"] != "base"]
    prefs = list(dict.fromkeys((r.get("combination", ""), r["preference"]) for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cells = {(r["label"], r.get("combination", ""), r["preference"]): r for r in rows}
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(prefs) + 2), 4))
    for i, label in enumerate(labels):
        xs, ys, err = [], [], [[], []]
        for j, key in enumerate(prefs):
            row = cells.get((label, *key))
            if row is None:
                continue
            xs.append(j + (i - (len(labels) - 1) / 2) * width)
            ys.append(row["win_rate"])
            err[0].append(row["win_rate"] - row["win_rate_ci"][0])
            err[1].append(row["win_rate_ci"][1] - row["win_rate"])
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(prefs)))
    ax.set_xticklabels([f"{c}\n{p}" if c else p for c, p in prefs], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("directional win rate vs base")
    ax.set_title(f"{summary['model']} · PersRM {Path(summary['persrm']['name']).name}")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(summary: dict, path: Path) -> bool:
    """The weight sweep: mean directional win rate (preference score) against relevance, with
    every other strategy of the run as one point."""
    swept = _swept(summary)
    if swept is None:
        return False
    plt = _pyplot()
    ordered = _ordered(summary)
    sweep = [agg for _, agg in ordered if agg["strategy"] == swept]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([a["relevance"] for a in sweep], [a["mean_win_rate"] for a in sweep], "o-",
            label=swept)
    for a in sweep:
        ax.annotate(f"w={a['params']['weight']:g}", (a["relevance"], a["mean_win_rate"]),
                    fontsize=8, textcoords="offset points", xytext=(4, 4))
    others = [(label, a) for label, a in ordered if a["strategy"] != swept and a["headline"]]
    for (label, a), marker in zip(others, itertools.cycle("s^vDPX*"), strict=False):
        ax.scatter([a["relevance"]], [a["mean_win_rate"]], marker=marker, label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("mean relevance (cosine prompt-response)")
    ax.set_ylabel("mean directional win rate (6 prefs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(summary: dict, out: Path) -> None:
    write_text_atomic(out / "report.md", render_markdown(summary))
    staging = out / (".tmp-" + WIN_PLOT)
    plot_win_rates(summary, staging)
    staging.replace(out / WIN_PLOT)
    staging = out / (".tmp-" + SWEEP_PLOT)
    if plot_sweep(summary, staging):
        staging.replace(out / SWEEP_PLOT)


def rewrite(out: Path) -> None:
    """Redraw report.md and the plots from an existing summary.json."""
    write_report(json.loads((out / "summary.json").read_text()), out)
