"""`harness codebook build`: probe images, label redundant tokens, two-stage DPC-KNN, save.

Labels (METHODS.md §1.2): redundant(t) = (k_local·JSD_local + k_global·JSD_global < jsd_threshold)
and (p_max < pmax_threshold). The release's thresholds (0.15 and 2e-3 for LLaVA-1.5-7B) belong to its
model. For any other model, when a threshold is not given it is derived by this rule from the probe
statistics of the images being built on: `jsd_threshold` = the `jsd_quantile` quantile of the combined
JSD, `pmax_threshold` = the `pmax_quantile` quantile of p_max. Both default to the median: a token is
labelled redundant when removing it moves the output less, and it alone says less, than for half the
probed tokens. (On the testbed, 500 images: 25% labelled, 1,862 stage-one survivors; the release had
1,383 on LLaVA-1.5. A 30% JSD quantile left 1,128 survivors and no cross-image cluster drawn from more
than 64 images.)

The recommended tau written with the codebook is the cosine similarity at which the build images keep,
on average, `tau_keep_share` of their tokens (default 0.15, the middle of the 80-90% pruning the
authors report); the `codebook` method uses it unless given a tau.

Images: the testbed world's training-split scenes (one image each, families in turn). Each image's
probe results are cached as one file, written atomically, so an interrupted build resumes where it
stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from methods import codebook_files as files

from . import dpc
from .probes import ProbeConfig, Prober

RELEASE_LLAVA15 = {"pmax_threshold": 0.15, "jsd_threshold": 2e-3, "k_local": 1, "k_global": 16,
                   "image_clusters": 8, "image_max_size": 8, "cross_clusters": 64, "min_images": 64}


@dataclass
class BuildConfig:
    images: int = 500
    k_local: float = 1.0
    k_global: float = 16.0
    jsd_threshold: float | None = None
    pmax_threshold: float | None = None
    jsd_quantile: float = 0.5
    pmax_quantile: float = 0.5
    image_clusters: int = 8
    image_max_size: int = 8
    cross_clusters: int = 64
    min_images: int = 64
    knn: int = 5
    tau_keep_share: float = 0.15
    seed: int = 0
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def testbed_images(n: int) -> list[tuple[str, object]]:
    """(image id, PIL image) of the first n training-split scenes, single-image families in turn."""
    from ..testbed import questions as Q
    from ..testbed import world as W

    out = []
    families = Q.SINGLE_IMAGE_FAMILIES
    for i in range(n):
        fam, index = families[i % len(families)], i // len(families)
        scene = Q.make_sample("train", fam, index)["scenes"][0]
        out.append((f"train-{fam}-{index}", lambda scene=scene: W.render_pil(scene)))
    return out


def cache_dir_for(model_path: str, probe: ProbeConfig, root: str | Path = "runs/codebook-probes") -> Path:
    """A cache folder per (model weights, probe configuration)."""
    weights = sorted(Path(model_path).glob("*.safetensors")) or sorted(Path(model_path).glob("*.bin"))
    digest = hashlib.sha256(json.dumps(probe.to_dict(), sort_keys=True).encode())
    for w in weights:
        digest.update(hashlib.sha256(w.read_bytes()).digest())
    return Path(root) / digest.hexdigest()[:12]


def run_probes(model, processor, images, cache: Path, config: ProbeConfig, progress=True) -> dict[str, dict]:
    """Probe results per image id, from the cache where present (resumable)."""
    from tqdm import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    (cache / "probe_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    prober = Prober(model, processor, config)
    results = {}
    for image_id, load in tqdm(images, desc="probing images", unit="image", disable=not progress):
        path = cache / f"{image_id}.pt"
        if path.is_file():
            try:
                results[image_id] = torch.load(path, weights_only=True)
                continue
            except Exception:  # a file cut short by a kill: probe the image again
                path.unlink()
        pixels = processor.image_processor([load()], return_tensors="pt")["pixel_values"]
        began = time.perf_counter()
        result = prober.probe(pixels)
        result["seconds"] = torch.tensor(time.perf_counter() - began)  # the build's time, resumed or not
        tmp = path.with_suffix(".tmp")
        torch.save(result, tmp)
        tmp.replace(path)
        results[image_id] = result
    return results


def combined_jsd(result: dict, cfg: BuildConfig) -> torch.Tensor:
    return cfg.k_local * result["jsd_local"] + cfg.k_global * result["jsd_global"]


def thresholds(results: dict[str, dict], cfg: BuildConfig) -> dict:
    """The two label thresholds: as given, else by the quantile rule (module docstring)."""
    jsd = torch.cat([combined_jsd(r, cfg) for r in results.values()])
    pmax = torch.cat([r["p_max"] for r in results.values()])
    return {"jsd_threshold": cfg.jsd_threshold if cfg.jsd_threshold is not None
            else float(torch.quantile(jsd.double(), cfg.jsd_quantile)),
            "pmax_threshold": cfg.pmax_threshold if cfg.pmax_threshold is not None
            else float(torch.quantile(pmax.double(), cfg.pmax_quantile)),
            "rule": {"jsd": "given" if cfg.jsd_threshold is not None else f"quantile {cfg.jsd_quantile}",
                     "p_max": "given" if cfg.pmax_threshold is not None else f"quantile {cfg.pmax_quantile}"}}


def label(result: dict, cfg: BuildConfig, limits: dict) -> torch.Tensor:
    return (combined_jsd(result, cfg) < limits["jsd_threshold"]) & (result["p_max"] < limits["pmax_threshold"])


def select_prototypes(results: dict[str, dict], cfg: BuildConfig, limits: dict) -> tuple[torch.Tensor, list, dict]:
    """The two DPC-KNN stages: (prototypes [P, D], their source image ids, statistics)."""
    survivors, sources, labelled = [], [], 0
    for image_id, r in results.items():
        redundant = label(r, cfg, limits)
        labelled += int(redundant.sum())
        keep = dpc.stage_one(r["features"], redundant, cfg.image_clusters, cfg.image_max_size, cfg.knn, cfg.seed)
        survivors.append(r["features"][keep])
        sources += [image_id] * len(keep)
    pooled = torch.cat(survivors) if survivors else torch.zeros(0, 1)
    stats = {"probed_tokens": sum(len(r["p_max"]) for r in results.values()), "labelled_redundant": labelled,
             "stage_one_survivors": len(sources)}
    if len(sources) == 0:
        raise ValueError(f"no token survived stage one ({labelled} labelled redundant): loosen the thresholds")
    keep, stage_two = dpc.stage_two(pooled, sources, cfg.cross_clusters, cfg.min_images, cfg.knn, cfg.seed)
    stats["stage_two"] = stage_two
    if len(keep) == 0:
        biggest = max(c["distinct_images"] for c in stage_two["clusters"].values())
        raise ValueError(f"no cross-image cluster has more than {cfg.min_images} distinct images (largest: "
                         f"{biggest}); probe more images or lower min_images")
    stats["prototypes"] = len(keep)
    return pooled[keep], [sources[i] for i in keep.tolist()], stats


def recommended_tau(prototypes: torch.Tensor, token_sets: list[torch.Tensor], share: float) -> float:
    """The cosine threshold below which `share` of the tokens of `token_sets` ((N, D) each) fall."""
    import torch.nn.functional as F

    codes = F.normalize(prototypes.float(), dim=-1)
    s = torch.cat([(F.normalize(x.float(), dim=-1) @ codes.T).max(dim=1).values for x in token_sets])
    return float(torch.quantile(s.double(), share))


def _portable(path) -> str:
    """A path inside the repository as relative to its root (the record travels with the codebook)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(files.REPO_ROOT))
    except ValueError:
        return str(p)


def load_model(model_path: str):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = str(files.resolve(model_path))
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def build(model_path: str, output: str | Path, cfg: BuildConfig, cache: str | Path | None = None,
          say=print) -> dict:
    started = time.perf_counter()
    model, processor = load_model(model_path)
    cache = Path(cache) if cache else cache_dir_for(model_path, cfg.probe)
    images = testbed_images(cfg.images)
    results = run_probes(model, processor, images, cache, cfg.probe)
    limits = thresholds(results, cfg)
    prototypes, sources, stats = select_prototypes(results, cfg, limits)
    # Every token of a subset of the build images, for the recommended tau.
    prober = Prober(model, processor, cfg.probe)
    sample = [processor.image_processor([load()], return_tensors="pt")["pixel_values"] for _, load in images[:64]]
    with torch.no_grad():
        feats = [prober.visual_tokens(p)[0] for p in sample]
    tau = recommended_tau(prototypes, feats, cfg.tau_keep_share)
    record = {"model": _portable(model_path), "tau": tau, "thresholds": limits, "config": asdict(cfg),
              "release_llava15": RELEASE_LLAVA15, "statistics": stats,
              "build_seconds": round(time.perf_counter() - started, 1), "probe_cache": _portable(cache),
              "probe_seconds": round(sum(float(r.get("seconds", float("nan"))) for r in results.values()), 1),
              "torch": torch.__version__, "device": str(model.device)}
    files.save(output, prototypes, sources, record)
    say(f"{len(sources)} prototypes from {len(set(sources))} images ({stats['labelled_redundant']} of "
        f"{stats['probed_tokens']} probed tokens labelled redundant, {stats['stage_one_survivors']} after stage "
        f"one); tau {tau:.3f}; wrote {output} in {record['build_seconds']:.0f} s")
    return record
