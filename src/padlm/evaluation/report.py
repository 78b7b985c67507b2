"""``report.md`` and PNG plots from a ``summary.json`` (no model needed: re-runnable on a
committed summary)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from padlm.atomic import write_text_atomic
from padlm.preferences import PSOUPS

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


def _ordered(aggregate: dict[str, dict]) -> list[tuple[str, dict]]:
    """Strategies in the harness's order (base first), PAD weights ascending (summary.json
    stores keys sorted alphabetically)."""
    order = ("base", "prompt", "pad", "linear-alignment", "args", "best-of-n")
    return sorted(aggregate.items(), key=lambda item: (
        order.index(item[1]["strategy"]) if item[1]["strategy"] in order else len(order),
        item[1]["params"].get("weight") or 0.0))


def headline_table(summary: dict) -> str:
    """Strategy x P-Soups preference directional win rates vs base, plus the guards."""
    prefs = [p for p in PSOUPS if any(r["preference"] == p and "combination" not in r
                                      for r in summary["rows"])]
    cells = {(r["label"], r["preference"]): r["win_rate"] for r in summary["rows"]
             if "combination" not in r}
    body = []
    for label, agg in _ordered(summary["aggregate"]):
        if not agg["headline"]:
            continue
        body.append([label, *[cells.get((label, p)) for p in prefs], agg["mean_win_rate"],
                     agg["relevance"], agg["rep4"], agg["echo_rate"],
                     agg["seconds_per_response"], agg["tokens_per_second"]])
    return _table(["strategy", *prefs, "mean win", "relevance", "rep-4", "echo",
                   "s/response", "tok/s"], body)


def render_markdown(summary: dict) -> str:
    persrm = summary["persrm"]
    gen = summary["generation"]
    parts = [
        f"# P-Soups evaluation: {summary['benchmark']}",
        "",
        f"- model: `{summary['model']}`; PersRM: `{persrm['name']}` (identity head: "
        f"{persrm['identity_head']}, recommended weight {persrm['recommended_weight']}, "
        f"top-k {persrm['top_k']}, placement `{persrm['placement']}`)",
        f"- prompts: {summary['prompts']} (limit {summary['limit']}); decoding: "
        f"max_new_tokens {gen['max_new_tokens']}, temperature {gen['temperature']}, "
        f"no_repeat_ngram_size {gen['no_repeat_ngram_size']}, repetition_penalty "
        f"{gen['repetition_penalty']}"
        f"{', echo guard on pad / linear-alignment' if gen.get('echo_guard') else ''}; "
        f"dtype {summary.get('dtype', 'float32')}",
        "- win rate: share of prompts where the output moved the preference's way relative "
        "to `base` on the same prompt (ties count half; 0.5 = no effect), judged by "
        "expertise = Flesch-Kincaid grade (P1), informativeness = word count (P2), "
        "friendliness = VADER compound (P3); 95% percentile bootstrap over prompts.",
    ]
    if persrm["identity_head"] and not persrm.get("lora"):
        parts += ["- **The PersRM is the untrained identity head**: its token reward is 0, so PAD "
                  "(at every weight) and ARGS reduce to preference prompting and must match "
                  "`prompt` exactly; only a trained PersRM can move them."]
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
    acc = summary["acceptance"]
    if acc.get("evaluated"):
        parts += ["## Acceptance checks (PAD at the recommended weight)", "",
                  _table(["check", "met"], list(acc["checks"].items())), "",
                  f"All met: {_fmt(acc['met'])}", ""]
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
    sweep = [r for r in summary["rows"] if r["strategy"] == "pad"
             and "combination" not in r]
    if len({r["label"] for r in sweep}) > 1:
        parts += ["## PAD weight sweep", "", f"![PAD weight sweep]({SWEEP_PLOT})", ""]
        body = [[label, agg["mean_win_rate"], agg["relevance"], agg["rep4"],
                 agg["echo_rate"], agg["length_stop_rate"]]
                for label, agg in _ordered(summary["aggregate"]) if agg["strategy"] == "pad"]
        parts += [_table(["PAD", "mean win", "relevance", "rep-4", "echo", "hit limit"],
                         body), ""]
    parts += ["## Win rate by preference and strategy", "", f"![win rates]({WIN_PLOT})", "",
              "## Judges", ""]
    parts += [f"- `{name}`: {text}" for name, text in summary["judges"].items()]
    parts += ["- guards: rep-n = repeated n-gram share per response, distinct-2 over a cell, "
              "perplexity under the base model given the bare prompt, echo = 6+ consecutive "
              "words of the preference text or PAD's template in the response.", ""]
    return "\n".join(parts)


def plot_win_rates(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    """PAD weight sweep: mean directional win rate (preference score) against relevance."""
    pads = [(agg["params"].get("weight"), agg) for agg in summary["aggregate"].values()
            if agg["strategy"] == "pad"]
    if len(pads) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pads.sort(key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([a["relevance"] for _, a in pads], [a["mean_win_rate"] for _, a in pads], "o-",
            label="PAD")
    for w, a in pads:
        ax.annotate(f"w={w:g}", (a["relevance"], a["mean_win_rate"]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    for label, marker in (("base", "s"), ("prompt", "^"), ("linear-alignment", "v")):
        if label in summary["aggregate"]:
            a = summary["aggregate"][label]
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
