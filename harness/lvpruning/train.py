"""`harness lvpruning train`: LVPruning's decision modules trained on a frozen testbed-class LLaVA model.

The paper's recipe (arXiv 2501.13652; METHODS.md §4), scaled to the testbed: the model is frozen, only the
modules train; decisions are hard Gumbel-Softmax draws with a soft gradient, cumulative across stages;
tokens are masked, not dropped (`masked.masked_forward`); the loss is
lambda_causal * L_LM + lambda_ratio * sum_s mean_images (mean_n D'_s - t_s)^2 with t_s = rho - 0.2 s.

Data: the testbed's train split only (`questions.make_sample("train", ...)`), each sample one prompt and its
answer encoded as the testbed's own training encodes them (`training.batches.encode` / `pixels`). Every batch,
and every Gumbel draw, is a pure function of (seed, step), so a run resumed from its workdir's checkpoint
(written atomically every `checkpoint_every` steps) ends with the modules an uninterrupted run gives.
Validation (every `eval_every` steps and at the end): greedy answers to validation documents through the
shared adapter, `prune(model, "lvpruning", final ratio, path=<the modules so far>)`, against random pruning.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import methods.lvpruning_modules as files
from harness.errors import InputError

from .masked import answer_loss, check_layers, masked_forward, prepare

RATIO_LOSSES = ("mse", "huber")
CHECKPOINT, LOG = "checkpoint.pt", "train_log.jsonl"


class TrainingInputError(InputError):
    """A model folder, layer list, setting, output or workdir that training cannot use."""


@dataclass
class Settings:
    """What a training run does; the checkpoint records it and a resumed run must match it.

    The paper trains 620k LLaVA-665k samples on a 7B model with lr 2e-6, batch 64, warm-up 0.03, cosine, one
    epoch; here 6,000 testbed samples train fresh modules on a 3-layer, 128-wide decoder in under 30 minutes of
    2 CPU cores (harness/testbed/lvpruning/TRAINING.md), so the learning rate is the one small fresh modules
    need, not the paper's fine-tuning rate; the schedule's shape (warm-up share, cosine) is the paper's."""

    #: optimiser steps; sized by measurement so the testbed's run fits 30 min on 2 shared CPU cores (~1.9 s a step
    #: on one thread; a 300-step trial already met the targets and beat random pruning)
    steps: int = 750
    #: samples per step; small batches, more steps: the modules see more updates in the same time
    batch: int = 8
    #: AdamW peak learning rate for freshly initialised modules (the paper's 2e-6 fine-tunes a 7B for 620k
    #: samples; at that rate these modules would not move in 10^4 samples)
    lr: float = 1e-3
    #: warm-up share of the steps (the paper's 0.03), then cosine decay to zero (the paper's)
    warmup: float = 0.03
    #: AdamW weight decay (the usual 0.01; the paper gives none)
    weight_decay: float = 0.01
    #: gradient norm clip: straight-through gradients through a frozen network can spike
    grad_clip: float = 1.0
    #: weight of the answer's cross-entropy (the paper's lambda_causal; its value is not given: 1)
    lambda_causal: float = 1.0
    #: weight of the keep-ratio loss (not given by the paper; DynamicViT's ratio weight, 2)
    lambda_ratio: float = 2.0
    #: "mse": the paper's equation (squared error); "huber": the loss its text also names (beta `huber_beta`)
    ratio_loss: str = "mse"
    huber_beta: float = 0.5
    #: first stage's keep-ratio target; stage s aims at rho - rho_step * s (the paper: 0.5, 0.2)
    rho: float = 0.5
    rho_step: float = 0.2
    #: Gumbel-Softmax temperature (DynamicViT's and the paper's 1)
    tau: float = 1.0
    #: decoder layers the modules prune before; None: LLaVA's 1, 8, 16 of 32 mapped onto the decoder's depth
    layers: tuple | None = None
    #: the testbed families drawn, in turn (single-image ones: one image per sample, as LLaVA-665k mostly is)
    families: tuple = ("exist", "count", "color", "color_mc", "spatial", "text")
    seed: int = 0
    #: steps between checkpoints (a multiple of `log_every`, so a resumed log equals an uninterrupted one)
    checkpoint_every: int = 50
    #: steps averaged into one log line
    log_every: int = 10
    #: steps between validations (0: only at the end), and validation documents per family (0: no validation)
    eval_every: int = 250
    eval_docs: int = 20

    def __post_init__(self):
        self.layers = None if self.layers is None else tuple(int(k) for k in self.layers)
        self.families = tuple(self.families)
        for name in ("steps", "batch", "checkpoint_every", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise TrainingInputError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.checkpoint_every % self.log_every:
            raise TrainingInputError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every "
                                     f"({self.log_every})")
        if self.ratio_loss not in RATIO_LOSSES:
            raise TrainingInputError(f"ratio_loss must be one of {', '.join(RATIO_LOSSES)}, got {self.ratio_loss!r}")
        if not self.lr > 0 or not 0 <= self.warmup < 1 or not self.tau > 0:
            raise TrainingInputError(f"lr and tau must be positive and warmup in [0, 1), got lr {self.lr}, "
                                     f"tau {self.tau}, warmup {self.warmup}")
        from harness.testbed import questions as Q

        bad = [f for f in self.families if f not in Q.FAMILIES or f == "video"]
        if bad or not self.families:
            raise TrainingInputError(f"families must be testbed image families ({', '.join(Q.FAMILIES[:-1])}), "
                                     f"got {list(self.families)}")

    def targets(self, stages: int) -> list[float]:
        targets = [round(self.rho - self.rho_step * s, 6) for s in range(stages)]
        if not all(0 < t <= 1 for t in targets):
            raise TrainingInputError(f"keep-ratio targets {targets} for {stages} stages leave (0, 1]: use fewer "
                                     f"layers or another rho / rho_step")
        return targets


def resolve_layers(layers, decoder_layers: int) -> tuple:
    """The stage layers (given, or the paper's mapped onto this depth: `lvpruning_modules.mapped_layers`),
    checked: a TrainingInputError otherwise."""
    try:
        return check_layers(files.mapped_layers(decoder_layers) if layers is None else tuple(layers), decoder_layers)
    except ValueError as e:
        raise TrainingInputError(f"{e}{' (pass --layers)' if layers is None else ''}") from None


def model_config(path) -> tuple[Path, object]:
    """The checkpoint folder and its config, or a TrainingInputError (a LLaVA-1.5 folder is needed)."""
    from transformers import AutoConfig

    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise TrainingInputError(f"--model {path}: not a model folder (expected a folder with config.json, e.g. "
                                 f"harness/testbed/checkpoint)")
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - a malformed config.json: say which file, not where transformers failed
        raise TrainingInputError(f"--model {path}: unreadable config.json ({type(e).__name__}: {e})") from None
    if config.model_type != "llava":
        raise TrainingInputError(f"--model {path}: a {config.model_type!r} model; LVPruning training supports "
                                 f"LLaVA-1.5-class models (model_type 'llava', e.g. the testbed)")
    return folder, config


def lr_at(step: int, settings: Settings) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine decay to zero."""
    warm = max(1, round(settings.warmup * settings.steps)) if settings.warmup else 0
    if step < warm:
        return settings.lr * (step + 1) / warm
    progress = (step - warm) / max(1, settings.steps - warm)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def draws(settings: Settings, step: int) -> list[tuple[str, int]]:
    """(family, train index) of each sample of `step`: the families in turn, indices by seed and step."""
    first = step * settings.batch
    fams = settings.families
    return [(fams[(first + j) % len(fams)], settings.seed * 10_000_000 + first + j) for j in range(settings.batch)]


def make_batch(settings: Settings, step: int, tokenizer, image_token_id: int) -> dict:
    """Step `step`'s batch (CPU tensors, right-padded): input_ids, attention_mask, labels (answer tokens),
    pixel_values. A pure function of (settings, step); train split only."""
    from harness.testbed import questions as Q
    from harness.testbed.training.batches import encode, pixels

    samples = [Q.make_sample("train", family, index) for family, index in draws(settings, step)]
    encoded = [encode(tokenizer, image_token_id, sample) for sample in samples]
    length = -(-max(len(ids) for ids, _ in encoded) // 32) * 32  # few distinct shapes for the CPU kernels
    input_ids = torch.full((len(samples), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, :len(ids)], labels[row, :len(ids)] = torch.tensor(ids), torch.tensor(labs)
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": pixels([scene for sample in samples for scene in sample["scenes"]])}


def ratio_loss(decisions, targets, kind: str = "mse", beta: float = 0.5) -> torch.Tensor:
    """Per stage, the error between each image's mean cumulative decision and the stage's target, averaged
    over images; summed over stages."""
    total = decisions[0].new_zeros(())
    for keep, target in zip(decisions, targets):
        means = keep.mean(1)
        goal = torch.full_like(means, target)
        if kind == "mse":
            total = total + torch.nn.functional.mse_loss(means, goal)
        else:
            total = total + torch.nn.functional.huber_loss(means, goal, delta=beta)
    return total


@torch.no_grad()
def validate(model, processor, method: str, budget, docs: int, families, batch_size: int = 8, **params) -> dict:
    """Accuracy of greedy answers to the first `docs` validation documents of each family, pruned by `method`
    at `budget` through the shared adapter (`none`: unpruned); per family and their mean."""
    from harness.adapters import prune
    from harness.testbed import questions as Q
    from harness.testbed.training.evaluation import generate_answers

    result = {}
    for family in families:
        samples = [Q.make_sample("validation", family, i) for i in range(docs)]
        if method == "none":
            answers = generate_answers(model, processor, samples, batch_size=batch_size)
        else:
            with prune(model, method, budget, record_ipr=False, **params):
                answers = generate_answers(model, processor, samples, batch_size=batch_size)
        right = [Q.normalize_answer(a) == Q.normalize_answer(s["answer"]) for a, s in zip(answers, samples)]
        result[family] = round(sum(right) / len(right), 4)
    result["mean"] = round(sum(result[f] for f in families) / len(families), 4)
    return result


def _device(name: str) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingInputError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingInputError(f"--device {name}: no CUDA device here (use auto or cpu)")
    return device


@dataclass
class Run:
    """What the checkpoint carries besides tensors (resumed with them)."""

    step: int = 0
    seconds: float = 0.0  # wall time so far (training, validation, checkpoints), over every resumed session
    history: list = field(default_factory=list)  # the log lines so far


class Trainer:
    """Trains modules for the model at `model_path`, checkpointing in `workdir` (resumed when it holds one)."""

    def __init__(self, model_path, workdir, settings: Settings, device: str = "auto", log=print):
        self.folder, config = model_config(model_path)
        self.decoder_layers = config.text_config.num_hidden_layers
        self.layers = resolve_layers(settings.layers, self.decoder_layers)
        self.targets = settings.targets(len(self.layers))
        self.settings = settings
        self.device = _device(device)
        self.workdir = Path(workdir)
        self.log_fn = log
        self.state = Run()
        self._saved = None
        if (self.workdir / CHECKPOINT).is_file():
            self._saved = torch.load(self.workdir / CHECKPOINT, map_location="cpu", weights_only=False)
            mine = self._identity()
            theirs = {key: self._saved.get(key) for key in mine}
            if theirs != mine:
                differ = sorted(k for k in mine if mine[k] != theirs[k])
                raise TrainingInputError(f"--workdir {self.workdir} holds a run of another model or settings "
                                         f"(differs in {', '.join(differ)}): resume it with the same ones, or "
                                         f"use another --workdir")
        self._load()

    def _identity(self) -> dict:
        return {"model": str(self.folder.resolve()), "settings": asdict(self.settings), "layers": list(self.layers)}

    def _load(self):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model = LlavaForConditionalGeneration.from_pretrained(self.folder).to(self.device).eval()
        self.model.requires_grad_(False)
        self.processor = AutoProcessor.from_pretrained(self.folder)
        self.tokenizer = self.processor.tokenizer
        hidden = self.model.config.text_config.hidden_size
        self.modules = files.build(hidden, len(self.layers), seed=self.settings.seed).to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.modules.parameters(), lr=self.settings.lr,
                                           weight_decay=self.settings.weight_decay)
        if self._saved is not None:
            self.modules.load_state_dict(self._saved["modules"])
            self.optimizer.load_state_dict(self._saved["optimizer"])
            self.state = Run(**self._saved["state"])
            self.log_fn(f"resumed from {self.workdir / CHECKPOINT} at step {self.state.step}")
            self._saved = None

    def _save_checkpoint(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / CHECKPOINT
        tmp = path.with_name(path.name + ".tmp")
        torch.save({**self._identity(), "modules": self.modules.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "state": asdict(self.state)}, tmp)
        tmp.replace(path)  # atomic: a kill mid-write leaves the previous checkpoint
        self._write_log()

    def _write_log(self):
        """The workdir's log as the checkpoint knows it (a resumed run drops the lines after its checkpoint)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / (LOG + ".tmp"), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in self.state.history)
        (self.workdir / (LOG + ".tmp")).replace(self.workdir / LOG)

    def _record(self, line: dict):
        self.state.history.append(line)
        with open(self.workdir / LOG, "a") as f:  # live, for whoever polls the run
            f.write(json.dumps(line) + "\n")
        self.log_fn(json.dumps(line))

    def step_loss(self, step: int) -> tuple[torch.Tensor, dict]:
        """The loss of step `step` (its batch and its Gumbel draws are functions of seed and step)."""
        s = self.settings
        raw = make_batch(s, step, self.tokenizer, self.model.config.image_token_id)
        raw = {key: value.to(self.device) for key, value in raw.items()}
        batch = prepare(self.model, raw["input_ids"], raw["pixel_values"], raw["attention_mask"], raw["labels"])
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + step)
        out = masked_forward(self.model, batch, self.modules, self.layers, "gumbel", tau=s.tau, generator=generator)
        lm = answer_loss(out.logits, batch.labels)
        ratio = ratio_loss(out.decisions, self.targets, s.ratio_loss, s.huber_beta)
        loss = s.lambda_causal * lm + s.lambda_ratio * ratio
        return loss, {"loss": float(loss.detach()), "lm": float(lm.detach()), "ratio": float(ratio.detach()),
                      "keep": [float(d.detach().mean()) for d in out.decisions]}

    def validate(self, docs: int, methods=("lvpruning",)) -> dict:
        """Validation accuracy at the final target ratio of the modules as they are now (saved to a temporary
        file the `lvpruning` method reads), and of the other `methods` at the same budget."""
        import tempfile

        result = {}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"modules-step{self.state.step}.safetensors"
            self._export(path, {})
            for method in methods:
                params = {"path": str(path)} if method == "lvpruning" else {}
                result[method] = validate(self.model, self.processor, method, float(self.targets[-1]), docs,
                                          self.settings.families, **params)
        return result

    def run(self, until: int | None = None):
        """Train up to step `until` (default: the settings' steps), checkpointing; validate on the way."""
        from tqdm import tqdm

        s = self.settings
        end = s.steps if until is None else min(until, s.steps)
        bar = tqdm(total=s.steps, initial=self.state.step, desc="lvpruning train", unit="step")
        sums, started = {}, time.perf_counter() - self.state.seconds
        self._write_log()
        while self.state.step < end:
            step = self.state.step
            lr = lr_at(step, s)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, info = self.step_loss(step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.modules.parameters(), s.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step = step + 1
            for key, value in info.items():
                sums[key] = [a + b for a, b in zip(sums.get(key, [0.0] * len(value)), value)] \
                    if isinstance(value, list) else sums.get(key, 0.0) + value
            bar.update(1)
            bar.set_postfix(loss=f"{info['loss']:.3f}", keep="/".join(f"{k:.2f}" for k in info["keep"]))
            self.state.seconds = time.perf_counter() - started
            if self.state.step % s.log_every == 0 or self.state.step == s.steps:
                n = s.log_every if self.state.step % s.log_every == 0 else self.state.step % s.log_every
                mean = {k: [round(x / n, 4) for x in v] if isinstance(v, list) else round(v / n, 4)
                        for k, v in sums.items()}
                self._record({"step": self.state.step, **mean, "lr": round(lr, 8),
                              "seconds": round(self.state.seconds, 1)})
                sums = {}
            if s.eval_docs and (self.state.step == s.steps or (s.eval_every and self.state.step % s.eval_every == 0)):
                val = self.validate(s.eval_docs, ("lvpruning", "random") if self.state.step == s.steps
                                    else ("lvpruning",))
                self._record({"step": self.state.step, "val": val, "budget": self.targets[-1],
                              "docs_per_family": s.eval_docs})
                self.state.seconds = time.perf_counter() - started
            if self.state.step % s.checkpoint_every == 0 or self.state.step == s.steps:
                self._save_checkpoint()
        bar.close()
        return self.modules

    def final_losses(self, lines: int = 5) -> dict:
        """The mean of the last `lines` logged training lines (each a mean over `log_every` steps)."""
        train = [line for line in self.state.history if "loss" in line][-lines:]
        if not train:
            return {}
        out = {k: round(sum(line[k] for line in train) / len(train), 4) for k in ("loss", "lm", "ratio")}
        out["keep"] = [round(sum(line["keep"][i] for line in train) / len(train), 4) for i in range(len(self.layers))]
        return out

    def _export(self, output, training: dict) -> Path:
        return files.save(output, self.modules, layers=self.layers, decoder_layers=self.decoder_layers,
                          targets=self.targets, training=training)

    def export(self, output, command: str = "") -> Path:
        """The modules file (with its provenance) and the training log beside it, as `train_log.jsonl`."""
        validation = [line for line in self.state.history if "val" in line]
        training = {"command": command, "settings": asdict(self.settings), "steps": self.state.step,
                    "wall_seconds": round(self.state.seconds, 1), "device": str(self.device),
                    "final_losses": self.final_losses(), "model": str(self.folder),
                    "validation": validation[-1] if validation else None}
        path = self._export(output, training)
        with open(path.parent / LOG, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in self.state.history)
        return path
