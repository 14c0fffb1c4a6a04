"""A loaded study as a document: the figures, the tables and the summary, in Markdown and HTML.

``build_report(study, out_dir)`` draws the figures (``analysis.figures``), computes the summary
sentences (``analysis.findings``) and writes ``report.md`` and a self-contained ``report.html``
(figures embedded as base64 PNG) beside ``figures/*.png|pdf`` and the tables to paste
(``results.csv``, ``summary.csv``, ``table.tex``: ``analysis.tables``). Every number in the tables names
the runs it comes from. Loading and the command line are in ``analysis.report``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from resnet_lab.tracking import NOT_TRAINING, display_uri

from .anchors import Anchor, anchor_for
from .diag_figures import DIAG_FIGURES
from .diag_findings import PUBLISHED, diagnostic_findings
from .figures import FIGURES, FigureResult, draw_figures, missing_pairs
from .findings import PLATEAU_HEAD, flow_ratios, not_at_plateau, plateau_label, ratio_text, scale_banner, summarize
from .numbers import fmt, pm
from .runs import Study, aggregate, display_name, shared_param
from .tables import write_tables

# params that are not the training configuration: where things live, how it ran, and each run's own identity
_NOT_CONFIG = {"model", "seed", "run_name", *NOT_TRAINING}


# --------------------------------------------------------------------------- a tiny document model
# Blocks render to both Markdown and HTML, so the two files always say the same thing.


@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[str]], align: str | None = None) -> None:
        self.blocks.append(("table", (header, rows, align or "l" * len(header))))

    def code(self, text: str, lang: str = "") -> None:
        self.blocks.append(("code", (lang, text)))

    def figure(self, fig: FigureResult, number: int, rel: str) -> None:
        self.blocks.append(("figure", (fig, number, rel)))

    # -- Markdown
    def markdown(self) -> str:
        out = []
        for kind, b in self.blocks:
            if kind == "h":
                out.append(f"{'#' * b[0]} {b[1]}")
            elif kind == "p":
                out.append(b)
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in b))
            elif kind == "table":
                header, rows, align = b
                sep = ["---:" if a == "r" else "---" for a in align]
                lines = [header, sep, *rows]
                out.append("\n".join("| " + " | ".join(_md_cell(c) for c in line) + " |" for line in lines))
            elif kind == "code":
                out.append(f"```{b[0]}\n{b[1].rstrip()}\n```")
            elif kind == "figure":
                fig, n, rel = b
                out.append(f"![Figure {n}: {fig.title}]({rel}/{fig.name}.png)\n\n"
                           f"**Figure {n}: {fig.title}.** {fig.caption} ([PDF]({rel}/{fig.name}.pdf))")
        return "\n\n".join(out) + "\n"

    # -- HTML (self-contained)
    def html(self, title: str) -> str:
        body = []
        for kind, b in self.blocks:
            if kind == "h":
                body.append(f"<h{b[0]}>{_inline(b[1])}</h{b[0]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(b)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b) + "</ul>")
            elif kind == "table":
                header, rows, align = b
                cls = lambda i: ' class="num"' if align[i] == "r" else ""  # noqa: E731
                head = "".join(f"<th{cls(i)}>{_inline(c)}</th>" for i, c in enumerate(header))
                trs = "".join("<tr>" + "".join(f"<td{cls(i)}>{_inline(c)}</td>" for i, c in enumerate(r)) + "</tr>"
                              for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "code":
                body.append(f"<pre><code>{html.escape(b[1].rstrip())}</code></pre>")
            elif kind == "figure":
                fig, n, _rel = b
                data = base64.b64encode(fig.paths["png"].read_bytes()).decode("ascii")
                body.append(f'<figure id="{fig.name}"><img alt="Figure {n}: {html.escape(fig.title)}" '
                            f'src="data:image/png;base64,{data}"><figcaption><b>Figure {n}: '
                            f"{html.escape(fig.title)}.</b> {_inline(fig.caption)}</figcaption></figure>")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
                + "\n".join(body) + "\n</body></html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;background:#f5f5f5;padding:0 .2em}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;border:1px solid #e3e3e3}
figure{margin:1.5em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.92em;color:#333;margin-top:.4em}
"""


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _eval_split(runs: pd.DataFrame) -> str:
    """'the whole split', or the fixed test subset of a quick study (``test_size``)."""
    size = shared_param(runs, "test_size")
    if size is not None:
        return f"a fixed {int(size):,}-image subset of the test set (the same images for every run; validation: the whole split)"
    return "the whole split"


def _inline(text: str) -> str:
    """Escape, then `code`, **bold** and [text](url) links (the only inline markup the report uses)."""
    out = html.escape(str(text), quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"\[([^\]]+)\]\(((?:https?://|#)[^)\s]+)\)", r'<a href="\2">\1</a>', out)


# --------------------------------------------------------------------------- report content


@dataclass
class Report:
    study: Study
    out_dir: Path
    figures: list[FigureResult]
    summary: list[str]
    notes: list[str]
    markdown: Path
    html: Path
    logged_to: str | None = None  # parent run id when logged to MLflow


UI_ADDRESS = "http://127.0.0.1:5000"  # where `resnet-lab ui` serves a local store (its default --host and --port)
_RUN_VIEW = "workflowType=machine_learning"  # MLflow 3 opens a run in its model-training view with this


def ui_base(uri: str) -> str | None:
    """The MLflow UI address that shows this store's runs: the tracking server itself, or for a local
    store (SQLite, a folder) the address `resnet-lab ui` serves it on; None for other stores."""
    if uri.startswith(("http://", "https://")):
        return display_uri(uri).rstrip("/")
    if uri.startswith(("sqlite:", "file:")) or ("://" not in uri and not uri.startswith("databricks")):
        return UI_ADDRESS
    return None


def run_url(study: Study, run_id: str) -> str | None:
    base = ui_base(study.tracking_uri)
    return f"{base}/#/experiments/{study.experiment_id}/runs/{run_id}?{_RUN_VIEW}" if base else None


def runs_url(study: Study, run_ids: list[str]) -> str | None:
    """One run's page, or MLflow's compare view of several."""
    base = ui_base(study.tracking_uri)
    if base is None or not run_ids:
        return None
    if len(run_ids) == 1:
        return run_url(study, run_ids[0])
    ids = quote(json.dumps(sorted(run_ids), separators=(",", ":")), safe="")
    exps = quote(json.dumps([str(study.experiment_id)], separators=(",", ":")), safe="")
    return f"{base}/#/compare-runs?runs={ids}&experiments={exps}"


def artifact_url(study: Study, run_id: str, path: str) -> str | None:
    """A run's artifact in the UI's artifact viewer."""
    base = ui_base(study.tracking_uri)
    return f"{base}/#/experiments/{study.experiment_id}/runs/{run_id}/artifacts/{path}" if base else None


def _run_link(study: Study, run_id: str, text: str) -> str:
    url = run_url(study, run_id)
    return f"[{text}]({url})" if url else text


def _net_link(study: Study, model: str) -> str:
    """A net's name linking to its runs (MLflow's compare view), where the store has a UI."""
    url = runs_url(study, list(study.runs.loc[study.runs["model"] == model, "run_id"]))
    return f"[{display_name(model)}]({url})" if url else display_name(model)


def _net_pattern(models: list[str]) -> re.Pattern[str] | None:
    """Finds a net's display name as a whole word (plain-8, not the start of plain-80)."""
    names = sorted({display_name(m) for m in models}, key=len, reverse=True)
    return re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])('s)?") if names else None


def annotate(sentences: list[str], study: Study) -> list[str]:
    """Each sentence with a link to the runs of the nets it names (MLflow's compare view), and each
    net that did not reach its plateau named as such at its first mention."""
    runs = study.runs
    by_name = {display_name(m): g for m, g in runs.groupby("model", sort=False)}
    pattern = _net_pattern(list(by_name))
    if pattern is None:
        return sentences
    n_seeds = runs.groupby("model")["run_id"].nunique()
    missed = {display_name(m): plateau_label(seeds, int(n_seeds[m])) for m, seeds in not_at_plateau(runs).items()}
    out = []
    for s in sentences:
        named = list(dict.fromkeys(m.group(1) for m in pattern.finditer(s)))
        seen: set[str] = set()
        short = {} if s.startswith(PLATEAU_HEAD) else missed  # that sentence says it seed by seed itself

        def label(m: re.Match[str]) -> str:
            name, owner = m.group(1), m.group(2) or ""
            if name in short and name not in seen:
                seen.add(name)
                return f"{name}{owner} {short[name]}"  # plain-32's (not at its plateau) training error
            seen.add(name)
            return name + owner

        s = pattern.sub(label, s)
        ids = [rid for name in named for rid in by_name[name]["run_id"]]
        url = runs_url(study, ids)
        if url:
            what = f"the {len(ids)} runs" if len(ids) > 1 else "the run"
            s = (s[:-1] if s.endswith(".") else s) + f" ([{what}]({url}))."
        out.append(s)
    return out


def results_table(study: Study, agg: pd.DataFrame, anchor: Anchor | None) -> tuple[list[str], list[list[str]], str]:
    """Header, rows and alignment of the final-error table (one row per net)."""
    has_val = "val_error_mean" in agg and agg["val_error_mean"].notna().any()
    header = ["net", "seeds", "train error (%)", "test error (%)"] + (["val error (%)"] if has_val else [])
    align = "lrrr" + ("r" if has_val else "")
    if anchor is not None:
        if anchor.train_error:
            header.append(f"{anchor.label} train error (%)")
            align += "r"
        header.append(f"{anchor.label} test error (%)")
        align += "r"
    plateau = study.runs.groupby("model")["plateau"] if "plateau" in study.runs else None
    if plateau is not None:
        header.append("plateau reached")
        align += "l"
    header.append("runs (name, id)")
    align += "l"
    missed = not_at_plateau(study.runs)
    rows = []
    for r in agg.itertuples():
        name = display_name(r.model) + (f" {plateau_label(missed[r.model], r.n_seeds)}" if r.model in missed else "")
        row = [name, str(r.n_seeds),
               pm(r.train_error_mean, r.train_error_std, r.train_error_n),
               pm(r.test_error_mean, r.test_error_std, r.test_error_n)]
        if has_val:
            row.append(pm(r.val_error_mean, r.val_error_std, r.val_error_n))
        if anchor is not None:
            if anchor.train_error:
                row.append(fmt(anchor.train_error[r.model]) if r.model in anchor.train_error else "–")
            row.append(fmt(anchor.test_error[r.model]) if r.model in anchor.test_error else "–")
        if plateau is not None:
            v = plateau.get_group(r.model)
            n = int(v.notna().sum())
            row.append("not measured" if v.isna().all() else f"{int((v == 1).sum())} of {n} seed{'s' if n > 1 else ''}")
        row.append(", ".join(f"{_run_link(study, rid, name)} (`{rid[:8]}`)" for name, rid in zip(r.run_names, r.run_ids)))
        rows.append(row)
    return header, rows, align


def _links_line(study: Study) -> str:
    """Where the report's run links point, and how to open that address."""
    base = ui_base(study.tracking_uri)
    if base is None:
        return f"This store ({display_uri(study.tracking_uri)}) has no MLflow UI address: runs are named by id."
    if base == UI_ADDRESS:
        file = study.parent.tags.get("study_file") if study.parent is not None else None
        return (f"Links to runs open the MLflow UI at {base}: start it on this store with "
                f"`resnet-lab ui {file or 'STUDY_FILE'} --tracking-uri {display_uri(study.tracking_uri)}` (or `make ui`); "
                "another --host or --port moves the address.")
    return f"Links to runs open the MLflow UI of the tracking server at {base}."


def _config_sections(doc: Doc, study: Study) -> None:
    doc.h(2, "Study configuration")
    parent = study.parent
    if parent is not None:
        tags = {k: v for k, v in parent.tags.items() if not k.startswith("mlflow.")}
        doc.p(f"Parent run `{parent.run_name}` (`{parent.run_id}`), tags: "
              + ", ".join(f"`{k}={v}`" for k, v in sorted(tags.items())) + ".")
        if parent.study_text is not None:
            doc.p(f"Study file (artifact `{parent.study_file}` of the parent run):")
            doc.code(parent.study_text, "toml")
        if parent.params:
            doc.table(["study parameter", "value"], [[f"`{k}`", f"`{v}`"] for k, v in sorted(parent.params.items())])
    params = pd.DataFrame.from_dict(study.params, orient="index")
    if params.empty:
        return
    keys = [k for k in sorted(params.columns) if k not in _NOT_CONFIG]
    shared = [k for k in keys if params[k].nunique(dropna=False) == 1]
    varying = [k for k in keys if k not in shared]
    doc.p("Training configuration shared by every run (MLflow params of the child runs):")
    doc.table(["param", "value"], [[f"`{k}`", f"`{params[k].iloc[0]}`"] for k in shared])
    if varying:
        by_model = study.runs.set_index("run_id")
        rows = []
        for k in varying:
            vals = params[k].groupby(by_model.loc[params.index, "model"].values).agg(lambda s: ", ".join(sorted(set(s))))
            rows.append([f"`{k}`", "; ".join(f"{display_name(m)}: `{v}`" for m, v in vals.items())])
        doc.p("Parameters that differ between nets:")
        doc.table(["param", "values"], rows)
    env = study.runs
    commits = sorted({f"{c[:10]}{' (dirty)' if d == 'true' else ''}" for c, d in zip(env["git_commit"].fillna("?"),
                                                                                   env["git_dirty"].fillna(""))})
    doc.p("Environment: device " + ", ".join(f"`{x}`" for x in sorted(set(env["device"].fillna("?"))))
          + "; torch " + ", ".join(f"`{x}`" for x in sorted(set(env["torch_version"].fillna("?"))))
          + "; git commit " + ", ".join(f"`{x}`" for x in commits) + ".")


def _runs_section(doc: Doc, study: Study) -> None:
    doc.h(2, "Runs")
    doc.p("Every finished training run the numbers above come from (final = last logged value).")
    has_val = study.runs["val_error"].notna().any()
    rows = []
    for r in study.runs.itertuples():
        its = int(r.total_iterations) if r.total_iterations is not None and not pd.isna(r.total_iterations) else None
        dur = fmt(r.duration_s / 60, missing="–") if r.duration_s is not None else "–"
        errs = [r.train_error, r.test_error] + ([r.val_error] if has_val else [])
        reached = {1: "reached", 0: "not reached"}.get(getattr(r, "plateau", math.nan), "not measured")
        rows.append([_run_link(study, r.run_id, r.run_name), f"`{r.run_id}`", display_name(r.model), str(r.seed),
                     *[fmt(e, missing="–") for e in errs], reached, f"{its:,}" if its else "–", dur])
    doc.table(["run", "run id", "net", "seed", "train error (%)", "test error (%)", *(["val error (%)"] if has_val else []),
               "plateau", "iterations", "minutes"], rows, "lllrrr" + ("r" if has_val else "") + "lrr")
    lo = study.left_out
    if lo is not None and len(lo):
        doc.p("Runs left out:")
        doc.table(["run", "run id", "status", "why"],
                  [[r.run_name, f"`{r.run_id}`", r.status, str(r.reason)] for r in lo.itertuples()])


def build_report(study: Study, out_dir: Path, *, figures: list[FigureResult] | None = None) -> Report:
    """Draw the figures and write report.md and report.html for a loaded study into ``out_dir``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    # the study's and the diagnostics' figures in one pool, so the workers share them out
    drawn = {f.name: f for f in draw_figures(study, fig_dir, ({} if figures is not None else FIGURES) | DIAG_FIGURES)}
    figures = figures if figures is not None else [drawn[n] for n in FIGURES]
    diag_figures = [drawn[n] for n in DIAG_FIGURES]
    made = {f.name for f in figures + diag_figures if f.made}
    for name in (set(FIGURES) | set(DIAG_FIGURES)) - made:  # a figure this study cannot draw must not survive from an earlier report
        for ext in ("png", "pdf"):
            (fig_dir / f"{name}.{ext}").unlink(missing_ok=True)
    t_fig = time.perf_counter() - t0
    agg = aggregate(study.runs)
    anchor = anchor_for(study.name)
    summary = annotate(summarize(study.runs, study.grad_flow, study.responses, anchor, study.grad_norm_series,
                                 study.curves), study)
    # a diagnostic not run is said in its own section; only the nets a drawn diagnostic figure lacks are notes
    notes = _dedupe(study.notes + missing_pairs(study) + [n for f in figures for n in f.notes]
                    + [n for f in diag_figures if f.made for n in f.notes])

    doc = Doc()
    scale = f" ({study.scale} scale)" if study.scale else ""
    doc.h(1, f"Study report: {study.name}{scale}")
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    doc.p(f"Generated {generated} from MLflow tracking store `{display_uri(study.tracking_uri)}`, experiment "
          f"`{study.name}` (id {study.experiment_id}); {len(study.runs)} finished training runs of "
          f"{study.runs['model'].nunique()} nets. Plain vs residual CNNs at depth (He et al. 2016, Sec. 4.2).")
    doc.p(_links_line(study))
    banner = scale_banner(study.runs, study.scale)
    if banner:
        doc.p(f"**{banner.intro}**")
        doc.ul(banner.departures)
        if banner.verdict:
            doc.p(f"**{annotate([banner.verdict], study)[0]}**")
    doc.h(2, "Summary")
    doc.ul(summary or ["The study has too few nets for a comparison (one depth of one architecture)."])
    doc.h(2, "Final errors")
    header, rows, align = results_table(study, agg, anchor)
    doc.table(header, rows, align)
    defs = ("Final = last logged value of each run. Training error is the mean over the last logging window "
            "(the last `log_every` iterations, with augmentation and BN in training mode); test and validation "
            f"error are measured on {_eval_split(study.runs)} at the end. Mean ± sample standard deviation over seeds "
            "(± omitted for one seed).")
    if anchor is not None:
        defs += f" {anchor.label}: {anchor.source}." + (f" {anchor.footnote}" if anchor.footnote else "")
    doc.p(defs)
    doc.p("Tables to paste, next to this report: `results.csv` (one row per training run), `summary.csv` "
          "(one row per net: mean, sample sd and n of each number) and `table.tex` (this table, LaTeX booktabs).")
    ratios = flow_ratios(study.grad_flow)
    if len(ratios):
        doc.p("Gradient flow, ‖dL/dx‖ at the first block's input divided by that at the head input, on a fixed "
              "test batch (mean over seeds; above 1: the gradient grows on its way back to the input, below 1: it "
              f"shrinks{_figure_ref(figures, 'grad_flow')}):")
        piv = ratios.pivot_table(index=["arch", "depth", "model"], columns="moment", values="ratio").reset_index()
        piv = piv.sort_values(["arch", "depth"])
        cols = [c for c in ("init", "end") if c in piv]
        doc.table(["net", *[f"ratio at {c}" for c in cols]],
                  [[_net_link(study, r["model"]), *[ratio_text(float(r[c])) for c in cols]] for _, r in piv.iterrows()],
                  "l" + "r" * len(cols))
    doc.h(2, "Figures")
    made = [f for f in figures if f.made]
    for i, f in enumerate(made, 1):
        doc.figure(f, i, "figures")
    if not made:
        doc.p("No figure could be drawn (see Notes).")
    _diagnostics_section(doc, study, diag_figures, len(made))
    if notes:
        doc.h(2, "Notes")
        doc.ul(notes)
    _config_sections(doc, study)
    _runs_section(doc, study)
    tm = study.timings
    doc.p(f"Loaded in {tm.get('total', float('nan')):.1f} s (runs {tm.get('search_runs', float('nan')):.1f} s, "
          f"curves {tm.get('curves', float('nan')):.1f} s, probe artifacts {tm.get('probes', float('nan')):.1f} s); "
          f"figures drawn in {t_fig:.1f} s.")

    out_dir.mkdir(parents=True, exist_ok=True)
    write_tables(study, out_dir, anchor)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(doc.markdown())
    page.write_text(doc.html(f"Study report: {study.name}"))
    return Report(study, out_dir, figures, summary, notes, md, page)


def _diagnostics_section(doc: Doc, study: Study, figures: list[FigureResult], numbered: int) -> None:
    """Each diagnostic: its figure (numbered after the others), its sentences beside the published
    finding, or a line saying it was not run."""
    doc.h(2, "Why the deep plain nets degrade")
    doc.p("Four diagnostics on the trained nets (`resnet-lab diagnose`, logged into each run as "
          "`diagnostics/<name>.parquet` and `diag/<name>/*` metrics): what the shortcut changes beyond gradient size.")
    sentences = diagnostic_findings(study)
    for fig in figures:
        doc.h(3, fig.title)
        if fig.made:
            numbered += 1
            doc.figure(fig, numbered, "figures")
        doc.ul(annotate(sentences.get(fig.name, []), study))
        if not fig.made:
            doc.p(f"Not run for this study: {fig.name} has no numbers here (run `resnet-lab diagnose STUDY_FILE`). "
                  f"Published: {PUBLISHED[fig.name]}.")
        elif not sentences.get(fig.name):
            doc.p(f"No plain/ResNet pair to compare. Published: {PUBLISHED[fig.name]}.")


def _figure_ref(figures: list[FigureResult], name: str) -> str:
    """'; see Figure 3' for a figure that was drawn (numbered as in the report), else ''."""
    made = [f.name for f in figures if f.made]
    return f"; see Figure {made.index(name) + 1}" if name in made else ""


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
