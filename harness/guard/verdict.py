"""From what the watcher counted to findings, and the report (JSON and text).

The rules, for a script the guard has never seen:

- a **training** forward (a backward pass reached it) of a model that an optimizer updates is flagged
  ``train_in_eval_mode`` for mode-dependent modules in eval mode, unless they are frozen (the nearest
  block around them with parameters has none that require grad: a frozen backbone kept in eval mode on
  purpose), and ``frozen_in_train_mode`` for frozen BatchNorm layers left in training mode (their
  running statistics drift although their weights are frozen);
- an **evaluation** forward (under ``no_grad``/``inference_mode``, or never backpropagated) is flagged
  ``eval_in_train_mode`` for modules in training mode (dropout-like ones accepted with ``mc_dropout``)
  and ``bn_stats_changed_in_eval`` for BatchNorm layers among them; these two apply only to models
  some optimizer updates, or to every model when nothing is trained at all: a model that no optimizer
  updates while another one trains is a target network, an EMA copy or a teacher, and is left alone;
- an evaluation forward with autograd on that built a graph is ``grad_enabled_in_eval``, for any model;
- ``missing_zero_grad`` comes from grads.py, per optimizer.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from harness.guard.detector import FINDINGS
from harness.guard.roots import EVAL, EVAL_GRAD, TRAIN
from harness.guard.sites import format_site

MC_DROPOUT = "mc_dropout"
UNIT = {"missing_zero_grad": "step"}


@dataclass
class Finding:
    kind: str
    model: str                      # the model's (or, for missing_zero_grad, the optimizer's) name
    modules: list[str]
    sites: dict[str, int] = field(default_factory=dict)  # "file:line" -> forwards (steps)
    count: int = 0                  # forwards (steps) that showed it
    of: int | None = None           # steps checked, for missing_zero_grad
    classes: dict[str, str] = field(default_factory=dict)  # module -> its class, for the text report

    @property
    def description(self) -> str:
        return FINDINGS[self.kind]


def judge(models, optimizers, allow=frozenset(), since: bool = False) -> list[Finding]:
    """The findings in the counts (only those after the last marks when ``since``)."""
    mc = MC_DROPOUT in allow
    trains = any(s.steps for s in optimizers)
    found: dict[tuple[str, str], tuple[set, Counter, list]] = {}

    def add(kind, root, modules, site, n):
        if modules and kind not in allow:
            mods, sites, total = found.setdefault((kind, root.name), (set(), Counter(), [0]))
            mods.update(modules)
            sites[site] += n
            total[0] += n

    def evaluation(root, flags, site, n):
        on = [i for i, t in enumerate(flags) if t]
        add("eval_in_train_mode", root, [root.names[i] for i in on if not (mc and root.stochastic[i])], site, n)
        add("bn_stats_changed_in_eval", root, [root.names[i] for i in on if root.bn[i]], site, n)

    for root in models:
        # A model no optimizer updates while another one trains is a target network, an EMA copy or
        # a teacher: only what it does after the last optimizer step (a final test) is evaluation.
        checked = bool(root.optimizers) or not trains
        for ((flags, sig, site), phase), n in root.counts(since):
            if phase == TRAIN:
                if checked:
                    frozen = root.frozen.get((flags, sig), (False,) * len(flags))
                    add("train_in_eval_mode", root, [root.names[i] for i, t in enumerate(flags)
                                                     if not t and not frozen[i]], site, n)
                    add("frozen_in_train_mode", root, [root.names[i] for i, t in enumerate(flags)
                                                       if t and frozen[i] and root.bn[i]], site, n)
                continue
            if phase == EVAL_GRAD:
                add("grad_enabled_in_eval", root, [root.name], site, n)
            if checked:
                evaluation(root, flags, site, n)
        if not checked:
            for ((flags, _, site), _), n in root.counts(since, late=True):
                evaluation(root, flags, site, n)

    classes = {r.name: r.classes for r in models}
    out = [Finding(kind, model, sorted(mods), {format_site(s): c for s, c in sites.most_common()}, t[0],
                   classes={m: classes[model].get(m, "") for m in sorted(mods)})
           for (kind, model), (mods, sites, t) in found.items()]
    if "missing_zero_grad" not in allow:
        for s in optimizers:
            steps, checked, carried = s.counts()
            if since:
                checked, carried = checked - s.mark[1], carried - s.mark[2]
            if carried > 0:
                out.append(Finding("missing_zero_grad", s.name, [s.name],
                                   {format_site(k): c for k, c in s.sites.most_common()}, carried, checked,
                                   {s.name: s.cls}))
    order = list(FINDINGS)
    return sorted(out, key=lambda f: (order.index(f.kind), f.model))


def summarize(findings: list[Finding]) -> dict[str, list[str]]:
    """``{kind: [modules]}``, the shape of ``ModeGuard.summary()``."""
    out: dict[str, set[str]] = {}
    for f in findings:
        out.setdefault(f.kind, set()).update(f.modules)
    return {k: sorted(v) for k, v in out.items()}


def report(models, optimizers, findings, allow, error) -> dict:
    phases = (TRAIN, EVAL, EVAL_GRAD)
    return {
        "findings": [{**asdict(f), "description": f.description} for f in findings],
        "models": [{"name": r.name, "class": r.cls, "updated_by": list(r.optimizers),
                    "forwards": {p: sum(n for (_, ph), n in r.obs.items() if ph == p) for p in phases}}
                   for r in models],
        "optimizers": [{"name": s.name, "class": s.cls, "steps": s.steps, "models": list(s.models)}
                       for s in optimizers],
        "allowed": sorted(allow),
        "guard_error": error,
    }


def format_report(rep: dict, script: str | None = None) -> str:
    """A few lines for the terminal: each finding with its modules and call sites, then what was watched."""
    where = f" in {script}" if script else ""
    found = rep["findings"]
    lines = [f"mode guard: {len(found)} finding{'s' if len(found) != 1 else ''}{where}" if found
             else f"mode guard: no mode bugs found{where}"]
    for f in found:
        unit = UNIT.get(f["kind"], "forward")
        lines.append(f"  {f['kind']}: {f['description']}")
        lines.append("    " + ", ".join(f"{m} ({f['classes'][m]})" if f["classes"].get(m) else m
                                        for m in f["modules"]))
        for site, n in list(f["sites"].items())[:5]:
            lines.append(f"    at {site} ({n} {unit}{'s' if n != 1 else ''})")
        if f["of"] is not None:
            lines.append(f"    gradients carried over in {f['count']} of {f['of']} steps")
    models = ", ".join(
        f"{m['name']} ({m['class']}: {m['forwards'][TRAIN]} training, "
        f"{m['forwards'][EVAL] + m['forwards'][EVAL_GRAD]} evaluation forwards"
        + (f"; updated by {', '.join(m['updated_by'])})" if m["updated_by"] else "; not optimized)")
        for m in rep["models"])
    lines.append(f"  watched: {models or 'no model with parameters was called'}")
    if rep["allowed"]:
        lines.append(f"  allowed: {', '.join(rep['allowed'])}")
    if rep["guard_error"]:
        lines.append(f"  the guard stopped watching after an internal error: {rep['guard_error']}")
    return "\n".join(lines)
