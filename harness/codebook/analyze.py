"""`harness codebook analyze`: does language-feedback redundancy agree with intermediate-state cues?

For every probed token of a codebook's build (read from its probe cache): p_max, JSD_local,
JSD_global, the label, the ViT-[CLS] similarity and the probe prompt's last-token attention to the
token in a middle decoder layer (the unablated run). Written out:

  probed_tokens.csv   one row per probed token
  correlations.csv    Spearman correlations of the five statistics
  summary.json        the shares below, and the counts
  analysis.png        the statistics against each other, coloured by label, and the shares
  kept_per_image.png  with `--run DIR`: tokens the adaptive `codebook` kept per image in that run

The paper's finding, tested: of the tokens that [CLS] similarity or attention would call unimportant
(the lower half of the image's tokens by that cue, ranked among all of the image's tokens; higher
[CLS] similarity and higher attention are what [CLS]- and attention-based pruners keep), what share
is *not* redundant by the language-feedback label? Set beside the share among all probed tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from methods import codebook_files as files

from .build import BuildConfig, combined_jsd, label, load_model, run_probes, testbed_images
from .probes import ProbeConfig


def probed_table(cache: Path, cfg: BuildConfig, limits: dict):
    import pandas as pd

    rows = []
    paths = sorted(Path(cache).glob("*.pt"))
    if not paths:
        raise ValueError(f"no probe results in {cache}: run `harness codebook build` first")
    for path in paths:
        r = torch.load(path, weights_only=True)
        n = len(r["cls_similarity"])
        # Each cue's rank among all of the image's tokens, as a fraction (0 = lowest).
        cls_rank = r["cls_similarity"].argsort().argsort().float() / (n - 1)
        attn_rank = r["attention"].argsort().argsort().float() / (n - 1)
        redundant = label(r, cfg, limits)
        jsd = combined_jsd(r, cfg)
        for i, t in enumerate(r["positions"].tolist()):
            rows.append({"image": path.stem, "token": t, "p_max": float(r["p_max"][i]),
                         "jsd_local": float(r["jsd_local"][i]), "jsd_global": float(r["jsd_global"][i]),
                         "jsd_combined": float(jsd[i]), "cls_similarity": float(r["cls_similarity"][t]),
                         "attention": float(r["attention"][t]), "cls_rank": float(cls_rank[t]),
                         "attention_rank": float(attn_rank[t]), "redundant": bool(redundant[i])})
    return pd.DataFrame(rows)


def shares(table) -> dict:
    informative = ~table["redundant"]
    out = {"probed_tokens": len(table), "images": table["image"].nunique(),
           "not_redundant_share_all": float(informative.mean())}
    for cue in ("cls", "attention"):
        low = table[f"{cue}_rank"] < 0.5
        out[f"{cue}_unimportant_tokens"] = int(low.sum())
        out[f"not_redundant_share_{cue}_unimportant"] = float(informative[low].mean()) if low.any() else float("nan")
    return out


def analyze(codebook: str, output: str | Path, run_dir: str | Path | None = None, say=print) -> dict:
    record = files.build_record(codebook)
    if not record:
        raise ValueError(f"{codebook} has no build record (.build.json): analyze needs a codebook built by "
                         f"`harness codebook build`, whose probe cache it reads")
    cfg_fields = {k: v for k, v in record["config"].items() if k != "probe"}
    cfg = BuildConfig(**cfg_fields, probe=ProbeConfig(**record["config"]["probe"]))
    cache = files.resolve(record["probe_cache"])
    if len(list(cache.glob("*.pt"))) < cfg.images:  # a fresh clone: the cache is not committed
        say(f"probe cache {cache} incomplete: probing the build's {cfg.images} images again (resumable)")
        model, processor = load_model(record["model"])
        run_probes(model, processor, testbed_images(cfg.images), cache, cfg.probe)
    table = probed_table(cache, cfg, record["thresholds"])
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "probed_tokens.csv", index=False)
    stats = ["p_max", "jsd_local", "jsd_global", "cls_similarity", "attention"]
    corr = table[stats].corr(method="spearman")
    corr.to_csv(out / "correlations.csv")
    summary = shares(table) | {"thresholds": record["thresholds"], "codebook": str(codebook)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(table, summary, out / "analysis.png")
    say(corr.round(3).to_string())
    say(f"not redundant: {summary['not_redundant_share_all']:.1%} of all {summary['probed_tokens']} probed tokens; "
        f"{summary['not_redundant_share_cls_unimportant']:.1%} of those [CLS] similarity calls unimportant; "
        f"{summary['not_redundant_share_attention_unimportant']:.1%} of those attention calls unimportant")
    say(f"wrote {out}/probed_tokens.csv, correlations.csv, summary.json, analysis.png")
    if run_dir is not None:
        kept = plot_kept(kept_per_image(run_dir), out / "kept_per_image.png", record.get("tau"))
        summary["kept_per_image"] = kept
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        say(f"codebook (adaptive) in {run_dir}: {kept['mean']:.1f} tokens kept per image on average "
            f"(median {kept['median']:.0f}, 10-90% {kept['p10']:.0f}-{kept['p90']:.0f}, range {kept['min']}-"
            f"{kept['max']}, {kept['images']} images); plot kept_per_image.png")
    return summary


def _plot(table, summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    hue = table["redundant"].map({True: "redundant", False: "not redundant"})
    floor = 1e-9  # JSDs on a log axis
    specs = [("p_max", "jsd_combined", "single-input p_max", "JSD_local + 16 JSD_global"),
             ("cls_similarity", "jsd_global", "ViT [CLS] similarity", "JSD_global"),
             ("attention", "jsd_global", "text->image attention (middle layer)", "JSD_global")]
    for ax, (x, y, xl, yl) in zip(axes, specs):
        sns.scatterplot(x=table[x], y=table[y].clip(lower=floor), hue=hue, s=8, alpha=0.5, ax=ax, linewidth=0)
        ax.set_yscale("log")
        if x == "attention":
            ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    labels = ["all probed", "low [CLS]\nsimilarity", "low\nattention"]
    values = [summary["not_redundant_share_all"], summary["not_redundant_share_cls_unimportant"],
              summary["not_redundant_share_attention_unimportant"]]
    axes[3].bar(labels, values, color=["grey", "tab:blue", "tab:orange"])
    axes[3].set_ylabel("share NOT redundant (language feedback)")
    axes[3].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kept_per_image(run_dir: str | Path, method: str = "codebook") -> dict[str, list[int]]:
    """Tokens kept per image by an adaptive method in a `harness run` folder, per task (from the
    per-sample records: one kept-index list per image)."""
    out = {}
    for path in sorted((Path(run_dir) / "samples").glob(f"{method}_adaptive_*.jsonl")):
        counts = []
        for line in path.read_text().splitlines():
            for record in json.loads(line).get("records", []):
                counts += [len(kept) for kept in record.get("kept_indices") or []]
        out[path.stem.removeprefix(f"{method}_adaptive_")] = counts
    if not out:
        raise ValueError(f"no {method} (adaptive) samples in {run_dir}/samples: run it there first")
    return out


def plot_kept(per_task: dict[str, list[int]], path: Path, tau: float | None = None) -> dict:
    """Histogram of tokens kept per image, all tasks pooled; returns the statistics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pooled = np.array([c for counts in per_task.values() for c in counts])
    stats = {"images": int(len(pooled)), "mean": float(pooled.mean()), "median": float(np.median(pooled)),
             "min": int(pooled.min()), "max": int(pooled.max()),
             "p10": float(np.percentile(pooled, 10)), "p90": float(np.percentile(pooled, 90)),
             "per_task_mean": {t: float(np.mean(c)) for t, c in per_task.items()}}
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(pooled, bins=40, color="tab:green")
    ax.axvline(stats["mean"], color="black", ls="--", lw=1, label=f"mean {stats['mean']:.0f}")
    ax.set_xlabel("visual tokens kept per image (of 576)")
    ax.set_ylabel("images")
    ax.set_title("codebook, adaptive" + (f" (tau = {tau:.3f})" if tau is not None else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return stats
