"""Issue 23's measurements: few-step discrete samplers with LSD / LSD+ coefficients against the plain sampler, a
many-step teacher and diffusers' DiscreteDDIMScheduler, on the exact testbed and on the shipped digits model.

    python experiments/bench_discrete.py --part testbed   # results/discrete/testbed.{jsonl,md}
    python experiments/bench_discrete.py --part digits    # results/discrete/digits.{jsonl,md,png}
    python experiments/bench_discrete.py --part digits-paired   # each row minus plain, paired SE: digits-paired.*
    python experiments/bench_discrete.py --part testbed --table   # rewrite the table from the JSONL only

Testbed: a mixture of 3 product-categoricals over 6 positions and 4 values (``CategoricalMixture.random(length=6,
vocab_size=4, components=3, concentration=0.3, seed=0)``), masked and uniform corruption; the metric is the exact KL
from the true distribution to the sampler's exact output distribution (``exact_kl``), and "gap closed" is
(plain - fitted) / (plain - teacher).  diffusers' scheduler is run as its own step loop and scored by the
empirical KL of 200,000 samples beside ours at the same sample count.

Digits: the shipped ``digits-uniform`` model; fits use runs from seeds 0.. and every score uses 2,000 samples from
a held-out seed (1000), scored by ``DigitsEvaluator`` (Fréchet distance of classifier features to the held-out
digits, bootstrap SE; NLL under an EM mixture of the training digits).  diffusers' DiscreteDDIMScheduler runs at
temperature 1 (ancestral) and 0 (the pipelines' greedy default).

Every cell is one JSONL record, written as it finishes: a killed run resumes where it stopped.  Fitted coefficients
are written to learned/lsd/<part>-<corruption>-<method>-<steps>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fastsample.discrete import (DiscreteCoefficients, empirical_kl, exact_kl, fit_coefficients, fit_lsd, fit_lsd_exact,
                                 sample)
from fastsample.results import ResultsFile, read_records
from fastsample.testbeds import CategoricalMixture

OUT = Path("results/discrete")
ARTEFACTS = Path("learned/lsd")
STEPS = (4, 8, 16)
TEACHER = 256
FITS = {  # method -> fit_lsd keywords
    "LSD (paper's score loss)": dict(learn_levels=False, loss="scores"),
    "LSD": dict(learn_levels=False, loss="states"),
    "LSD+": dict(learn_levels=True, loss="states"),
    # the same state alignment on the last step alone: the sampler's output against the teacher's, as LD3 aligns end
    # points; from the identity coefficients
    "LSD+ (end state)": dict(learn_levels=True, loss="states", weighting="final"),
}


# the testbed only: the same alignment of the state distributions, computed exactly (exact_alignment_loss), so the
# fit is free of the sampled MMD's noise
EXACT_FITS = {  # method -> fit_lsd_exact keywords; LSD and the end-state fit start from the identity coefficients;
    # LSD+ from those and from the same cell's LSD fit, keeping the lower alignment loss (Powell's search is local:
    # neither start wins every cell)
    "LSD (exact alignment)": dict(learn_levels=False),
    "LSD+ (exact alignment)": dict(learn_levels=True),
    "LSD+ (exact end-state alignment)": dict(learn_levels=True, weighting="final"),
}


# the coefficient family's headroom: LSD+'s parameters fitted to the exact KL itself (possible on the testbed only;
# an exact KL evaluation of a masked run enumerates 5^6 partial states, so only the cheap cells get one)
ORACLE_ROW = "oracle: LSD+ family fitted to the exact KL"
ORACLE = {("uniform", 4), ("uniform", 8), ("mask", 4)}
# the rows beside the fits: the testbed's uniform cells also score 200,000 samples of ours and of diffusers'; the
# digits cells run diffusers' scheduler at temperature 1 and at the pipelines' greedy 0
EMPIRICAL_ROWS = ["plain (empirical)", "DiscreteDDIMScheduler (empirical)"]
DIGITS_BASELINES = ["plain", "DiscreteDDIMScheduler (T=1)", "DiscreteDDIMScheduler (T=0)"]
ROWS = {"plain", ORACLE_ROW, *EMPIRICAL_ROWS, *DIGITS_BASELINES, *FITS, *EXACT_FITS}   # what --methods may name


def testbed():
    return CategoricalMixture.random(length=6, vocab_size=4, components=3, concentration=0.3, seed=0)


def _slug(method: str) -> str:
    return {"LSD (paper's score loss)": "lsd-scores", "LSD": "lsd", "LSD+": "lsdplus", "LSD (exact alignment)": "lsd-exact",
            "LSD+ (exact alignment)": "lsdplus-exact", "LSD+ (end state)": "lsdplus-end",
            "LSD+ (exact end-state alignment)": "lsdplus-exact-end"}[method]


def ddim_loop(logits_fn, n, length, vocab_size, steps, temperature, seed):
    """diffusers' DiscreteDDIMScheduler as its pipeline drives it: uniform random start, one step a call."""
    from diffusers import DiscreteDDIMScheduler

    s = DiscreteDDIMScheduler()
    s.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab_size, (n, length), generator=g)
    for i in range(steps):
        x = s.step(logits_fn(x, i / steps), i, x, temperature=temperature, generator=g).prev_sample
    return x


def fit_cell(denoiser, method, steps, corruption, length, vocab_size, n, max_evals, part):
    """Fit one cell's coefficients and save them; LSD+ starts from the same cell's LSD fit when there is one (its
    temperatures, on the linear grid), so it searches the schedule on top of LSD."""
    warm = ARTEFACTS / f"{part}-{corruption}-lsd-{steps}.json"
    start = DiscreteCoefficients.load(warm) if method == "LSD+" and warm.exists() else None
    c = fit_lsd(denoiser, steps, length, vocab_size, corruption, teacher_steps=TEACHER, n=n, seed=0,
                max_evals=max_evals, start=start, **FITS[method])
    return c, save_fit(c, part, corruption, method, steps)


def _exact_fit(m, method, steps, corruption, max_evals) -> tuple[DiscreteCoefficients, str]:
    """An exact-alignment fit and the start it came from (see EXACT_FITS), chosen on the fit's own objective."""
    starts = {"identity": None}
    warm = ARTEFACTS / f"testbed-{corruption}-{_slug('LSD (exact alignment)')}-{steps}.json"
    if method == "LSD+ (exact alignment)" and warm.exists():
        starts[str(warm)] = DiscreteCoefficients.load(warm)
    fits = {name: fit_lsd_exact(m, steps, corruption, teacher_steps=TEACHER, start=start, max_evals=max_evals,
                                **EXACT_FITS[method])
            for name, start in starts.items()}
    name = min(fits, key=lambda k: fits[k].meta["loss_fitted"])
    return fits[name], name


def save_fit(c, part, corruption, method, steps) -> str:
    path = ARTEFACTS / f"{part}-{corruption}-{_slug(method)}-{steps}.json"
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    c.save(path)
    return str(path)


def _chosen(method, args) -> bool:
    """Whether a row runs: every row, or those that --methods names."""
    return not args.methods or method in args.methods


def run_testbed(f, done, args):
    m = testbed()
    for corruption in args.corruptions:
        den = lambda x, a, c=corruption: m.posterior(x, a, c)  # noqa: E731
        for steps in args.steps:
            rows = ["plain", *FITS, *EXACT_FITS]
            if corruption == "uniform":
                rows += EMPIRICAL_ROWS
            if (corruption, steps) in ORACLE:
                rows.append(ORACLE_ROW)
            for method in filter(lambda r: _chosen(r, args), rows):
                key = f"testbed/{corruption}/{method}/{steps}"
                if key in done:
                    continue
                t = time.time()
                rec = {"key": key, "part": "testbed", "corruption": corruption, "method": method, "steps": steps}
                if method == "plain":
                    rec["kl"] = exact_kl(m, DiscreteCoefficients.plain(steps, corruption))
                elif method == "plain (empirical)":
                    x = sample(den, DiscreteCoefficients.plain(steps, corruption), 200000, 6, 4, seed=1)
                    rec["kl_empirical"] = empirical_kl(m, x)
                elif method.startswith("DiscreteDDIM"):
                    logits = lambda x, a: torch.log(m.posterior(x, a, "uniform"))  # noqa: E731
                    rec["kl_empirical"] = empirical_kl(m, ddim_loop(logits, 200000, 6, 4, steps, 1.0, seed=1))
                elif method in EXACT_FITS:
                    c, start = _exact_fit(m, method, steps, corruption, args.max_evals)
                    rec.update(kl=exact_kl(m, c), coefficients=save_fit(c, "testbed", corruption, method, steps),
                               fit=c.meta, start=start)
                elif method == ORACLE_ROW:
                    c, info = fit_coefficients(lambda c: exact_kl(m, c), DiscreteCoefficients.plain(steps, corruption),
                                               True, args.max_evals)
                    rec.update(kl=exact_kl(m, c), levels=list(c.levels), temperatures=list(c.temperatures),
                               fit=info)
                else:
                    c, path = fit_cell(den, method, steps, corruption, 6, 4, args.fit_runs, args.max_evals, "testbed")
                    rec.update(kl=exact_kl(m, c), coefficients=path, fit=c.meta)
                rec["seconds"] = round(time.time() - t, 1)
                f.append(rec)
                print(json.dumps(rec)[:300], flush=True)
        key = f"testbed/{corruption}/teacher/{TEACHER}"
        if key not in done:
            t = time.time()
            f.append({"key": key, "part": "testbed", "corruption": corruption, "method": f"teacher ({TEACHER} steps)",
                      "steps": TEACHER, "kl": exact_kl(m, DiscreteCoefficients.plain(TEACHER, corruption)),
                      "seconds": round(time.time() - t, 1)})


DIGITS_SEED = 1000  # the held-out seed of every digits score


def _digits_setup():
    from fastsample.discrete_models import DigitsEvaluator, as_denoiser, load_digits_model

    model = load_digits_model()
    return model, as_denoiser(model), DigitsEvaluator()


def digits_samples(model, den, method, steps, n, coefficients=None):
    """The digits cell's samples (held-out seed DIGITS_SEED): diffusers' scheduler for the DiscreteDDIM rows, else
    our sampler with ``coefficients`` (default: the plain ones)."""
    from fastsample.discrete_models import LENGTH, LEVELS

    if method.startswith("DiscreteDDIM"):
        def logits(x, a):
            with torch.no_grad():
                return model(x, torch.tensor(float(a)))
        return ddim_loop(logits, n, LENGTH, LEVELS, steps, 1.0 if "T=1" in method else 0.0, DIGITS_SEED)
    c = coefficients if coefficients is not None else DiscreteCoefficients.plain(steps, "uniform")
    return sample(den, c, n, LENGTH, LEVELS, seed=DIGITS_SEED)


def run_digits(f, done, args):
    from fastsample.discrete_models import LENGTH, LEVELS

    model, den, ev = _digits_setup()

    def score(x):
        fd, fd_se = ev.fd(x)
        nll, nll_se = ev.nll(x)
        return {"fd": fd, "fd_se": fd_se, "nll": nll, "nll_se": nll_se}

    n = args.eval_samples
    cells = [(f"teacher ({TEACHER} steps)", TEACHER)] + [(m, s) for s in args.steps for m in
                                                         (*DIGITS_BASELINES, *FITS)]
    for method, steps in cells:
        if not _chosen(method, args):
            continue
        key = f"digits/uniform/{method}/{steps}"
        if key in done:
            continue
        t = time.time()
        rec = {"key": key, "part": "digits", "corruption": "uniform", "method": method, "steps": steps}
        c = None
        if method in FITS:
            c, path = fit_cell(den, method, steps, "uniform", LENGTH, LEVELS, args.fit_runs, args.max_evals, "digits")
            rec.update(coefficients=path, fit=c.meta)
        x = digits_samples(model, den, method, steps, n, c)
        rec.update(score(x), samples=n, seed=DIGITS_SEED, seconds=round(time.time() - t, 1))
        f.append(rec)
        print(json.dumps(rec)[:300], flush=True)


def run_paired(f, done, args):
    """Each digits row against a baseline row (``--baseline``, default the plain sampler) at the same step count,
    from the same seed: FD(row) - FD(baseline) with the paired bootstrap SE (``DigitsEvaluator.fd_difference``); the
    fitted rows use the coefficients the digits part saved (run it first)."""
    model, den, ev = _digits_setup()
    n, base = args.eval_samples, args.baseline
    for steps in args.steps:
        plain = None
        for method in DIGITS_BASELINES + list(FITS):
            if not _chosen(method, args) or method == base:
                continue
            key = (f"digits-paired/uniform/{method}/{steps}/n{n}" + ("" if base == "plain" else f"/vs {base}")
                   + ("" if args.bootstrap == 200 else f"/b{args.bootstrap}"))
            if key in done:
                continue
            c = None
            if method in FITS:
                path = ARTEFACTS / f"digits-uniform-{_slug(method)}-{steps}.json"
                if not path.exists():
                    raise SystemExit(f"{path} is missing: run --part digits --steps {steps} first")
                c = DiscreteCoefficients.load(path)
            t = time.time()
            if plain is None:
                plain = digits_samples(model, den, base, steps, n)
            x = digits_samples(model, den, method, steps, n, c)
            diff, se = ev.fd_difference(x, plain, bootstrap=args.bootstrap)
            _, se_seeds = ev.fd_difference(x, plain, bootstrap=args.bootstrap, resample_reference=False)
            rec = {"key": key, "part": "digits-paired", "corruption": "uniform", "method": method, "steps": steps,
                   "baseline": base, "fd_minus_baseline": diff, "se": se, "se_seeds": se_seeds,
                   "bootstrap": args.bootstrap,
                   "samples": n, "seed": DIGITS_SEED, "seconds": round(time.time() - t, 1)}
            f.append(rec)
            print(json.dumps(rec)[:300], flush=True)


def table(part: str) -> str:
    recs = read_records(OUT / f"{part}.jsonl")
    lines = []
    if part == "testbed":
        lines += ["Exact KL(p || q) from the testbed's distribution to each sampler's exact output distribution "
                  "(6 positions, 4 values, 3 components); gap closed = (plain - fitted) / (plain - teacher).", ""]
        for corruption in ("mask", "uniform"):
            teacher = next((r["kl"] for r in recs if r["corruption"] == corruption and r["method"].startswith("teacher")),
                           None)
            lines += [f"**{corruption} corruption** (teacher, {TEACHER} steps: "
                      f"{teacher:.5f})" if teacher is not None else f"**{corruption} corruption**", "",
                      "| steps | method | KL | gap closed |", "|---|---|---|---|"]
            for steps in STEPS:
                plain = next((r["kl"] for r in recs if r["corruption"] == corruption and r["method"] == "plain"
                              and r["steps"] == steps), None)
                order = ["plain", *FITS, *EXACT_FITS, ORACLE_ROW, *EMPIRICAL_ROWS]
                cell = [r for r in recs if r["corruption"] == corruption and r["steps"] == steps]
                for r in sorted(cell, key=lambda r: order.index(r["method"])):
                    if "kl" in r:
                        gap = ("" if r["method"] == "plain" or plain is None or teacher is None else
                               f"{(plain - r['kl']) / (plain - teacher):+.0%}")
                        lines.append(f"| {steps} | {r['method']} | {r['kl']:.5f} | {gap} |")
                    else:
                        lines.append(f"| {steps} | {r['method']} | {r['kl_empirical']:.5f} (200k samples) | |")
            lines.append("")
    elif part == "digits-paired":
        lines += ["FD(row) - FD(baseline) at the same step count and sample count, from the same held-out seed "
                  "(1000), against the 297 held-out digits. Paired bootstrap SEs (one draw of sample indices for both "
                  "rows per replicate): 'SE' also redraws the held-out digits, 'SE (seeds)' keeps them fixed and "
                  "covers the samples' seeds alone. Negative: the row is closer to the held-out digits.", "",
                  "| steps | samples | method | baseline | FD - FD(baseline) | SE | z | SE (seeds) | z (seeds) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(recs, key=lambda r: (r["steps"], r["samples"], r["baseline"] != "plain", r["key"])):
            d = r["fd_minus_baseline"]
            z = [f"{d / e:+.1f}" if e > 0 else "" for e in (r["se"], r["se_seeds"])]
            lines.append(f"| {r['steps']} | {r['samples']} | {r['method']} | {r['baseline']} | {d:+.2f} | {r['se']:.2f} | "
                         f"{z[0]} | {r['se_seeds']:.2f} | {z[1]} |")
    else:
        lines += ["The shipped digits-uniform model (64 tokens, 17 levels): 2,000 samples from held-out seed 1000; "
                  "FD = Fréchet distance of classifier features to the 297 held-out digits (bootstrap SE); NLL in "
                  "nats per image under an EM mixture of the training digits.", "",
                  "| steps | method | FD | NLL |", "|---|---|---|---|"]
        for r in sorted(recs, key=lambda r: (r["steps"], r["key"])):
            lines.append(f"| {r['steps']} | {r['method']} | {r['fd']:.2f} ± {r['fd_se']:.2f} | "
                         f"{r['nll']:.1f} ± {r['nll_se']:.1f} |")
    text = "\n".join(lines) + "\n"
    (OUT / f"{part}.md").write_text(text)
    return text


def plot_digits():
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_records(OUT / "digits.jsonl")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in recs if not r["method"].startswith("teacher")):
        rs = sorted((r for r in recs if r["method"] == method), key=lambda r: r["steps"])
        ax.errorbar([r["steps"] for r in rs], [r["fd"] for r in rs], [r["fd_se"] for r in rs], label=method,
                    marker="o", capsize=3)
    for r in recs:
        if r["method"].startswith("teacher"):
            ax.axhline(r["fd"], color="k", ls="--", lw=1, label=r["method"])
    ax.set(xscale="log", xlabel="steps (model calls)", ylabel="Fréchet distance (classifier features)",
           title="digits-uniform: few-step samplers")
    shown = sorted({r["steps"] for r in recs if not r["method"].startswith("teacher")})
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(shown, [str(s) for s in shown])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "digits.png", dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("testbed", "digits", "digits-paired"), required=True)
    p.add_argument("--fit-runs", type=int, default=1000, help="runs in each fit's alignment loss")
    p.add_argument("--max-evals", type=int, default=600, help="loss evaluations per fit")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS), help="the step counts to run")
    p.add_argument("--corruptions", nargs="+", choices=("mask", "uniform"), default=["mask", "uniform"],
                   help="testbed: the corruptions to run")
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--bootstrap", type=int, default=200, help="digits-paired: bootstrap replicates")
    p.add_argument("--baseline", default="plain", choices=DIGITS_BASELINES, help="digits-paired: the row compared to")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="only rewrite the table (and plot) from the JSONL")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="run only these rows (default: every row), e.g. "
                   "'LSD+ (exact end-state alignment)'")
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods or ()) - ROWS)
    if unknown:
        p.error(f"--methods: unknown {unknown}; the rows are {sorted(ROWS)}")
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.part}.jsonl"
    if not args.table:
        done = {r["key"] for r in read_records(path)} if path.exists() else set()
        with ResultsFile(path) as f:
            {"testbed": run_testbed, "digits": run_digits, "digits-paired": run_paired}[args.part](f, done, args)
    print(table(args.part))
    if args.part == "digits":
        plot_digits()


if __name__ == "__main__":
    main()
