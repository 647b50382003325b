"""The training loop: stages, learning-rate schedule, checkpoints, resuming, donors, export."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .. import model as M
from .. import world as W
from .batches import StepBatches, word_ids
from .evaluation import quick_eval, tower_eval
from .losses import VisionHeads, align_loss, position_loss, vision_features, vision_loss
from .recipe import Recipe
from .retrieval import (attention_loss, count_heads_loss, key_attribute_loss, readout_loss, readout_words,
                        retrieval_values)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _worker_init(_):
    torch.set_num_threads(1)  # the batch worker leaves the cores to the training step


class Trainer:
    def __init__(self, out_dir: str | Path, recipe: Recipe, device: str | None = None, log=print):
        if recipe.count_objects and not recipe.count_centres:
            raise ValueError("count_objects needs count_centres (it changes the count target's patches)")
        if recipe.count_heads_weight and not recipe.count_centres:
            raise ValueError("count_heads_weight needs count_centres (the count target is <s> and the centres)")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.recipe = recipe
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.log_fn = log
        dims = M.ModelDims(**recipe.dims)
        self.model, self.processor = M.build_model(dims, seed=recipe.seed)
        self.model.to(self.device).train()
        self.tokenizer = self.processor.tokenizer
        self.image_token_id = self.model.config.image_token_id
        words = readout_words(recipe.readout_answers, counts=recipe.count_centres or recipe.count_readout)
        self._attribute_ids = torch.tensor(word_ids(self.tokenizer, words), device=self.device)
        torch.manual_seed(recipe.seed)
        self.heads = VisionHeads(dims.vision_hidden).to(self.device)
        self.align_head = torch.nn.Linear(dims.text_hidden, 2).to(self.device)
        self.value_head = torch.nn.Linear(dims.text_hidden // dims.text_heads, 2).to(self.device)
        attributes = len(W.COLOR_CLASSES) - 1 + len(W.KIND_CLASSES) - 1
        self.key_queries = torch.nn.Embedding(attributes, dims.text_hidden // dims.text_heads).to(self.device)
        self.state = {"stage": "vision", "step": 0}
        self.optimizer = None
        self._make_optimizer()
        self.ckpt = self.out / "checkpoint.pt"
        if self.ckpt.exists():
            self._resume()
        elif recipe.init_from:
            self._take(recipe.init_from, "init_from")
            if recipe.tower_steps:
                self.state = {"stage": "vision", "step": 0}
                self._make_optimizer()
        elif recipe.vision_from:
            self._take(recipe.vision_from, "vision_from")
        self.anchor = None  # the donor's tower, frozen: what the continued tower's features stay near
        if recipe.init_from and recipe.tower_steps and recipe.anchor_weight and self.state["stage"] == "vision":
            import copy

            self.anchor = copy.deepcopy(self.model.model.vision_tower).requires_grad_(False)
            if self.ckpt.exists():  # resumed: the donor's tower is in the donor, not in the checkpoint
                from transformers import LlavaForConditionalGeneration

                donor = LlavaForConditionalGeneration.from_pretrained(recipe.init_from)
                self.anchor.load_state_dict(donor.model.vision_tower.state_dict())
            self.anchor.to(self.device).eval()

    # Parameters trained in each stage.
    def _params(self, stage):
        m = self.model.model
        if stage == "vision":
            return list(m.vision_tower.parameters()) + list(self.heads.parameters())
        if stage == "align":
            return list(m.multi_modal_projector.parameters()) + list(self.align_head.parameters())
        extra = list(self.align_head.parameters()) if self.recipe.position_weight else []
        extra += list(self.value_head.parameters()) if self.recipe.value_position_weight else []
        extra += list(self.key_queries.parameters()) if self.recipe.key_attribute_weight else []
        return list(m.multi_modal_projector.parameters()) + list(m.language_model.parameters()) + \
            list(self.model.lm_head.parameters()) + extra

    def _make_optimizer(self):
        stage = self.state["stage"]
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = self._params(stage)
        for p in params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))

    def _resume(self):
        blob = torch.load(self.ckpt, map_location=self.device, weights_only=False)
        self.model.load_state_dict(blob["model"])
        self.heads.load_state_dict(blob["heads"])
        self.align_head.load_state_dict(blob["align_head"])
        for name in ("value_head", "key_queries"):  # absent from checkpoints made before they existed
            if name in blob:
                getattr(self, name).load_state_dict(blob[name])
        self.state = blob["state"]
        self._make_optimizer()
        saved = blob.get("optimizer")
        if saved is not None:
            had, has = len(saved["param_groups"][0]["params"]), len(self.optimizer.param_groups[0]["params"])
            if had <= has:  # a recipe switch that adds a trained head appends its parameters: they start fresh
                state = self.optimizer.state_dict()
                state["state"].update(saved["state"])
                self.optimizer.load_state_dict(state)
            else:
                self.log("optimizer state not resumed: the resumed recipe trains fewer parameters")
        self.log(f"resumed at stage {self.state['stage']} step {self.state['step']}")

    # What a donor checkpoint (the recipe field naming it) can give: (submodule, the stage training
    # resumes at, what the log says is skipped).
    _DONATIONS = {"vision_from": ("model.vision_tower", "align", "its vision tower; stage 1"),
                  "init_from": ("", "instruct", "every weight; stages 1-2")}

    def _take(self, path, what: str):
        """Load part of a llava-hf checkpoint (`what`: a key of _DONATIONS) and skip the stages it replaces."""
        from transformers import LlavaForConditionalGeneration

        part, stage, said = self._DONATIONS[what]
        try:
            donor = LlavaForConditionalGeneration.from_pretrained(path)
        except OSError as err:
            raise ValueError(f"{what} {path}: not a llava-hf checkpoint ({err})") from None
        try:
            self.model.get_submodule(part).load_state_dict(donor.get_submodule(part).state_dict())
        except RuntimeError as err:
            raise ValueError(f"{what} {path}: its weights do not fit these dims ({err})") from None
        self.state = {"stage": stage, "step": 0}
        self._make_optimizer()
        self.log(f"taken from {path}: {said} skipped")

    def save_checkpoint(self):
        tmp = self.ckpt.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "heads": self.heads.state_dict(),
                    "align_head": self.align_head.state_dict(), "value_head": self.value_head.state_dict(),
                    "key_queries": self.key_queries.state_dict(),
                    "state": self.state,
                    "optimizer": self.optimizer.state_dict(), "recipe": asdict(self.recipe)}, tmp)
        tmp.replace(self.ckpt)  # atomic: a kill mid-write leaves the previous checkpoint intact

    def log(self, msg: str, **fields):
        line = {"time": round(time.time(), 1), **self.state, "msg": msg, **fields}
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        self.log_fn(f"[{self.state['stage']} {self.state['step']}] {msg} {fields if fields else ''}")

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def run(self):
        from tqdm import tqdm

        r = self.recipe
        stages = [("vision", r.vision_steps, r.vision_lr), ("align", r.align_steps, r.align_lr),
                  ("instruct", r.instruct_steps, r.instruct_lr)]
        if r.init_from:  # every weight taken: at most a tower continuation, then instruction tuning
            stages = [("vision", r.tower_steps, r.tower_lr)] * bool(r.tower_steps) + stages[2:]
        names = [s[0] for s in stages]
        for name, total, peak in stages[names.index(self.state["stage"]):]:
            if self.state["stage"] != name:
                self.state = {"stage": name, "step": 0}
                self._make_optimizer()
            bar = tqdm(total=total, initial=self.state["step"], desc=f"stage {name}", unit="step")
            batches = torch.utils.data.DataLoader(
                StepBatches(r, name, self.state["step"], total, self.tokenizer, self.image_token_id),
                batch_size=None, num_workers=1, prefetch_factor=2, worker_init_fn=_worker_init)
            for batch in batches:
                step = self.state["step"]
                lr = lr_at(step, total, peak, r.warmup)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                with self._autocast():
                    loss, info = self._loss(name, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state["step"] = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                if step % 10 == 0:
                    self.log("train", loss=round(float(loss.detach()), 4), lr=round(lr, 6),
                             **{k: round(v, 4) for k, v in info.items()})
                if name == "instruct" and (step + 1) % r.eval_every == 0:
                    self.log("val", **quick_eval(self.model, self.processor, "validation", r.eval_samples))
                if name == "vision" and step + 1 == total:
                    self.log("val", **tower_eval(self.model, self.heads, counts=bool(r.kind_count_weight)))
                if (step + 1) % r.checkpoint_every == 0 or step + 1 == total:
                    self.save_checkpoint()
            bar.close()
        self.state = {"stage": "done", "step": 0}
        self.save_checkpoint()

    def _loss(self, stage, batch):
        batch = {k: (v.to(self.device) if torch.is_tensor(v) else
                     {n: t.to(self.device) for n, t in v.items()}) for k, v in batch.items()}
        if stage == "vision":
            anchor = None
            if self.anchor is not None:
                with torch.no_grad():
                    anchor = vision_features(self.model, batch["pixel_values"], tower=self.anchor).float()
            return vision_loss(self.model, self.heads, batch, self.recipe.letter_weight, anchor,
                               self.recipe.anchor_weight, self.recipe.kind_count_weight,
                               self.recipe.cls_count_weight, self.recipe.small_shape_weight)
        if stage == "align":
            return align_loss(self.model, self.tokenizer, batch, self.align_head)
        evidence = batch.pop("evidence", None)
        attributes = batch.pop("patch_labels", None)
        if evidence is None or not self.recipe.attention_weight:
            return self.model(**batch).loss, {}
        out = self.model(**batch, output_hidden_states=True)
        layer = self.recipe.attention_layer
        attention = attention_loss(self.model, out.hidden_states, batch, evidence, layer, self.recipe.spread_words,
                                   self.recipe.count_attention_weight)
        loss = out.loss + self.recipe.attention_weight * attention
        info = {"answer": float(out.loss), "attention": float(attention)}
        if self.recipe.readout_weight:
            readout = readout_loss(self.model, out.hidden_states, batch, evidence, layer, self._attribute_ids)
            loss = loss + self.recipe.readout_weight * readout
            info["readout"] = float(readout)
        if self.recipe.count_heads_weight:
            counting = count_heads_loss(self.model, out.hidden_states, batch, evidence, layer)
            loss = loss + self.recipe.count_heads_weight * counting
            info["count_heads"] = float(counting)
        if self.recipe.position_weight:
            position = position_loss(out.hidden_states[0], batch["input_ids"], self.image_token_id, self.align_head)
            loss = loss + self.recipe.position_weight * position
            info["position"] = float(position)
        if self.recipe.value_position_weight:
            values = retrieval_values(self.model, out.hidden_states, layer)
            position = position_loss(values, batch["input_ids"], self.image_token_id, self.value_head, normalise=False)
            loss = loss + self.recipe.value_position_weight * position
            info["value_position"] = float(position)
        if self.recipe.key_attribute_weight:
            keyed = key_attribute_loss(self.model, out.hidden_states, batch, attributes, self.key_queries.weight,
                                       self.image_token_id, layer)
            loss = loss + self.recipe.key_attribute_weight * keyed
            info["key_attribute"] = float(keyed)
        return loss, info

    def export(self, path: str | Path, command: str = ""):
        """The model in llava-hf form, with the recipe, the command and the training log beside it."""
        import shutil

        self.model.eval()
        M.save(self.model.float().cpu(), self.processor, path, M.ModelDims(**self.recipe.dims))
        (Path(path) / "training_recipe.json").write_text(
            json.dumps({"command": command, "recipe": asdict(self.recipe)}, indent=2))
        shutil.copy(self.out / "train_log.jsonl", Path(path) / "train_log.jsonl")
